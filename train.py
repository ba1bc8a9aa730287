"""Train a search agent with DSPO: sample, search, score, filter, and update with a sequence-level ratio.

    python train.py                                   # SmolLM2-135M-Instruct on the synthetic world, CPU
    python train.py --model Qwen2.5-7B --data nq,hotpotqa --corpus wiki18.jsonl --dtype bfloat16 \
        --rounding stochastic --grad-checkpointing --device cuda         # one GPU
    torchrun --nproc_per_node 8 train.py --model Qwen2.5-7B --amp ...      # FSDP2 over 8 GPUs

Each step: sample B questions, roll out G trajectories each (rollout.py, with BM25 from search.py),
score them by exact match (reward.py), drop groups whose rewards are all equal and sample more until B
informative groups are in hand or --max-gen-rounds is reached, then take --mini-batches optimizer steps
on the clipped sequence-level loss (dspo.py). Later mini-batches are off-policy, which is what the clip
is for; their old log-probs are computed once, before the first step.

Under torchrun every rank samples its share of each round's groups and all ranks see every episode, so
the filter and advantages judge whole groups; the update splits each mini-batch across ranks (FSDP2).

Simplifications, on purpose: no reference model and no KL term (as in the paper), a constant learning
rate after an optional linear warm-up, and a full-parameter AdamW update (models.py says how bf16
weights keep small updates).
"""
import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import find_checkpoint, resume_state, save_checkpoint, stop_on_signals
from data import DEFAULT_CACHE, FLASHRAG_SPLITS, DataError, load_corpus_jsonl, load_hotpotqa, load_qa_spec
from dspo import dspo_loss, fill_batch, grpo_loss, group_advantages, token_logprobs
from evaluate import METHOD_LABELS, evaluate, evaluate_method, generate_episodes, write_eval_report
from models import DEFAULT_MODEL, all_reduce, checkpoint_activations, gathered, load_model, make_optimizer, shard, world
from rollout import EXAMPLE_NAMES, collate, shared_prefix_length
from search import BM25Index, estimate_index_bytes
from world import synthetic_world


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # model
    p.add_argument("--model", default=DEFAULT_MODEL, help="SmolLM2-135M-Instruct (embedded), a short name like "
                   "Qwen2.5-7B(-Instruct), any hub id or local path, or 'tiny' (random, for tests)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weight dtype; bfloat16 weights are trained by BF16AdamW so small updates are not lost")
    p.add_argument("--amp", action="store_true", help="bf16 compute over float32 master weights (GPU)")
    p.add_argument("--rounding", default="kahan", choices=["kahan", "stochastic"],
                   help="how BF16AdamW keeps sub-rounding updates: a bf16 compensation buffer (about 16 significant "
                   "bits, +2 bytes a parameter) or unbiased random rounding (8 bytes a parameter in all)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward pass: less memory, ~30%% more compute")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run Python code shipped with a hub model (off: weights and configs only)")
    p.add_argument("--template", default="auto", choices=["auto", "few-shot", "zero-shot"],
                   help="prompt: two worked episodes in the chat (small models) or an instruction (7B); "
                   "auto picks few-shot for models under 1B parameters")
    # data
    p.add_argument("--data", default="synthetic",
                   help="'synthetic'; 'hotpotqa' (official distractor files, their paragraphs the corpus); or a "
                   "comma-separated mix of FlashRAG names (nq, triviaqa, hotpotqa, 2wikimultihopqa, musique, ...) "
                   "and QA JSONL paths, with --corpus. Downloads are cached in $DSPO_CACHE (~/.cache/dspo)")
    p.add_argument("--eval-data", default=None,
                   help="FlashRAG names / QA paths to evaluate on (default: the test or dev split of --data)")
    p.add_argument("--corpus", default=None, help="corpus JSONL (wiki-18 or title/text shape); needed with QA files")
    p.add_argument("--seed", type=int, default=0, help="seeds the world, the question order and sampling")
    # rollout
    p.add_argument("--batch-prompts", type=int, default=4, help="B: informative groups per step")
    p.add_argument("--group-size", type=int, default=4, help="G: trajectories per question")
    p.add_argument("--max-turns", type=int, default=2, help="searches allowed before the last answer-only turn")
    p.add_argument("--topk", type=int, default=1, help="passages returned per search (1: a 135M model reads one "
                   "passage as well as two, and a rollout is 30%% faster)")
    p.add_argument("--max-turn-tokens", type=int, default=24, help="tokens the model may write per turn")
    p.add_argument("--max-response-tokens", type=int, default=320, help="tokens per trajectory after the prompt")
    p.add_argument("--temperature", type=float, default=0.5, help="sampling temperature (log-probs use the same); "
                   "at 1.0 SmolLM2-135M's tail writes noise: 0 of 32 right and 69%% truncated, 2 of 32 and 6%% at 0.5")
    p.add_argument("--rollout-batch", type=int, default=64, help="trajectories generated together")
    p.add_argument("--max-gen-rounds", type=int, default=3, help="cap on generation rounds to refill filtered groups")
    # optimisation
    p.add_argument("--steps", type=int, default=10, help="training steps (10: the laptop demo, 13 minutes with its "
                   "evaluations on 2 CPU cores as measured in README)")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="wall-clock budget of this process's training loop (evaluations included): after the step "
                   "that crosses it, evaluate, save and stop (0: no budget; equal-time comparisons)")
    p.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate (5e-6: SmolLM2-135M's held-out EM rises "
                   "within 8 steps; at 1e-5 its training reward fell to 0.04 by step 6; about 1e-6 for 7B models)")
    p.add_argument("--loss", default="dspo", choices=["dspo", "grpo"], help="sequence-level DSPO or token-level GRPO")
    p.add_argument("--no-filter", action="store_true", help="keep zero-variance groups (ablation)")
    p.add_argument("--clip-low", type=float, default=3e-4, help="DSPO: s_i is clipped below at 1 - clip_low")
    p.add_argument("--clip-high", type=float, default=4e-4, help="DSPO: s_i is clipped above at 1 + clip_high")
    p.add_argument("--grpo-clip", type=float, default=0.2, help="GRPO: per-token ratio clip")
    p.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per batch of rollouts (the second is "
                   "off-policy, where the clip acts; at eps 4e-4 later ones are mostly clipped)")
    p.add_argument("--micro-batch", type=int, default=8, help="trajectories per forward/backward; each pass also "
                   "encodes the shared prompt prefix once, so larger is faster while memory lasts")
    p.add_argument("--micro-batch-tokens", type=int, default=0,
                   help="also cap a micro-batch's padded tokens (rows x longest); 0: no cap")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--warmup", type=int, default=0, help="optimizer steps of linear learning-rate warm-up")
    # evaluation and output
    p.add_argument("--eval-every", type=int, default=5,
                   help="evaluate on the held-out split every N steps and after the last (0: never)")
    p.add_argument("--eval-size", type=int, default=32,
                   help="held-out questions per evaluation, taken in turn from each source (0: all)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate --model (or --resume) greedily; write eval.json and the table eval.md")
    p.add_argument("--baseline", action="append", default=[], choices=["direct", "rag"],
                   help="with --eval-only, also a baseline row with the same model and index: answer without "
                   "search, or from the question's own top-k passages (repeatable)")
    p.add_argument("--out", default="runs/dspo", help="folder for metrics.jsonl, checkpoints, eval.json")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint folder, or the latest one in --out")
    args = p.parse_args(argv)
    if args.data not in ("synthetic", "hotpotqa") and not args.corpus:
        p.error("--corpus is required when --data names QA files or FlashRAG datasets")
    if args.data == "synthetic" and args.eval_data:
        p.error("--eval-data needs --data other than synthetic (the world has its own test split)")
    for name in ("batch_prompts", "group_size", "mini_batches", "micro_batch", "rollout_batch", "max_gen_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_data(args):
    """(train examples, test examples, passages); user data errors end the run with one line.

    synthetic: the generated world and its own split. hotpotqa without --corpus: the official distractor
    files, train on train, evaluate on dev, the corpus their paragraphs. Otherwise FlashRAG names and/or QA
    files with --corpus: evaluation on --eval-data, else on the test (or dev) split of the same datasets,
    else (a file among them) on a seeded 10% of the training questions, held out.
    """
    if args.data == "synthetic":
        world = synthetic_world(seed=args.seed, exclude=EXAMPLE_NAMES)
        return world.train, world.test, world.passages
    try:
        if args.data == "hotpotqa" and not args.corpus:
            train, test, passages = load_hotpotqa(DEFAULT_CACHE)
            if args.eval_data:
                test = load_qa_spec(args.eval_data, "eval", DEFAULT_CACHE)
            return train, test, passages
        passages = load_corpus_jsonl(args.corpus)
        if args.eval_only:
            return [], load_qa_spec(args.eval_data or args.data, "eval", DEFAULT_CACHE), passages
        train = load_qa_spec(args.data, "train", DEFAULT_CACHE)
        if args.eval_data or all(item.strip() in FLASHRAG_SPLITS for item in args.data.split(",")):
            return train, load_qa_spec(args.eval_data or args.data, "eval", DEFAULT_CACHE), passages
    except DataError as error:
        sys.exit(f"error: {error}")
    order = random.Random(args.seed).sample(train, len(train))
    held_out = max(1, len(order) // 10)  # at least one question
    return order[held_out:], order[:held_out], passages


# ---------------------------------------------------------------------------------------------
# Sampling, scoring, evaluation

def take_in_turn(examples, count: int):
    """The first `count` examples taking one from each source in turn, so every dataset of a mixed
    evaluation set is represented (its own order kept within a source)."""
    by_source = {}
    for example in examples:
        by_source.setdefault(example.source, []).append(example)
    interleaved = [x for row in itertools.zip_longest(*by_source.values()) for x in row if x is not None]
    return interleaved[:count]


def next_questions(train_set, count: int, state: dict, seed: int):
    """The next `count` questions of a per-epoch shuffle; `state` (epoch, position) is checkpointed."""
    chosen = []
    while len(chosen) < count:
        order = random.Random(seed * 100003 + state["epoch"]).sample(range(len(train_set)), len(train_set))
        take = order[state["position"]:state["position"] + count - len(chosen)]
        chosen += [train_set[i] for i in take]
        state["position"] += len(take)
        if state["position"] >= len(train_set):
            state["epoch"], state["position"] = state["epoch"] + 1, 0
    return chosen


def rollout_stats(groups) -> dict:
    """What the policy did this step, over every trajectory sampled (all rounds, filtered ones too)."""
    every = [e for group in groups for e in group]
    rewards = torch.tensor([e.reward for e in every])
    generated, total = sum(sum(e.loss_mask) for e in every), sum(len(e.response_ids) for e in every)
    return {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(every) > 1 else 0.0,
            "frac_reward_zero_std": float(np.mean([len({e.reward for e in g}) == 1 for g in groups])),
            "num_turns/mean": float(np.mean([e.num_turns for e in every])),
            "env/number_of_valid_search": float(np.mean([e.valid_searches for e in every])),
            "env/finished": float(np.mean([e.finished for e in every])),
            "env/truncated": float(np.mean([e.truncated for e in every])),
            "response_length/mean": float(np.mean([len(e.response_ids) for e in every])),
            "state_tokens/coverage": generated / max(1, total)}


# ---------------------------------------------------------------------------------------------
# The update

def micro_batches(rows: list[int], lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Split rows into micro-batches of at most max_rows rows and (when max_tokens > 0) at most max_tokens
    padded tokens, longest first so each micro-batch pads little."""
    batches = []
    for row in sorted(rows, key=lambda r: -lengths[r]):
        if batches and len(batches[-1]) < max_rows and \
                (not max_tokens or (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens):
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def update(model, optimizer, scheduler, episodes, advantages, args, pad_id, step: int = 0) -> dict:
    """Old log-probs once (for the off-policy mini-batches), then --mini-batches optimizer steps
    (micro-batched) on a shuffled batch.

    With W ranks each takes every W-th trajectory of a mini-batch; FSDP2 averages gradients over ranks, so
    a trajectory's loss is weighted W / (mini-batch size) and the step equals one process's. Every rank
    runs the same number of forward/backward passes (a rank short of work repeats one with weight 0),
    because each pass gathers parameters collectively.
    """
    rank, size = world()
    device = next(model.parameters()).device
    # The same shuffle on every rank, and the same after a resume.
    order = torch.randperm(len(episodes), generator=torch.Generator().manual_seed(args.seed * 100003 + step))
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in episodes]
    share_prefix = size == 1 and not args.grad_checkpointing
    plan = []  # per mini-batch: [(episode indices, weight)], the same count on every rank
    for chunk in np.array_split(order.tolist(), min(args.mini_batches, len(order))):
        mine = micro_batches(chunk.tolist()[rank::size], lengths, args.micro_batch, args.micro_batch_tokens)
        mine = [(rows, size * len(rows) / len(chunk)) for rows in mine]
        count = all_reduce(len(mine), "max")
        mine += [([chunk[0]], 0.0)] * (count - len(mine))
        plan.append(mine)

    def batch(rows):
        tensors = [t.to(device) for t in collate([episodes[i] for i in rows], pad_id)]
        # The prefix pass needs a KV cache, which checkpointed layers do not return; and with several ranks
        # every pass must be one forward per module.
        prefix_len = shared_prefix_length([episodes[i].prompt_ids for i in rows]) if share_prefix else 0
        return (*tensors, advantages[rows].to(device), prefix_len)

    def logprobs(rows):  # logits only where the loss reads: the model's own tokens
        input_ids, attention_mask, loss_mask, _, prefix_len = batch(rows)
        return token_logprobs(model, input_ids, attention_mask, args.temperature, prefix_len, loss_mask)

    with torch.no_grad(), gathered(model), autocast(args):
        # pi_old, the policy that sampled this batch: [rows, T-1] per micro-batch, scored before the first
        # optimizer step. The first mini-batch is on-policy, so its pi_old is its own forward's log-probs,
        # detached (None here), and needs no pass of its own.
        old_logps = [[None] * len(plan[0])] + [[logprobs(rows) for rows, _ in mine] for mine in plan[1:]]

    sums, steps, skipped, ratio_min, ratio_max = {}, 0, 0, math.inf, -math.inf
    model.train(args.grad_checkpointing)  # HF checkpoints layers only in train mode; dropout is off anyway
    for mine, old in tqdm(list(zip(plan, old_logps)), desc="update", leave=False, dynamic_ncols=True,
                          disable=rank != 0):
        optimizer.zero_grad(set_to_none=True)
        for (rows, weight), old_logp in zip(mine, old):
            input_ids, attention_mask, loss_mask, adv, prefix_len = batch(rows)
            with autocast(args):
                logp = token_logprobs(model, input_ids, attention_mask, args.temperature, prefix_len, loss_mask)
            old_logp = logp.detach() if old_logp is None else old_logp
            if args.loss == "dspo":
                loss, metrics = dspo_loss(logp, old_logp, loss_mask, adv, args.clip_low, args.clip_high)
            else:
                loss, metrics = grpo_loss(logp, old_logp, loss_mask, adv, args.grpo_clip)
            # The objective is a mean over the mini-batch's trajectories, accumulated micro-batch by micro-batch.
            (loss * weight).backward()
            low, high = metrics.pop("ratio/min"), metrics.pop("ratio/max")
            if weight:
                ratio_min, ratio_max = min(ratio_min, low), max(ratio_max, high)
            for key, value in dict(metrics, loss=loss.item()).items():  # every rank has every key
                sums[key] = sums.get(key, 0.0) + value * weight / size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm / size
        if math.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
        else:  # a NaN/inf gradient would poison the weights: drop this step, keep going
            skipped += 1
        steps += 1
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    sums = all_reduce(sums, "sum")
    result = {f"{k}_mean" if k.startswith("clip_ratio") else k: v / steps for k, v in sums.items()}
    result.update({"ratio/min": -all_reduce(-ratio_min, "max"), "ratio/max": all_reduce(ratio_max, "max"),
                   "skipped_optimizer_steps": skipped})
    return result


def autocast(args):
    """bf16 compute for --amp on one device; on many, FSDP2's mixed-precision policy does it."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp and world()[1] == 1)


# ---------------------------------------------------------------------------------------------
# The loop

def pick_template(template: str, model) -> str:
    """--template auto: worked examples for models under 1B parameters, the bare instruction above."""
    if template != "auto":
        return template
    return "few-shot" if sum(p.numel() for p in model.parameters()) < 1e9 else "zero-shot"


def start_processes(args) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU) and take this
    rank's GPU. Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = args.device.startswith("cuda")
        if cuda:
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return world()


def main(argv=None):
    args = parse_args(argv)
    rank, size = start_processes(args)
    say = tqdm.write if rank == 0 else (lambda *_: None)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = find_checkpoint(out, args.resume) if args.resume else None

    model, tokenizer = load_model(str(checkpoint or args.model), args.dtype, args.device, args.trust_remote_code)
    template = pick_template(args.template, model)
    if args.grad_checkpointing:
        checkpoint_activations(model)
    if size > 1:
        shard(model, args.amp)
    train_set, test_set, passages = load_data(args)
    if len(passages) > 100_000:
        say(f"BM25 index: about {estimate_index_bytes(passages) / 2 ** 30:.1f} GiB for {len(passages):,} passages")
    try:
        index = BM25Index(passages)
    except ValueError as error:
        sys.exit(f"error: {args.corpus or args.data}: {error}")
    eval_set = take_in_turn(test_set, args.eval_size) if args.eval_size else test_set
    say(f"model {args.model} ({template}), {len(train_set)} train / {len(test_set)} test questions, "
        f"{len(passages)} passages, device {args.device}" + (f", {size} processes" if size > 1 else ""))

    if args.eval_only:  # baselines first, as published tables order their rows
        with gathered(model), autocast(args):
            results = {METHOD_LABELS[method]: evaluate_method(model, tokenizer, index, eval_set, args, template,
                                                              method) for method in [*args.baseline, "agent"]}
        if rank == 0:
            say(write_eval_report(out, results))
        return results

    optimizer = make_optimizer(model, args.lr, args.rounding)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / (args.warmup + 1)))
    start, data_state = 0, {"epoch": 0, "position": 0}
    if checkpoint:
        start, data_state = resume_state(checkpoint, model, optimizer, scheduler)
        say(f"resumed from {checkpoint} at step {start}")

    serial = [0]  # makes group ids unique even if a question comes back; reset from the step (resume)

    def sample_round():
        questions = next_questions(train_set, args.batch_prompts, data_state, args.seed)
        examples = [q for q in questions for _ in range(args.group_size)]
        group_ids = [f"{q.id}#{serial[0] + i}" for i, q in enumerate(questions) for _ in range(args.group_size)]
        serial[0] += len(questions)
        with gathered(model), autocast(args):
            episodes = generate_episodes(model, tokenizer, index, examples, group_ids, args, template)
        return [episodes[i:i + args.group_size] for i in range(0, len(episodes), args.group_size)]

    log = open(out / "metrics.jsonl", "a") if rank == 0 else open(os.devnull, "w")
    with stop_on_signals() as stop, log:
        loop_began, out_of_time = time.perf_counter(), False
        for step in range(start, args.steps + 1):
            record = {"step": step}
            serial[0] = step * args.batch_prompts * args.max_gen_rounds
            last = step == args.steps or out_of_time
            if args.eval_every and (step % args.eval_every == 0 or last):
                with gathered(model), autocast(args):
                    record.update(evaluate(model, tokenizer, index, eval_set, args, template))
            if last:  # the final line holds the evaluation of the trained model only
                if len(record) > 1:
                    log.write(json.dumps(record) + "\n")
                break
            began = time.perf_counter()
            kept, rounds, sampled = fill_batch(sample_round, args.batch_prompts, args.max_gen_rounds,
                                               use_filter=not args.no_filter)
            record["time/rollout_s"] = time.perf_counter() - began
            trained = [e for group in kept for e in group]
            record.update(rollout_stats(sampled), num_gen_batches=rounds, trained_trajectories=len(trained))
            began = time.perf_counter()
            if trained:
                rewards = torch.tensor([e.reward for e in trained])
                advantages = group_advantages(rewards, [e.group_id for e in trained])
                record["frac_zero_advantage"] = (advantages == 0).float().mean().item()
                record.update(update(model, optimizer, scheduler, trained, advantages, args,
                                     tokenizer.pad_token_id, step))
            else:  # every group was uninformative even after the refill cap: nothing to learn from
                record.update({"skipped": 1, "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0})
            record["time/update_s"] = time.perf_counter() - began
            log.write(json.dumps(record) + "\n")
            log.flush()
            say(f"step {step:4d} reward {record['reward']:.3f} rounds {rounds} trained {len(trained):3d} "
                f"searches {record['env/number_of_valid_search']:.2f} "
                f"clip {record['clip_ratio/low_mean']:.2f}/{record['clip_ratio/high_mean']:.2f} "
                f"rollout {record['time/rollout_s']:.0f}s update {record['time/update_s']:.0f}s"
                + (f" val/em {record['val/em']:.3f}" if "val/em" in record else ""))
            stopping = all_reduce(len(stop), "max") > 0  # every rank stops after the same step
            spent = time.perf_counter() - loop_began
            out_of_time = all_reduce(int(bool(args.max_minutes) and spent >= 60 * args.max_minutes), "max") > 0
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stopping or out_of_time:
                save_checkpoint(out, step + 1, model, tokenizer, optimizer, scheduler, data_state, args.keep)
            if stopping:
                say(f"stopped by signal after step {step}; checkpoint saved, resume with --resume")
                break


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
