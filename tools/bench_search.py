"""BM25 benchmark: search.py's index against rank-bm25 and bm25s, printed as markdown tables.

    python -m tools.bench_search                     # 10k and 100k passages head to head with rank-bm25
    python -m tools.bench_search --scaling           # also the on-disk index at 100k, 1M and 4M against bm25s
    python -m tools.bench_search --sizes 2000 --scaling --scaling-sizes 20000    # a quick check of the code

Corpus: synthetic, with a Zipf-like vocabulary (word rank r drawn with probability ~ 1 / r^1.1 from 200k
words, 60-100 words a passage, none a stopword), so about as many bytes a passage as wiki-18 and somewhat
more distinct terms; 256 queries of 2-6 words from the same distribution, so frequent terms with long
posting lists appear in queries as often as they would in text.

Head to head with rank-bm25 (`BM25Okapi`), in one process, per corpus size:
  (a) query time: one batched `search` of all queries vs `get_scores` + a stable argsort per query;
  (b) build time from raw passages: `BM25Index(texts)` vs `tokenize` every passage + `BM25Okapi(tokens)`;
  (c) memory the built index keeps: tracemalloc's live bytes after the build minus before, passages excluded;
  (d) identity: the same top-k passages, scores within 1e-6 relative, for every query timed on rank-bm25.
Targets: (a) >= 50x faster at 100k passages and up, (b) no slower, (c) no larger.

Scaling (--scaling), one child process per corpus size, so each starts empty:
  - our build streams the passages from a file (one a line) to a folder with `build_index`, tokenising
    included, once; its peak is the process's VmHWM over its resident memory before, and counts the mapped
    pages of the arrays it writes;
  - a fresh process then loads it as a training rank would: load time, and its resident memory (VmRSS of
    /proc) right after the load and after one batched search, both minus the process's own before the load;
  - on-disk size of the index arrays (all of which a long run of searches can page in) and of the texts
    (only the hits' pages are ever read);
  - bm25s (`method="robertson"`, numpy backend), if installed, indexes the same tokens as ids, rebuilt from
    our postings: its cheapest input, which leaves it no tokenising and no mapping of tokens to ids, where our
    build does both. Up to 1M passages it also indexes them as token strings, as the issue measured it
    (tokenising not timed). Then both answer the same queries, alternating, best of --repeats. bm25s floors
    idf at 0 where rank-bm25 uses epsilon * mean idf, so the two rankings can only agree on queries whose
    terms are all in fewer than half the passages: on those, its top-k should be ours up to float32 ties.
Times are wall clock; the machine may be shared.
"""
import argparse
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types

import numpy as np
from rank_bm25 import BM25Okapi

from index_files import build_index, load_index
from search import STOPWORDS, BM25Index, tokenize

MIB = 2 ** 20
STRING_TOKENS_UP_TO = 1_000_000  # bm25s also indexes token strings up to here; beyond, they would not fit in memory


def zipf_words(vocab_size: int, rng: np.random.Generator) -> list[str]:
    """`vocab_size` distinct lowercase pseudo-words of 3-9 letters, none of them a stopword."""
    words: set[str] = set()
    while len(words) < vocab_size:
        letters = rng.integers(ord("a"), ord("z") + 1, size=(vocab_size, 9), dtype=np.uint8)
        lengths = rng.integers(3, 10, size=vocab_size)
        words.update(row[:n].tobytes().decode() for row, n in zip(letters, lengths))
        words -= STOPWORDS
    return sorted(words)[:vocab_size]


def zipf_passages(n_texts: int, min_len: int, max_len: int, seed: int, vocab_size: int = 200_000,
                  exponent: float = 1.1):
    """Yield `n_texts` strings of min_len..max_len Zipf-distributed words; the first two form a title line."""
    # One vocabulary and one rank order for corpus and queries; shuffled so rank is unrelated to spelling.
    words = zipf_words(vocab_size, np.random.default_rng(1234))
    np.random.default_rng(1234).shuffle(words)
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, vocab_size + 1) ** exponent)
    for start in range(0, n_texts, 100_000):  # chunks keep the sampled ids of a large corpus small
        lengths = rng.integers(min_len, max_len + 1, size=min(100_000, n_texts - start))
        ranks = np.searchsorted(cdf, rng.random(lengths.sum()) * cdf[-1]).tolist()
        ends = np.cumsum(lengths).tolist()
        for begin, end in zip([0] + ends[:-1], ends):
            title = " ".join(words[r] for r in ranks[begin:begin + 2])
            yield title + "\n" + " ".join(words[r] for r in ranks[begin + 2:end])


