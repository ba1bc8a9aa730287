"""Benchmarks, printed as markdown tables, each ratio measured in one process against its baseline.

    python bench.py                        # all: BM25, then rollout and update on SmolLM2-135M-Instruct (CPU)
    python bench.py --section bm25         # BM25 only (below)
    python bench.py --section all --model tiny --bm25-sizes 2000    # a quick check of the code

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
With --bm25-scaling, a second table times our index alone up to 1M passages; there the index size is counted
from its arrays and vocabulary (tracemalloc would slow a 1M build several-fold) and is checked against
tracemalloc on the first size.

Rollout section: train.py's rollout() of 16 trajectories (--questions synthetic-world questions x
--group-size, few-shot prompt, train.py's defaults for turns, top-k, token budgets and temperature, seeded)
against ONE `model.generate` of the same prompts, left-padded, without the prefix cache, sampling at the
same temperature with top_k 0, and min_new_tokens = max_new_tokens = ceil(the rollout's model-generated
tokens / rows), so it writes as many tokens. Target: rollout / generate <= 1.5. The rollout's wall time is
split into parts that add up to it: forward-pass time from hooks on the model (prefill: a forward over more
than one new position; decode: one position), the rest of generate() (sampling, stop-tag checks), the
rollout's own "search" and "splice" timings, and idle padding. Idle padding is estimated from the episodes:
an episode's turns are the runs of 1s in its loss mask; a turn's generate() runs as long as its longest row,
so the decode steps after a row stopped are idle slots, and that share of decode slot-steps is charged the
same share of decode time (a check: the decode steps this implies equal those the hook counted, unless a
token budget cut a turn). The same rollout with reuse_cache=False (each turn re-encodes the episode so far),
and with share_prefix=False as well (every turn re-encodes the few-shot history too), shows what each cache
buys.

Update section: train.py's update() (old log-probs of the off-policy mini-batches, then --mini-batches
AdamW steps, micro-batched, DSPO loss; train.py's default flags, --train-args changes them) on the
rollout's episodes with random
advantages, against a plain loop over the same collated micro-batches (same shuffle): one forward,
a masked token cross-entropy, a backward, and a plain AdamW step per mini-batch (no old log-probs, no
clipping). Target: update / plain <= 1.2. Then peak memory of update() at micro-batch sizes 1, 4 and 16
with all trajectories in one mini-batch, each in a freshly spawned process (--memory-processes at a time):
RSS after loading the model, and the RSS high-water mark (VmHWM, reset after the load) during update().
RSS counts every resident page, torch's allocator included, which tracemalloc does not see.

On a shared 2-core machine, --threads 1 gives steadier times: with torch's two threads and another busy
process, every parallel op waits for the descheduled thread (a SmolLM2 decode step: 4.3 s vs 0.5 s).
"""
import argparse
import datetime
import gc
import math
import multiprocessing
import os
import resource
import shlex
import sys
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F
from rank_bm25 import BM25Okapi
from transformers import GenerationConfig

from world import synthetic_world
from rollout import EXAMPLE_NAMES, collate, encode_prompt, end_of_turn_ids, rollout
from search import STOPWORDS, BM25Index, tokenize
from models import load_model
from train import parse_args, update

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


# ---------------------------------------------------------------------------------------------
# Rollout: the multi-turn rollout() against one plain generate() of as many tokens

@contextmanager
def forward_clock(model):
    """Seconds `model` spends in generate() and, within it, in forward passes: prefill (several new
    positions) or decode (one). Forwards outside generate() (the shared-prefix encode) count as outside."""
    clock = {"generate": 0.0, "prefill": 0.0, "decode": 0.0, "decode_steps": 0, "outside": 0.0}
    started, inside = [0.0], [False]

    def before(module, args, kwargs):
        started[0] = time.perf_counter()

    def after(module, args, kwargs, output):
        seconds = time.perf_counter() - started[0]
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not inside[0]:
            clock["outside"] += seconds
        elif ids.shape[1] > 1:
            clock["prefill"] += seconds
        else:
            clock["decode"] += seconds
            clock["decode_steps"] += 1

    generate = model.generate

    def clocked_generate(*args, **kwargs):
        inside[0], start = True, time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            inside[0], clock["generate"] = False, clock["generate"] + time.perf_counter() - start

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    model.generate = clocked_generate  # an instance attribute: rollout() calls it like the method
    try:
        yield clock
    finally:
        del model.generate
        for hook in hooks:
            hook.remove()


