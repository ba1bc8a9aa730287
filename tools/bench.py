"""Rollout and update benchmarks, printed as markdown tables, each ratio measured in one process against its
baseline (tools/bench_search.py does the BM25 index).

    python -m tools.bench                          # rollout, then update, on SmolLM2-135M-Instruct (CPU)
    python -m tools.bench --section rollout --threads 1
    python -m tools.bench --model tiny             # a quick check of the code

Rollout section: rollout.py's rollout() of 16 trajectories (--questions synthetic-world questions x
--group-size, few-shot prompt, train.py's defaults for turns, top-k, token budgets and temperature, seeded)
against ONE `model.generate` of the same prompts, left-padded, without the prefix cache, sampling at the same
temperature with top_k 0, and min_new_tokens = max_new_tokens = ceil(the rollout's model-generated tokens /
rows), so it writes as many tokens. Target: rollout / generate <= 1.5. The rollout's wall time is split into
parts that add up to it: forward-pass time from hooks on the model (prefill: a forward over more than one new
position; decode: one position), the rest of generate() (sampling, stop-tag checks), the decoder's turn setup
and shared-prefix encode, search, the rest (splicing observations), and idle padding. Idle padding is
estimated from the episodes: an episode's turns are the runs of 1s in its loss mask; a turn's generate() runs
as long as its longest row, so the decode steps after a row stopped are idle slots, and that share of decode
slot-steps is charged the same share of decode time (a check: the decode steps this implies equal those the
hook counted, unless a token budget cut a turn). The same rollout with TurnDecoder(reuse_cache=False) (each
turn re-encodes the episode so far), and with share_prefix=False and share_repeats=False as well (every turn
re-encodes the few-shot history too, and every row even where it repeats another), shows what each buys.

Update section: update.py's update() (old log-probs of the off-policy mini-batches, then --mini-batches AdamW
steps, micro-batched, DSPO loss; train.py's default flags, --train-args changes them) on the rollout's
episodes with random advantages, against a plain loop over the same collated micro-batches (same shuffle): one
forward, a masked token cross-entropy, a backward, and a plain AdamW step per mini-batch (no old log-probs, no
clipping). Target: update / plain <= 1.2. Then peak memory of update() at micro-batch sizes 1, 4 and 16 with
all trajectories in one mini-batch, each in a freshly spawned process (--memory-processes at a time): RSS
after loading the model, and the RSS high-water mark (VmHWM, reset after the load) during update(). RSS counts
every resident page, torch's allocator included, which tracemalloc does not see.

On a shared 2-core machine, --threads 1 gives steadier times: with torch's two threads and another busy
process, every parallel op waits for the descheduled thread.
"""
import argparse
import datetime
import math
import multiprocessing
import os
import shlex
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from generation import TurnDecoder, end_of_turn_ids
from models import load_model
from prompts import EXAMPLE_NAMES, encode_prompt
from rollout import collate, rollout
from search import BM25Index
from tools.bench_search import MIB, print_table, timed, verdict
from train import parse_args, settings_for
from update import UpdateSettings, update
from world import synthetic_world

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


class TimedIndex:
    """An index whose search() adds the seconds it takes to `seconds`."""

    def __init__(self, index: BM25Index):
        self.index, self.texts, self.seconds = index, index.texts, 0.0

    def search(self, queries, k):
        began = time.perf_counter()
        hits = self.index.search(queries, k)
        self.seconds += time.perf_counter() - began
        return hits


def run_rollout(model, tokenizer, batch, train_args, seed: int, **caches):
    """One seeded, clocked rollout() with train.py's settings and TurnDecoder(**caches):
    (wall s, episodes, timings, forward clock)."""
    index, prompts, group_ids = batch
    decoder, timed_index = TurnDecoder(model, tokenizer, **caches), TimedIndex(index)
    torch.manual_seed(seed)
    with forward_clock(model) as clock:
        wall, episodes = timed(lambda: rollout(
            model, tokenizer, timed_index, prompts, group_ids, max_turns=train_args.max_turns, topk=train_args.topk,
            max_turn_tokens=train_args.max_turn_tokens, max_response_tokens=train_args.max_response_tokens,
            temperature=train_args.temperature, decoder=decoder))
    timings = dict(decoder.seconds, search=timed_index.seconds)
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
            "splice": wall - sum(timings.values()), "prefix": timings["prefix"]}


PART_LABELS = {
    "prefill": "model forward, prefill (prompt, earlier turns)",
    "decode running": "model forward, decode, rows still writing",
    "decode idle": "model forward, decode, idle rows (stopped, padded)",
    "generate other": "generate() outside the forward (sampling, stop-tag checks)",
    "turn setup": "turn setup: padding, cache copy and row selection",
    "search": "search (BM25)",
    "splice": "tokenise + splice observations, other",
    "prefix": "shared-prefix encode",
}


def bench_rollout(model, tokenizer, batch, train_args, seed: int):
    """rollout() with every cache, without the per-episode one, and with none (every row encoded), against one
    generate() of as many tokens."""
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
            run_rollout(model, tokenizer, batch, train_args, seed, reuse_cache=False, share_prefix=False,
                        share_repeats=False)]

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
                ["", "rollout()", "rollout(reuse_cache=False)", "(also share_prefix=False, share_repeats=False)",
                 "one generate(), same tokens"], rows)
    steps, slots, idle = decode_slots(episodes)
    print(f"\nIdle rows (method in the module docstring): {idle} of {slots} decode slot-steps "
          f"({idle / max(slots, 1):.0%}) were spent on rows that had stopped; decode steps implied by the "
          f"episodes {steps}, counted by the forward hook {clock['decode_steps']}.")
    return episodes


# ---------------------------------------------------------------------------------------------
# Update: update.py's update() against a plain forward + backward over the same tokens

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
    """Seconds of one update() call, with a constant learning-rate schedule."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
    settings = settings_for(UpdateSettings, train_args)
    return timed(lambda: update(model, optimizer, scheduler, episodes, advantages, settings, pad_id))[0]


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
    parser.add_argument("--section", choices=["rollout", "update", "all"], default="all",
                        help="which benchmark to run (update runs an untimed rollout for its episodes)")
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
                        help="seed of the world, sampling and advantages")
    args = parser.parse_args()
    for name in ("questions", "group_size", "memory_processes", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores (load average "
          f"{os.getloadavg()[0]:.1f} at the start), torch {torch.__version__}")
    bench_model(args)


if __name__ == "__main__":
    main()