def zipf_texts(n_texts: int, min_len: int, max_len: int, seed: int, **vocabulary) -> list[str]:
    return list(zipf_passages(n_texts, min_len, max_len, seed, **vocabulary))


def traced_bytes(build) -> tuple[object, int, int]:
    """Run `build()`; return its result, the bytes it left allocated, and the peak bytes during the build."""
    gc.collect()
    tracemalloc.start()
    result = build()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, current, peak


def timed(run) -> tuple[float, object]:
    """Wall-clock seconds of `run()`, and its result."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmHWM: its high-water mark), file-backed pages (a mapped index)
    included. Unlike getrusage's maxrss, neither counts the parent's pages a child was forked with."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def reset_peak() -> None:
    """Restart VmHWM from the current resident memory (Linux's clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def bench_bm25(sizes: list[int], n_queries: int, baseline_queries: int, topk: int, repeats: int,
               seed: int) -> None:
    """Head-to-head with rank-bm25 at each corpus size: query time, build time, memory, identity."""
    queries = zipf_texts(n_queries, 2, 6, seed + 1)
    speed, build, memory = [], [], []
    for n in sizes:
        texts = zipf_texts(n, 60, 100, seed)
        ours_build, theirs_build = [], []  # seconds per repeat; ours and rank-bm25's alternate
        for _ in range(repeats):
            index = baseline = None  # free the last repeat's indexes before building again
            seconds, index = timed(lambda: BM25Index(texts))
            ours_build.append(seconds)
            tokenize_s, tokens = timed(lambda: [tokenize(text) for text in texts])
            seconds, baseline = timed(lambda: BM25Okapi(tokens))
            theirs_build.append((tokenize_s + seconds, tokenize_s, seconds))
            del tokens
        ours_build, theirs_build = min(ours_build), min(theirs_build)

        index.search(queries[:8], topk)  # warm up allocator and caches
        ours_q = min(timed(lambda: index.search(queries, topk))[0] for _ in range(repeats)) / n_queries
        hits = index.search(queries, topk)
        start = time.perf_counter()
        baseline_scores = [baseline.get_scores(tokenize(q)) for q in queries[:baseline_queries]]
        baseline_top = [np.argsort(-s, kind="stable")[:topk] for s in baseline_scores]
        theirs_q = (time.perf_counter() - start) / baseline_queries
        identical = all(
            [doc for doc, _ in h] == top.tolist()
            and np.allclose([score for _, score in h], s[top], rtol=1e-6, atol=0)
            for h, top, s in zip(hits, baseline_top, baseline_scores))
        postings = index.doc_ids.size
        del index, baseline, baseline_scores

        _, ours_mem, ours_peak = traced_bytes(lambda: BM25Index(texts))
        _, theirs_mem, theirs_peak = traced_bytes(lambda: BM25Okapi([tokenize(text) for text in texts]))
        ratio = theirs_q / ours_q
        speed.append([f"{n:,}", f"{postings:,}", f"{ours_q * 1e3:.3f}", f"{theirs_q * 1e3:.2f}", f"{ratio:.0f}x",
                      verdict(ratio >= 50) if n >= 100_000 else "-", topk, verdict(identical)])
        build.append([f"{n:,}", f"{ours_build:.2f}", f"{theirs_build[1]:.2f} + {theirs_build[2]:.2f} = "
                      f"{theirs_build[0]:.2f}", f"{ours_build / theirs_build[0]:.2f}",
                      verdict(ours_build <= theirs_build[0])])
        memory.append([f"{n:,}", f"{ours_mem / MIB:.1f}", f"{theirs_mem / MIB:.1f}", f"{ours_mem / theirs_mem:.2f}",
                       verdict(ours_mem <= theirs_mem), f"{ours_peak / MIB:.0f}", f"{theirs_peak / MIB:.0f}"])
    print_table(f"BM25 query time ({n_queries} queries batched for ours; rank-bm25 timed on the first "
                f"{baseline_queries} and scaled per query)",
                ["passages", "postings", "ours ms/query", "rank-bm25 ms/query", "speedup", ">=50x", "top-k",
                 "same top-k"], speed)
    print_table("BM25 build time from raw passages, seconds (rank-bm25: tokenize + BM25Okapi)",
                ["passages", "ours", "rank-bm25", "ours / theirs", "no slower"], build)
    print_table("BM25 index memory, MiB (tracemalloc: live bytes left by the build; peak during it)",
                ["passages", "ours kept", "rank-bm25 kept", "ours / theirs", "no larger", "ours peak",
                 "rank-bm25 peak"], memory)