def decode_slots(episodes) -> tuple[int, int, int]:
    """(decode steps, decode slot-steps, idle slot-steps) of a rollout, from its episodes alone.

    An episode's turns are the runs of 1s in its loss mask (observations, masked 0, separate them), and
    an episode takes part in every turn until its last. A turn's generate() runs until its longest row
    of L tokens stops: one prefill then L-1 decode steps over all its rows; a row that stopped at its
    s-th token sits idle, padded, for the last L-s of them.
    """
    turns = [[len(list(run)) for bit, run in groupby(e.loss_mask) if bit] for e in episodes]
    steps = slots = idle = 0
    for turn in range(max(len(lengths) for lengths in turns)):
        lengths = [per_episode[turn] for per_episode in turns if len(per_episode) > turn]
        longest = max(lengths)
        steps += longest - 1
        slots += len(lengths) * (longest - 1)
        idle += sum(longest - n for n in lengths)
    return steps, slots, idle


def benchmark_batch(tokenizer, train_args, questions: int, group_size: int, seed: int):
    """(index, prompts, group ids): `questions` synthetic-world questions, `group_size` times each."""
    world = synthetic_world(seed=seed, exclude=EXAMPLE_NAMES)
    chosen = [q for q in world.train[:questions] for _ in range(group_size)]
    prompts = [encode_prompt(tokenizer, q.question, "few-shot", train_args.topk) for q in chosen]
    return BM25Index(world.passages), prompts, [q.id for q in chosen]


def run_rollout(model, tokenizer, batch, train_args, seed: int, **caches):
    """One seeded, clocked rollout() with train.py's settings: (wall s, episodes, timings, forward clock)."""
    index, prompts, group_ids = batch
    torch.manual_seed(seed)
    with forward_clock(model) as clock:
        wall, (episodes, timings) = timed(lambda: rollout(
            model, tokenizer, index, prompts, group_ids, max_turns=train_args.max_turns, topk=train_args.topk,
            max_turn_tokens=train_args.max_turn_tokens, max_response_tokens=train_args.max_response_tokens,
            temperature=train_args.temperature, **caches))
    return wall, episodes, timings, clock


def plain_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int, temperature: float) -> None:
    """One generate() of exactly `new_tokens` sampled tokens a row: left padding, no prefix cache, top_k 0."""
    pad_id = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # [B, P]
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                              temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad_id,
                              eos_token_id=sorted(end_of_turn_ids(tokenizer)))
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    assert out.shape[1] == width + new_tokens, out.shape


def rollout_parts(wall: float, episodes, timings: dict, clock: dict) -> dict:
    """Wall time of one rollout() split into parts that add up to it (seconds)."""
    _, slots, idle = decode_slots(episodes)
    idle_s = clock["decode"] * idle / max(slots, 1)
    return {"prefill": clock["prefill"], "decode running": clock["decode"] - idle_s, "decode idle": idle_s,
            "generate other": clock["generate"] - clock["prefill"] - clock["decode"],
            "turn setup": timings["generate"] - clock["generate"], "search": timings["search"],
            "splice": timings["splice"], "prefix": wall - sum(timings.values())}


PART_LABELS = {
    "prefill": "model forward, prefill (prompt, earlier turns)",
    "decode running": "model forward, decode, rows still writing",
    "decode idle": "model forward, decode, idle rows (stopped, padded)",
    "generate other": "generate() outside the forward (sampling, stop-tag checks)",
    "turn setup": "turn setup: padding, cache copy and row selection",
    "search": "search (BM25)",
    "splice": "tokenise + splice observations",
    "prefix": "shared-prefix encode, other",
}


