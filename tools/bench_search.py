"""BM25 benchmark: search.py's index against rank-bm25, printed as markdown tables, ratios in one process.

    python -m tools.bench_search                     # 10k and 100k passages head to head
    python -m tools.bench_search --scaling           # also our index alone up to 1M passages
    python -m tools.bench_search --sizes 2000        # a quick check of the code

BM25 section: our CSR index (search.py) against rank-bm25's `BM25Okapi` in the same process, on a synthetic
corpus with a Zipf-like vocabulary (word rank r drawn with probability ~ 1 / r^1.1, 60-100 tokens a passage)
and 256 queries of 2-6 terms drawn from the same distribution, so frequent terms with long posting lists
appear in queries as often as they would in text. Per corpus size it measures
  (a) query time: one batched `search` of all queries vs `get_scores` + a stable argsort per query;
  (b) build time from raw passages: `BM25Index(texts)` vs `tokenize` every passage + `BM25Okapi(tokens)`;
  (c) memory the built index keeps: tracemalloc's live bytes after the build (which counts numpy buffers),
      minus those before, the passages themselves excluded from both;
  (d) identity: the same top-k passages, scores within 1e-6 relative, for every query timed on rank-bm25.
Targets: (a) >= 50x faster at 100k passages and up, (b) no slower, (c) no larger. Times are wall clock, the
best of --repeats runs with ours and rank-bm25 alternating, since the machine may be shared.
With --scaling, a second table times our index alone up to 1M passages; there the index size is counted
from its arrays and vocabulary (tracemalloc would slow a 1M build several-fold) and is checked against
tracemalloc on the first size.
"""
import argparse
import datetime
import gc
import os
import resource
import sys
import time
import tracemalloc

import numpy as np
from rank_bm25 import BM25Okapi

from search import STOPWORDS, BM25Index, tokenize

MIB = 2 ** 20


def zipf_words(vocab_size: int, rng: np.random.Generator) -> list[str]:
    """`vocab_size` distinct lowercase pseudo-words of 3-9 letters, none of them a stopword."""
    words: set[str] = set()
    while len(words) < vocab_size:
        letters = rng.integers(ord("a"), ord("z") + 1, size=(vocab_size, 9), dtype=np.uint8)
        lengths = rng.integers(3, 10, size=vocab_size)
        words.update(row[:n].tobytes().decode() for row, n in zip(letters, lengths))
        words -= STOPWORDS
    return sorted(words)[:vocab_size]


def zipf_texts(n_texts: int, min_len: int, max_len: int, seed: int, vocab_size: int = 200_000,
               exponent: float = 1.1) -> list[str]:
    """`n_texts` strings of min_len..max_len Zipf-distributed words; the first two words form a title line."""
    # One vocabulary and one rank order for corpus and queries; shuffled so rank is unrelated to spelling.
    words = zipf_words(vocab_size, np.random.default_rng(1234))
    np.random.default_rng(1234).shuffle(words)
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, vocab_size + 1) ** exponent)
    texts = []
    for start in range(0, n_texts, 100_000):  # chunks keep the sampled ids of a 1M corpus small
        lengths = rng.integers(min_len, max_len + 1, size=min(100_000, n_texts - start))
        ranks = np.searchsorted(cdf, rng.random(lengths.sum()) * cdf[-1]).tolist()
        ends = np.cumsum(lengths).tolist()
        for begin, end in zip([0] + ends[:-1], ends):
            title = " ".join(words[r] for r in ranks[begin:begin + 2])
            texts.append(title + "\n" + " ".join(words[r] for r in ranks[begin + 2:end]))
    return texts


def traced_bytes(build) -> tuple[object, int, int]:
    """Run `build()`; return its result, the bytes it left allocated, and the peak bytes during the build."""
    gc.collect()
    tracemalloc.start()
    result = build()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, current, peak


def index_bytes(index: BM25Index) -> int:
    """What the index holds beyond the passages: CSR arrays, vocabulary dict, its keys and values."""
    arrays = index.indptr.nbytes + index.doc_ids.nbytes + index.weights.nbytes
    return arrays + sys.getsizeof(index.vocab) + sum(sys.getsizeof(w) + sys.getsizeof(i) for w, i in index.vocab.items())


