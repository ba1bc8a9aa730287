"""Memory and speed of one DSPO step at real model sizes, with random weights (no downloads).

    python -m tools.bench_scale --model random:Qwen2.5-7B --dtype bfloat16 --rounding kahan
    python -m tools.bench_scale --model random:Qwen2.5-1.5B --dtype float32 --amp

One process, one device: build the model, roll out --questions x --group-size trajectories with train.py's
rollout (rollout.generate_episodes), give each group rewards 1/0 so every trajectory has an advantage, run
update.py's update() once, then roll out again with the optimizer state in memory (the steady state of
training). Reported: generated tokens per second of that second rollout, trajectory tokens per second of
the update (old log-probs plus --mini-batches optimizer steps), and the device's peak allocated memory in
each phase, as one JSON line (appended to --out when given).

A random model never writes </search> or </answer>, so every turn runs to --max-turn-tokens: the rollout
is the longest the budgets allow. The tokenizer is byte-level (see models.py), so prompts and passages
take about four times as many tokens as with Qwen2.5's own tokenizer.
Left out: multi-GPU runs, and comparison with other frameworks.
"""
import argparse
import json
import shlex
import time

import torch

from dspo import group_advantages
from models import checkpoint_activations, load_model
from optimizer import make_optimizer
from rollout import RolloutSettings, generate_episodes
from search import BM25Index
from train import parse_args, settings_for
from update import UpdateSettings, autocast, update
from world import synthetic_world

GIB = 1 << 30


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.startswith("cuda") else float("nan")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reset_peak(device: str) -> None:
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=16, help="questions in the rollout batch")
    parser.add_argument("--group-size", type=int, default=4, help="trajectories per question")
    parser.add_argument("--out", default=None, help="append the result as one JSON line to this file")
    known, rest = parser.parse_known_args(argv)
    # Everything else is train.py's flags, with defaults for a GPU-sized step.
    defaults = ["--template", "zero-shot", "--topk", "3", "--max-turns", "2", "--max-turn-tokens", "256",
                "--max-response-tokens", "2048", "--temperature", "1.0", "--mini-batches", "2",
                "--micro-batch", "8", "--micro-batch-tokens", "16384", "--grad-checkpointing", "--lr", "1e-6",
                "--rollout-batch", "256"]
    args = parse_args(defaults + rest)
    device = args.device
    torch.manual_seed(args.seed)

    began = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype, device)
    if args.grad_checkpointing:
        checkpoint_activations(model)
    optimizer = make_optimizer(model, args.lr, args.rounding)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
    build_s = time.perf_counter() - began
    world = synthetic_world(seed=args.seed)
    index = BM25Index(world.passages)
    questions = world.train[:known.questions]
    examples = [q for q in questions for _ in range(known.group_size)]
    group_ids = [f"{q.id}#{i}" for i, q in enumerate(questions) for _ in range(known.group_size)]
    sampling = settings_for(RolloutSettings, args)

    def timed_rollout():
        reset_peak(device)
        began = time.perf_counter()
        with autocast(torch.device(device).type, args.amp):
            episodes = generate_episodes(model, tokenizer, index, examples, group_ids, sampling)
        synchronize(device)
        return episodes, time.perf_counter() - began, peak_gib(device)

    episodes, first_rollout_s, _ = timed_rollout()
    for i, episode in enumerate(episodes):
        episode.reward = float(i % 2)  # half right in every group: every trajectory is trained on
    advantages = group_advantages(torch.tensor([e.reward for e in episodes]), [e.group_id for e in episodes])
    reset_peak(device)
    began = time.perf_counter()
    metrics = update(model, optimizer, scheduler, episodes, advantages, settings_for(UpdateSettings, args),
                     tokenizer.pad_token_id)
    synchronize(device)
    update_s = time.perf_counter() - began
    update_peak = peak_gib(device)
    tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    # The steady state: the optimizer's state now lives beside the weights while the next rollout runs.
    episodes, rollout_s, rollout_peak = timed_rollout()
    generated = sum(sum(e.loss_mask) for e in episodes)

    result = {
        "model": args.model, "dtype": args.dtype, "amp": args.amp,
        "rounding": args.rounding if args.dtype == "bfloat16" else None,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "trajectories": len(episodes), "flags": shlex.join(defaults + rest),
        "build_s": round(build_s, 1),
        "first_rollout_s": round(first_rollout_s, 1),
        "rollout_s": round(rollout_s, 1), "rollout_generated_tokens": generated,
        "rollout_tokens_per_s": round(generated / rollout_s, 1), "rollout_peak_gib": round(rollout_peak, 2),
        "update_s": round(update_s, 1), "update_tokens": tokens,
        "update_tokens_per_s": round(tokens / update_s, 1), "update_peak_gib": round(update_peak, 2),
        "grad_norm": metrics["grad_norm"], "skipped_optimizer_steps": metrics["skipped_optimizer_steps"],
    }
    print(json.dumps(result))
    if known.out:
        with open(known.out, "a") as out:
            out.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