def bench_rollout(model, tokenizer, batch, train_args, seed: int):
    """rollout() with both caches, without the per-episode one, and with neither, against one generate()
    of as many tokens."""
    _, prompts, _ = batch
    plain_generate(model, tokenizer, prompts[:2], 2, train_args.temperature)  # warm up kernels and allocator
    shared = run_rollout(model, tokenizer, batch, train_args, seed)
    wall, episodes, timings, clock = shared
    generated = sum(sum(e.loss_mask) for e in episodes)
    per_row = math.ceil(generated / len(prompts))
    torch.manual_seed(seed)
    with forward_clock(model) as plain_clock:
        plain_wall = timed(lambda: plain_generate(model, tokenizer, prompts, per_row, train_args.temperature))[0]
    runs = [shared, run_rollout(model, tokenizer, batch, train_args, seed, reuse_cache=False),
            run_rollout(model, tokenizer, batch, train_args, seed, reuse_cache=False, share_prefix=False)]

    columns = [rollout_parts(*run) for run in runs]
    columns.append({"prefill": plain_clock["prefill"], "decode running": plain_clock["decode"],
                    "generate other": plain_wall - plain_clock["prefill"] - plain_clock["decode"]})
    walls = [run[0] for run in runs] + [plain_wall]
    tokens = [sum(sum(e.loss_mask) for e in run[1]) for run in runs] + [f"{len(prompts)} x {per_row}"]
    rows = [["model-generated tokens", *tokens], ["wall s", *(f"{w:.1f}" for w in walls)]]
    for key, label in PART_LABELS.items():
        rows.append([label] + [f"{c[key]:.2f} ({c[key] / w:.0%})" if key in c else "-" for c, w in zip(columns, walls)])
    ratio = shared[0] / plain_wall
    rows.append(["ratio to one generate()", f"**{ratio:.2f}** {verdict(ratio <= 1.5)} (<= 1.5)",
                 *(f"{run[0] / plain_wall:.2f}" for run in runs[1:]), "1.00"])
    print_table(f"Rollout: {len(prompts)} trajectories, train.py defaults (max_turns {train_args.max_turns}, "
                f"topk {train_args.topk}, max_turn_tokens {train_args.max_turn_tokens}, temperature "
                f"{train_args.temperature}), seconds (share of wall)",
                ["", "rollout()", "rollout(reuse_cache=False)", "(also share_prefix=False)",
                 "one generate(), same tokens"], rows)
    steps, slots, idle = decode_slots(episodes)
    print(f"\nIdle rows (method in the module docstring): {idle} of {slots} decode slot-steps "
          f"({idle / max(slots, 1):.0%}) were spent on rows that had stopped; decode steps implied by the "
          f"episodes {steps}, counted by the forward hook {clock['decode_steps']}.")
    return episodes


# ---------------------------------------------------------------------------------------------
# Update: train.py's update() against a plain forward + backward over the same tokens

def plain_update(model, optimizer, episodes, train_args, pad_id: int) -> None:
    """The same collated micro-batches as update() (same shuffle when seeded alike), each through one
    forward, a masked token cross-entropy and a backward; a plain AdamW step per mini-batch."""
    order = torch.randperm(len(episodes)).tolist()
    for chunk in np.array_split(order, min(train_args.mini_batches, len(order))):
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(chunk), train_args.micro_batch):
            micro = [episodes[i] for i in chunk[start:start + train_args.micro_batch]]
            input_ids, attention_mask, loss_mask = collate(micro, pad_id)  # [b, T], [b, T], [b, T-1]
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1),
                                  reduction="none")
            loss = (nll * loss_mask.reshape(-1)).sum() / loss_mask.sum().clamp(min=1)
            (loss * input_ids.shape[0] / len(chunk)).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def new_optimizer(model, train_args):
    return torch.optim.AdamW(model.parameters(), lr=train_args.lr, weight_decay=0.0)


