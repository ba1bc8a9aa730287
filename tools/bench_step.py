"""Training-step benchmark: train.py's step with and without the speed-ups that remove copies (and, asked for,
the batched refill), in one process, on one model and one world, each for --steps steps of train.py (no
evaluation), printed as a markdown table.

    python -m tools.bench_step                       # SmolLM2-135M-Instruct, 3 steps of each (CPU)
    python -m tools.bench_step --schedules copying,default,batched --model tiny --steps 1

"copying": the defaults with the 2026-12-01 step put back: transformers copies every key/value head once per
query head when a batch is padded (TRANSFORMERS_SDPA_FORCE_GQA=0), the sampler's KV cache concatenates (a
DynamicCache, which copies every cached key and value of every layer each decoding step), every rollout
encodes the shared prompt prefix anew, every row is encoded even where it repeats another (a group's tries
before they differ), the update scores every copy of a trajectory that a group sampled more than once, and
it scores pi_old of the off-policy mini-batch in a pass of its own (--old-logprobs recompute).
"default": the defaults (grouped attention without the copies on CPU, a KV cache with spare room, the prefix
encoded once while the weights stay the same, repeated rows encoded once, identical trajectories of a
mini-batch scored once, pi_old the sampler's own log-probs). "batched": the defaults with --refill batched (one round that oversamples by the
share of groups informative so far, kinds balanced).
A step is its rollout (all rounds) plus its update, as train.py logs them (time/rollout_s, time/update_s).
Schedules that keep different numbers of groups a step are compared by informative groups and trained
trajectories per minute of steps too: the learning a minute buys. Every schedule samples the same
questions with the same seeds, so "copying" and "default" differ in float rounding only.
"""
import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

import generation
import train
import update

# name: (train.py flags, grouped attention without head copies, today's caches and update: the spare-room KV
# cache, the kept prefix, repeated rows encoded once and identical trajectories scored once)
SCHEDULES = {"copying": (["--old-logprobs", "recompute"], False, False), "default": ([], True, True),
             "batched": (["--refill", "batched"], True, True)}


def run_schedule(name: str, model: str, steps: int, seed: int, folder: Path) -> dict:
    """train.main with the schedule's flags and speed-ups for `steps` steps; the per-step means of its metrics."""
    flags, grouped_attention, spare_room = SCHEDULES[name]
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1" if grouped_attention else "0"
    spare_room_cache, prefix_cache = generation.spare_room_cache, generation.prefix_cache
    distinct_trajectories, encode_repeats_once = update.distinct_trajectories, generation.encode_repeats_once
    if not spare_room:  # the sampler's caches become transformers' own, which concatenate, made every rollout
        generation.spare_room_cache = lambda model: generation.DynamicCache()
        def prefix_made_anew(model, prefix):
            generation._last_prefix.clear()
            return prefix_cache(model, prefix)
        generation.prefix_cache = prefix_made_anew
        generation.encode_repeats_once = lambda model, state: state  # every row encoded
        update.distinct_trajectories = lambda episodes, advantages, rows, copies: rows  # every copy scored
    out = folder / name
    try:
        train.main(["--model", model, "--steps", str(steps), "--eval-every", "0", "--seed", str(seed),
                    "--out", str(out), *flags])
    finally:
        generation.spare_room_cache, generation.prefix_cache = spare_room_cache, prefix_cache
        update.distinct_trajectories, generation.encode_repeats_once = distinct_trajectories, encode_repeats_once
        generation._last_prefix.clear()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "time/rollout_s" in r]
    seconds = sum(r["time/rollout_s"] + r["time/update_s"] for r in records)
    group_size = train.parse_args(["--model", model]).group_size
    trained = sum(r["trained_trajectories"] for r in records)
    return {"rollout": np.mean([r["time/rollout_s"] for r in records]),
            "update": np.mean([r["time/update_s"] for r in records]), "step": seconds / len(records),
            "sampled": np.mean([r["sampled_trajectories"] for r in records]),
            "rounds": np.mean([r["num_gen_batches"] for r in records]),
            "trained": trained / len(records), "groups/min": trained / group_size / (seconds / 60),
            "trajectories/min": trained / (seconds / 60)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="model ('tiny' to check the script)")
    p.add_argument("--steps", type=int, default=3, help="training steps of each schedule")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, question order and sampling")
    p.add_argument("--schedules", default="copying,default", help=f"comma-separated, the first the baseline: "
                   f"{', '.join(SCHEDULES)}")
    args = p.parse_args(argv)
    names = args.schedules.split(",")
    unknown = [name for name in names if name not in SCHEDULES]
    if unknown:
        p.error(f"--schedules {args.schedules}: unknown {', '.join(unknown)} (known: {', '.join(SCHEDULES)})")
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.model}, {args.steps} steps of each schedule")
    with tempfile.TemporaryDirectory() as folder:
        rows = {name: run_schedule(name, args.model, args.steps, args.seed, Path(folder)) for name in names}
    keys = [("rollout", "rollout s a step"), ("update", "update s a step"), ("step", "step s"),
            ("rounds", "generation rounds a step"), ("sampled", "trajectories sampled a step"),
            ("trained", "trajectories trained a step"), ("groups/min", "informative groups a minute"),
            ("trajectories/min", "trained trajectories a minute")]
    base = names[0]
    print("\n| | " + " | ".join(names) + " | " + " | ".join(f"{n} / {base}" for n in names[1:]) + " |")
    print("|---|" + "---|" * (2 * len(names) - 1))
    for key, label in keys:
        values = [rows[name][key] for name in names]
        ratios = [value / values[0] if values[0] else float("nan") for value in values[1:]]
        print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " | " +
              " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return rows


if __name__ == "__main__":
    main()