def load_probe(folder: str, n_queries: int, topk: int, seed: int) -> dict:
    """What a training rank sees: load the index at `folder` in this (fresh) process, then search once."""
    queries = zipf_texts(n_queries, 2, 6, seed + 1)
    before = rss_mib()
    load_s, index = timed(lambda: load_index(folder))
    after_load = rss_mib()
    search_s = timed(lambda: index.search(queries, topk))[0]
    return {"load_s": load_s, "rss_load": after_load - before, "rss_search": rss_mib() - before,
            "first_ms": search_s / n_queries * 1e3}


class TokenIdLists:
    """Each passage's token ids as a fresh list, made as bm25s iterates (it takes lists, and 4M passages of
    them at once would hold more memory than the rest of the benchmark), from a flat array and offsets."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets                            # [T] int32, [N + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __iter__(self):
        bounds = self.offsets.tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            yield self.flat[lo:hi].tolist()


def passage_token_ids(index: BM25Index) -> TokenIdLists:
    """Our tokens of every passage as term ids, rebuilt from the postings (a passage's ids come out in term
    order, which BM25 never sees), so bm25s indexes exactly our tokens without a second tokenising pass."""
    terms = np.repeat(np.arange(len(index.vocab), dtype=np.int32), np.diff(index.indptr))   # [P]
    by_passage = np.argsort(index.doc_ids, kind="stable")                                  # [P]
    flat = np.repeat(terms[by_passage], index.tf[by_passage])                               # [T]
    lengths = np.bincount(index.doc_ids, weights=index.tf, minlength=len(index)).astype(np.int64)
    return TokenIdLists(flat, np.concatenate([[0], np.cumsum(lengths)]))


def agreement(index: BM25Index, queries: list[str], ours: list, theirs: np.ndarray, topk: int) -> str:
    """On the queries bm25s can rank as we do (every term known and in under half the passages): how many
    top-k sets are equal, and how many differ only among passages tied with our k-th score to float32."""
    df = np.diff(index.indptr)
    same = tied = eligible = 0
    for query, hits, their_docs in zip(queries, ours, theirs):
        terms = [index.vocab.get(word) for word in tokenize(query)]
        if not terms or None in terms or any(2 * df[t] >= len(index) for t in terms):
            continue
        eligible += 1
        differ = {doc for doc, _ in hits} ^ set(their_docs.tolist())
        scores = index.scores(query)
        same += not differ
        tied += bool(differ) and bool(np.allclose(scores[list(differ)], hits[-1][1], rtol=1e-6, atol=0))
    return f"{same} + {tied} tied / {eligible}"


def bench_scale_one(n: int, folder: str, n_queries: int, topk: int, repeats: int, seed: int) -> dict:
    """One corpus size of the scaling table (run in its own process): build, disk, load, memory, bm25s."""
    queries = zipf_texts(n_queries, 2, 6, seed + 1)
    corpus, index_folder = os.path.join(folder, "corpus.txt"), os.path.join(folder, "index")
    with open(corpus, "w") as file:  # one passage a line, its newline a tab: the build streams it as it would wiki-18
        file.writelines(text.replace("\n", "\t") + "\n" for text in zipf_passages(n, 60, 100, seed))
    reset_peak()
    before_build = rss_mib()
    with open(corpus) as lines:
        build_s, index = timed(lambda: build_index((line[:-1].replace("\t", "\n") for line in lines), index_folder,
                                                   progress=False))
    build_peak = rss_mib("VmHWM") - before_build
    on_disk = {name: os.path.getsize(os.path.join(index_folder, name)) for name in os.listdir(index_folder)}
    probe = subprocess.run([sys.executable, "-m", "tools.bench_search", "--load-probe", index_folder, "--queries",
                            str(n_queries), "--topk", str(topk), "--seed", str(seed)],
                           check=True, capture_output=True, text=True)
    result = {"n": n, "postings": len(index.doc_ids), "terms": len(index.vocab), "build_s": build_s,
              "build_peak": build_peak, "texts_bytes": on_disk["texts.bin"] + on_disk["text_offsets.npy"],
              "index_bytes": sum(size for name, size in on_disk.items() if not name.startswith("text")),
              **json.loads(probe.stdout.splitlines()[-1])}
    try:
        import bm25s  # only here: the benchmark's baseline, never a dependency of search.py
    except ImportError:
        os.remove(corpus)
        return result
    lists = passage_token_ids(index)
    vocab = {index.vocab.term(i).decode(): i for i in range(len(index.vocab))}
    del index  # unmapped while bm25s builds, so its pages are not counted in this process's peak
    handing_s = timed(lambda: [sum(1 for _ in lists) for _ in range(3)])[0]  # bm25s reads its lists 3 times
    retriever = bm25s.BM25(method="robertson")
    bm25s_s = timed(lambda: retriever.index(types.SimpleNamespace(ids=lists, vocab=vocab), show_progress=False))[0]
    del lists
    if n <= STRING_TOKENS_UP_TO:  # as the issue measured: bm25s maps token strings to ids inside its index call
        with open(corpus) as lines:
            tokens = [tokenize(line[:-1].replace("\t", "\n")) for line in lines]
        result["bm25s_strings_s"] = timed(lambda: bm25s.BM25(method="robertson").index(tokens, show_progress=False))[0]
        del tokens
    os.remove(corpus)
    index = load_index(index_folder)
    query_tokens = [tokenize(query) for query in queries]
    index.search(queries[:8], topk)  # warm up both
    retriever.retrieve(query_tokens[:8], k=topk, show_progress=False)
    ours, theirs = [], []
    for _ in range(repeats):  # alternating, so a busy spell on a shared machine hits both
        ours.append(timed(lambda: index.search(queries, topk)))
        theirs.append(timed(lambda: retriever.retrieve(query_tokens, k=topk, show_progress=False)))
    result.update(ours_ms=min(s for s, _ in ours) / n_queries * 1e3,
                  bm25s_ms=min(s for s, _ in theirs) / n_queries * 1e3,
                  bm25s_build_s=bm25s_s, bm25s_handing_s=handing_s,
                  agreement=agreement(index, queries, ours[0][1], theirs[0][1][0], topk),
                  peak=rss_mib("VmHWM"))
    return result


def bench_scaling(sizes: list[int], n_queries: int, topk: int, repeats: int, seed: int) -> None:
    """The on-disk index at each size, each size in a child process, then the 21M extrapolation."""
    rows = []
    for n in sizes:
        folder = tempfile.mkdtemp(prefix=f"bm25-{n}-")
        try:
            child = subprocess.run([sys.executable, "-m", "tools.bench_search", "--scale-one", str(n), "--folder",
                                    folder, "--queries", str(n_queries), "--topk", str(topk),
                                    "--repeats", str(repeats), "--seed", str(seed)],
                                   check=True, capture_output=True, text=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append(json.loads(child.stdout.splitlines()[-1]))
        print(f"<!-- {n:,} passages measured -->", flush=True)
    print_table(f"BM25 on disk: built once, mapped by each process (a fresh process loads it and runs "
                f"{n_queries} queries, top-{topk})",
                ["passages", "postings", "terms", "build s", "build peak RSS MiB", "index MiB on disk",
                 "texts MiB on disk", "load s", "RSS after load MiB", "RSS after search MiB",
                 "first batch ms/query"],
                [[f"{r['n']:,}", f"{r['postings']:,}", f"{r['terms']:,}", f"{r['build_s']:.1f}",
                  f"{r['build_peak']:,.0f}", f"{r['index_bytes'] / MIB:,.0f}", f"{r['texts_bytes'] / MIB:,.0f}",
                  f"{r['load_s']:.3f}", f"{r['rss_load']:.1f}", f"{r['rss_search']:,.0f}", f"{r['first_ms']:.2f}"]
                 for r in rows])
    compared = [r for r in rows if "bm25s_ms" in r]
    if compared:
        print_table("BM25 against bm25s (robertson, numpy backend) on the same tokens and queries, one process",
                    ["passages", "ours ms/query", "bm25s ms/query", "ours / bm25s", "no slower", "ours build s",
                     "bm25s index s from ids (of it: handing lists)", "ours / bm25s", "no slower",
                     "bm25s index s from token strings", "same top-k on eligible queries", "peak RSS MiB, build on"],
                    [[f"{r['n']:,}", f"{r['ours_ms']:.2f}", f"{r['bm25s_ms']:.2f}",
                      f"{r['ours_ms'] / r['bm25s_ms']:.2f}",
                      verdict(r["ours_ms"] <= r["bm25s_ms"]), f"{r['build_s']:.1f}",
                      f"{r['bm25s_build_s']:.1f} ({r['bm25s_handing_s']:.1f})",
                      f"{r['build_s'] / (r['bm25s_build_s'] - r['bm25s_handing_s']):.2f}",
                      verdict(r["build_s"] <= r["bm25s_build_s"] - r["bm25s_handing_s"]),
                      f"{r['bm25s_strings_s']:.1f}" if "bm25s_strings_s" in r else "-", r["agreement"],
                      f"{r['peak']:,.0f}"] for r in compared])
    else:
        print("\n(bm25s is not installed: no comparison)")
    if len(rows) >= 2:
        small, large = rows[-2], rows[-1]
        slope = (large["index_bytes"] - small["index_bytes"]) / (large["n"] - small["n"])
        at_21m = large["index_bytes"] + slope * (21_000_000 - large["n"])
        print(f"\nIndex arrays grow by {slope:.1f} bytes a passage from {small['n']:,} to {large['n']:,} passages; "
              f"at 21,000,000 passages: {large['index_bytes'] / MIB:,.0f} MiB + {slope:.1f} B x "
              f"{21_000_000 - large['n']:,} = {at_21m / 2 ** 30:.2f} GiB, all resident once searches have touched "
              f"every page (this corpus's vocabulary stops at 200k words; wiki-18's keeps growing).")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000",
                        help="comma-separated corpus sizes for the head-to-head with rank-bm25")
    parser.add_argument("--scaling", action="store_true",
                        help="also the on-disk index and bm25s at --scaling-sizes (4M passages takes about 20 minutes)")
    parser.add_argument("--scaling-sizes", default="100000,1000000,4000000",
                        help="comma-separated corpus sizes for the scaling tables; the last two set the 21M slope")
    parser.add_argument("--queries", type=int, default=256, help="queries per batched search")
    parser.add_argument("--baseline-queries", type=int, default=16,
                        help="queries timed on rank-bm25 (it takes a fraction of a second each at 100k)")
    parser.add_argument("--topk", type=int, default=10, help="hits per query")
    parser.add_argument("--repeats", type=int, default=2,
                        help="builds and batched searches timed per size, best kept (the machine may be shared)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus and queries")
    parser.add_argument("--scale-one", type=int, help=argparse.SUPPRESS)  # the child process of --scaling
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--load-probe", help=argparse.SUPPRESS)  # the fresh process that loads an index
    args = parser.parse_args(argv)
    if args.load_probe:
        print(json.dumps(load_probe(args.load_probe, args.queries, args.topk, args.seed)))
        return
    if args.scale_one:
        print(json.dumps(bench_scale_one(args.scale_one, args.folder, args.queries, args.topk, args.repeats,
                                         args.seed)))
        return
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores (load average "
          f"{os.getloadavg()[0]:.1f} at the start)")
    if args.sizes:
        bench_bm25([int(s) for s in args.sizes.split(",")], args.queries, args.baseline_queries, args.topk,
                   args.repeats, args.seed)
    if args.scaling:
        bench_scaling([int(s) for s in args.scaling_sizes.split(",")], args.queries, args.topk, args.repeats,
                      args.seed)


if __name__ == "__main__":
    main()