def run_update(model, optimizer, episodes, advantages, train_args, pad_id: int) -> float:
    """Seconds of one train.update() call, with a constant learning-rate schedule."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
    return timed(lambda: update(model, optimizer, scheduler, episodes, advantages, train_args, pad_id))[0]


def bench_update(model, tokenizer, episodes, train_args, seed: int) -> None:
    """update() on the rollout's episodes with random advantages against plain_update(), same process."""
    advantages = torch.randn(len(episodes), generator=torch.Generator().manual_seed(seed))
    optimizer = new_optimizer(model, train_args)
    plain_update(model, optimizer, episodes[:1], train_args, tokenizer.pad_token_id)  # AdamW state, warm-up
    torch.manual_seed(seed)
    plain_s = timed(lambda: plain_update(model, optimizer, episodes, train_args, tokenizer.pad_token_id))[0]
    torch.manual_seed(seed)
    update_s = run_update(model, optimizer, episodes, advantages, train_args, tokenizer.pad_token_id)
    tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    ratio = update_s / plain_s
    print_table(f"Update: {len(episodes)} trajectories, {tokens:,} tokens, --mini-batches "
                f"{train_args.mini_batches} --micro-batch {train_args.micro_batch}, seconds",
                ["update() (old log-probs + clipped DSPO loss)", "plain forward + cross-entropy + backward + AdamW",
                 "ratio", "<= 1.2"],
                [[f"{update_s:.1f}", f"{plain_s:.1f}", f"**{ratio:.2f}**", verdict(ratio <= 1.2)]])


def memory_status() -> dict:
    """This process's resident set size now and its high-water mark, bytes (Linux /proc/self/status)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def update_memory(model_name: str, episodes, train_argv: list[str], micro_batch: int, seed: int,
                  threads: int) -> dict:
    """Run in a fresh process: load the model, reset the RSS high-water mark, run update() as one
    mini-batch at `micro_batch`, and report RSS before it and the high-water mark after it."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, tokenizer = load_model(model_name)
    train_args = parse_args(train_argv + ["--mini-batches", "1", "--micro-batch", str(micro_batch)])
    advantages = torch.randn(len(episodes), generator=torch.Generator().manual_seed(seed))
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS, so loading the model does not set the peak
    before = memory_status()["VmRSS"]
    run_update(model, new_optimizer(model, train_args), episodes, advantages, train_args, tokenizer.pad_token_id)
    return {"before": before, "peak": memory_status()["VmHWM"],
            "weights": sum(p.numel() * p.element_size() for p in model.parameters())}