def timed(run) -> tuple[float, object]:
    """Wall-clock seconds of `run()`, and its result."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def rank_bm25_build(texts: list[str]) -> BM25Okapi:
    return BM25Okapi([tokenize(text) for text in texts])


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
        postings = index.weights.size
        del index, baseline, baseline_scores

        _, ours_mem, ours_peak = traced_bytes(lambda: BM25Index(texts))
        _, theirs_mem, theirs_peak = traced_bytes(lambda: rank_bm25_build(texts))

        ratio = theirs_q / ours_q
        speed.append(f"| {n:,} | {postings:,} | {ours_q * 1e3:.3f} | {theirs_q * 1e3:.2f} | {ratio:.0f}x | "
                     f"{verdict(ratio >= 50) if n >= 100_000 else '-'} | {topk} | {verdict(identical)} |")
        build.append(f"| {n:,} | {ours_build:.2f} | {theirs_build[1]:.2f} + {theirs_build[2]:.2f} = "
                     f"{theirs_build[0]:.2f} | {ours_build / theirs_build[0]:.2f} | "
                     f"{verdict(ours_build <= theirs_build[0])} |")
        memory.append(f"| {n:,} | {ours_mem / MIB:.1f} | {theirs_mem / MIB:.1f} | {ours_mem / theirs_mem:.2f} | "
                      f"{verdict(ours_mem <= theirs_mem)} | {ours_peak / MIB:.0f} | {theirs_peak / MIB:.0f} |")

    print(f"\n### BM25 query time ({n_queries} queries batched for ours; rank-bm25 timed on the first "
          f"{baseline_queries} and scaled per query)\n")
    print("| passages | postings | ours ms/query | rank-bm25 ms/query | speedup | >=50x | top-k | same top-k |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(speed))
    print("\n### BM25 build time from raw passages, seconds (rank-bm25: tokenize + BM25Okapi)\n")
    print("| passages | ours | rank-bm25 | ours / theirs | no slower |")
    print("|---|---|---|---|---|")
    print("\n".join(build))
    print("\n### BM25 index memory, MiB (tracemalloc: live bytes left by the build; peak during it)\n")
    print("| passages | ours kept | rank-bm25 kept | ours / theirs | no larger | ours peak | rank-bm25 peak |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(memory))


def bench_bm25_scaling(sizes: list[int], n_queries: int, topk: int, seed: int) -> None:
    """Our index alone as the corpus grows: build time, batched query time, index size, process peak RSS."""
    queries = zipf_texts(n_queries, 2, 6, seed + 1)
    rows = []
    for i, n in enumerate(sizes):
        texts = zipf_texts(n, 60, 100, seed)
        build_s, index = timed(lambda: BM25Index(texts))
        index.search(queries[:8], topk)
        search_s = timed(lambda: index.search(queries, topk))[0]
        size = index_bytes(index)
        del index
        if i == 0:  # the cheap count should agree with what tracemalloc sees
            traced = traced_bytes(lambda: BM25Index(texts))[1]
            assert abs(traced - size) < 0.05 * traced + MIB, f"index_bytes {size} vs tracemalloc {traced}"
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux
        rows.append(f"| {n:,} | {build_s:.1f} | {search_s:.2f} | {search_s / n_queries * 1e3:.2f} | "
                    f"{size / MIB:.0f} | {peak_rss:,.0f} |")
        del texts
    print(f"\n### BM25 scaling, ours only ({n_queries} queries batched, top-{topk}; index size counted "
          "from arrays + vocabulary; peak RSS is the process's high-water mark so far: corpus and earlier "
          "sections included)\n")
    print("| passages | build s | search s | ms/query | index MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000",
                        help="comma-separated corpus sizes for the head-to-head with rank-bm25")
    parser.add_argument("--scaling", action="store_true",
                        help="also run the ours-only scaling table (1M passages takes a few minutes)")
    parser.add_argument("--scaling-sizes", default="10000,100000,1000000",
                        help="comma-separated corpus sizes for the scaling table")
    parser.add_argument("--queries", type=int, default=256, help="queries per batched search")
    parser.add_argument("--baseline-queries", type=int, default=16,
                        help="queries timed on rank-bm25 (it takes a fraction of a second each at 100k)")
    parser.add_argument("--topk", type=int, default=10, help="hits per query")
    parser.add_argument("--repeats", type=int, default=2,
                        help="builds and batched searches timed per size, best kept (the machine may be shared)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus and queries")
    args = parser.parse_args(argv)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores (load average "
          f"{os.getloadavg()[0]:.1f} at the start)")
    bench_bm25([int(s) for s in args.sizes.split(",")], args.queries, args.baseline_queries, args.topk,
               args.repeats, args.seed)
    if args.scaling:
        bench_bm25_scaling([int(s) for s in args.scaling_sizes.split(",")], args.queries, args.topk, args.seed)


if __name__ == "__main__":
    main()
