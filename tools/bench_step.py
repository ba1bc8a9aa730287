"""Training-step benchmark: refilling in rounds against the batched refill, in one process, on one model and one
world, each for --steps steps of train.py (no evaluation), printed as a markdown table.

    python -m tools.bench_step                       # SmolLM2-135M-Instruct, 3 steps of each (CPU)
    python -m tools.bench_step --model tiny --steps 1

"rounds": train.py's defaults as they were before grouped attention: every round samples B groups, one
round after another, and transformers copies every key/value head once per query head when a batch is
padded (TRANSFORMERS_SDPA_FORCE_GQA=0). "batched": --refill batched (one round that oversamples by the
share of groups kept so far, kinds balanced) with grouped attention without the copies (models.py's
default on CPU). A step is its rollout (all rounds) plus its update, as train.py logs them (time/rollout_s,
time/update_s). The schedules keep different numbers of groups a step, so the table also gives informative
groups and trained trajectories per minute of steps: the learning a minute buys.
"""
import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

import train

SCHEDULES = {"rounds": ["--refill", "rounds"], "batched": ["--refill", "batched"]}


def run_schedule(name: str, model: str, steps: int, seed: int, folder: Path) -> dict:
    """train.main with the schedule's flags for `steps` steps; the per-step means of its metrics."""
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "0" if name == "rounds" else "1"
    out = folder / name
    train.main(["--model", model, "--steps", str(steps), "--eval-every", "0", "--seed", str(seed),
                "--out", str(out), *SCHEDULES[name]])
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="model ('tiny' to check the script)")
    p.add_argument("--steps", type=int, default=3, help="training steps of each schedule")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, question order and sampling")
    args = p.parse_args(argv)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.model}, {args.steps} steps of each schedule")
    with tempfile.TemporaryDirectory() as folder:
        rows = {name: run_schedule(name, args.model, args.steps, args.seed, Path(folder)) for name in SCHEDULES}
    keys = [("rollout", "rollout s a step"), ("update", "update s a step"), ("step", "step s"),
            ("rounds", "generation rounds a step"), ("sampled", "trajectories sampled a step"),
            ("trained", "trajectories trained a step"), ("groups/min", "informative groups a minute"),
            ("trajectories/min", "trained trajectories a minute")]
    print("\n| | rounds | batched | batched / rounds |\n|---|---|---|---|")
    for key, label in keys:
        rounds, batched = rows["rounds"][key], rows["batched"][key]
        print(f"| {label} | {rounds:.2f} | {batched:.2f} | {batched / rounds if rounds else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