def bench_update_memory(model_name: str, episodes, train_argv: list[str], micro_batches: list[int],
                        processes: int, seed: int) -> None:
    """Peak RSS of update() per micro-batch size, each in a fresh process, `processes` of them at a time."""
    threads = max(1, torch.get_num_threads() // processes)
    spawn = multiprocessing.get_context("spawn")  # a clean interpreter, not a copy of this one's memory
    with ProcessPoolExecutor(processes, mp_context=spawn, max_tasks_per_child=1) as fresh:
        jobs = [fresh.submit(update_memory, model_name, episodes, train_argv, micro_batch, seed, threads)
                for micro_batch in micro_batches]
        measured = [job.result() for job in jobs]
    rows = []
    for micro_batch, m in zip(micro_batches, measured):
        extra = m["peak"] - m["before"]
        rows.append([micro_batch, f"{m['before'] / MIB:,.0f}", f"{m['peak'] / MIB:,.0f}", f"{extra / MIB:,.0f}",
                     f"{(extra - 3 * m['weights']) / MIB:,.0f}"])
    print_table(f"update() peak memory, --mini-batches 1 (all {len(episodes)} trajectories in one optimizer "
                f"step), MiB. A fresh spawned process per row ({processes} at a time): RSS after loading the "
                "model, then the RSS high-water mark during update() (VmHWM, reset after loading; getrusage's "
                "ru_maxrss would inherit the parent's RSS at fork). It counts every resident page, torch's "
                "allocations included. Activations ~ the increase minus gradients and AdamW's two moments "
                f"(3 x {m['weights'] / MIB:,.0f} MiB of weights)",
                ["micro-batch", "RSS before", "peak RSS", "increase", "activations (est.)"], rows)


def bench_model(args) -> None:
    """The rollout and/or update sections, on one loaded model and one rollout's episodes."""
    train_argv = shlex.split(args.train_args)
    train_args = parse_args(train_argv + ["--device", "cpu"])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    batch = benchmark_batch(tokenizer, train_args, args.questions, args.group_size, args.seed)
    print(f"\nModel sections: {args.model}, {args.questions} questions x {args.group_size} (few-shot), "
          f"{torch.get_num_threads()} torch threads, train.py flags: {train_argv or 'defaults'}")
    if args.section in ("rollout", "all"):
        episodes = bench_rollout(model, tokenizer, batch, train_args, args.seed)
    else:
        episodes = run_rollout(model, tokenizer, batch, train_args, args.seed)[1]
    if args.section in ("update", "all"):
        bench_update(model, tokenizer, episodes, train_args, args.seed)
        micro_batches = [int(m) for m in args.micro_batch_sizes.split(",")]
        bench_update_memory(args.model, episodes, train_argv, micro_batches, args.memory_processes, args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["bm25", "rollout", "update", "all"], default="all",
                        help="which benchmark to run (update runs an untimed rollout for its episodes)")
    # BM25
    parser.add_argument("--bm25-sizes", default="10000,100000",
                        help="comma-separated corpus sizes for the head-to-head with rank-bm25")
    parser.add_argument("--bm25-scaling", action="store_true",
                        help="also run the ours-only scaling table (1M passages takes a few minutes)")
    parser.add_argument("--bm25-scaling-sizes", default="10000,100000,1000000",
                        help="comma-separated corpus sizes for the scaling table")
    parser.add_argument("--queries", type=int, default=256, help="queries per batched search")
    parser.add_argument("--baseline-queries", type=int, default=16,
                        help="queries timed on rank-bm25 (it takes a fraction of a second each at 100k)")
    parser.add_argument("--topk", type=int, default=10, help="hits per query")
    parser.add_argument("--repeats", type=int, default=2,
                        help="builds and batched searches timed per size, best kept (the machine may be shared)")
    # rollout and update
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="model for the rollout and update sections ('tiny': random 2-layer, for checking)")
    parser.add_argument("--questions", type=int, default=4, help="synthetic-world questions in the rollout batch")
    parser.add_argument("--group-size", type=int, default=4, help="trajectories per question")
    parser.add_argument("--train-args", default="",
                        help="train.py flags for rollout() and update(), written --train-args='--micro-batch 8' "
                        "(default: none, train.py's defaults)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 avoids lock-step stalls when another "
                        "process shares the cores")
    parser.add_argument("--micro-batch-sizes", default="1,4,16",
                        help="comma-separated micro-batch sizes for the update() peak-memory table")
    parser.add_argument("--memory-processes", type=int, default=2,
                        help="fresh processes measured at once for that table (each has its own high-water mark)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic corpus and queries, the world, sampling and advantages")
    args = parser.parse_args()
    for name in ("questions", "group_size", "memory_processes", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores (load average "
          f"{os.getloadavg()[0]:.1f} at the start), torch {torch.__version__}")
    if args.section in ("bm25", "all"):
        sizes = [int(s) for s in args.bm25_sizes.split(",")]
        bench_bm25(sizes, args.queries, args.baseline_queries, args.topk, args.repeats, args.seed)
        if args.bm25_scaling:
            scaling = [int(s) for s in args.bm25_scaling_sizes.split(",")]
            bench_bm25_scaling(scaling, args.queries, args.topk, args.seed)
    if args.section != "bm25":
        bench_model(args)


if __name__ == "__main__":
    main()
