"""Train a search agent with DSPO: sample, search, score, filter, and update with a sequence-level ratio.

    python train.py                                             # SmolLM2-135M-Instruct, synthetic world, CPU
    python train.py --model Qwen2.5-7B --data search-r1         # one GPU (the preset picks precision etc.)
    torchrun --nproc_per_node 8 train.py --model Qwen2.5-7B --data search-r1      # FSDP2 over 8 GPUs

Each step: sample B questions, roll out G trajectories each (rollout.py, with BM25 from search.py),
score them by exact match (reward.py), drop groups whose rewards are all equal and sample more until B
informative groups are in hand or --max-gen-rounds is reached (dspo.py), then take --mini-batches
optimizer steps on the clipped sequence-level loss (update.py). Evaluation runs every --eval-every steps
and once more after the last.

Under torchrun every rank samples its share of each round's groups and all ranks see every episode, so
the filter and advantages judge whole groups; the update splits each mini-batch across ranks (FSDP2).

Simplifications, on purpose: no reference model and no KL term (as in the paper), a constant learning
rate after an optional linear warm-up, and a full-parameter update (optimizer.py says how bf16 weights
keep small updates). This is the one file that reads command-line flags; settings.py decides their values.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoints import (find_checkpoint, lock_run, resume_state, save_checkpoint, saved_run_args,
                         set_aside_earlier_run, set_aside_later_checkpoints, stop_on_signals,
                         trim_metrics)
from data import (DEFAULT_CACHE, FLASHRAG_SPLITS, DataError, iter_corpus_jsonl, load_hotpotqa, load_qa_spec,
                  load_search_r1, next_questions, questions_by_kind, take_in_turn)
from distributed import all_reduce, collective_failure, destroy_processes, gathered, shard, start_processes
from dspo import fill_batch, group_advantages, informative
from evaluate import METHOD_LABELS, evaluate, evaluate_method, write_eval_report
from models import DEFAULT_MODEL, checkpoint_activations, load_model, parameter_count
from optimizer import make_optimizer
from prompts import EXAMPLE_NAMES
from reward import score_episodes
from rollout import RolloutSettings, generate_episodes
from index_files import cached_index
from search import BM25Index
from settings import (CHANGES_EVALUATION, apply_preset, check_fit, check_paths, continue_settings, device_bytes,
                      preset_help, settings_table)
from update import UpdateSettings, autocast, update
from world import synthetic_world


# ---------------------------------------------------------------------------------------------
# Flags

def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: a finite `kind` within [low, high] ((low, high] with low_open), else a one-line error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return parse


def _device(text):
    """An argparse type: cpu, or a CUDA (or MPS) device this machine has, else a one-line error."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:<index> or mps, got {text!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return text


def parse_args(argv=None, parameters: int = 0, processes: int = 1):
    """The flags; every setting of PRESETS that no flag gave comes from the preset for a model of `parameters`
    on `processes` processes. args.preset names it; args.sources[name] is "flag", "preset" or "default"."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=preset_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    count, positive, share = _number(int, 1), _number(float, 0, low_open=True), _number(float, 0, 1, low_open=True)
    preset = "(default: from the preset)"
    # model
    p.add_argument("--model", default=DEFAULT_MODEL, help="SmolLM2-135M-Instruct (embedded), a short name like "
                   "Qwen2.5-7B(-Instruct), any hub id or local path, or 'tiny' (random, for tests)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help=f"weight dtype; bfloat16 weights are trained by BF16AdamW so small updates are not lost "
                   f"{preset}")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help=f"bf16 compute over float32 master weights {preset}")
    p.add_argument("--rounding", choices=["kahan", "stochastic"],
                   help="how BF16AdamW keeps sub-rounding updates: a bf16 compensation buffer (about 16 significant "
                   f"bits, +2 bytes a parameter) or unbiased random rounding (8 bytes a parameter in all) {preset}")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help=f"recompute each layer's activations in the backward pass: less memory, more compute {preset}")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cpu, cuda (cuda:<index>) or mps; default cuda where there is one")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run Python code shipped with a hub model (off: weights and configs only)")
    p.add_argument("--template", choices=["few-shot", "zero-shot"],
                   help=f"prompt: two worked episodes in the chat (small models ignore a bare instruction) or a "
                   f"Search-R1-style instruction {preset}")
    p.add_argument("--dist-timeout", type=positive, default=30,
                   help="minutes a collective may wait under torchrun before the run stops with an error naming "
                   "the rank (rank 0 writing a large checkpoint is the longest wait)")
    # data
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (the world of world.py, no downloads); 'search-r1' (NQ + HotpotQA train, the "
                   "seven evaluation sets and the wiki-18 corpus, downloaded once); 'hotpotqa' (official distractor "
                   "files, their paragraphs the corpus); or a comma-separated mix of FlashRAG names (nq, triviaqa, "
                   "hotpotqa, 2wikimultihopqa, musique, ...) and QA JSONL paths, with --corpus. Downloads are "
                   "cached in $DSPO_CACHE (~/.cache/dspo)")
    p.add_argument("--eval-data", default=None,
                   help="FlashRAG names / QA paths to evaluate on (default: the test or dev split of --data)")
    p.add_argument("--corpus", default=None, help="corpus JSONL or JSONL.gz (wiki-18 or title/text shape); needed "
                   "with QA files; with --data search-r1 a local copy of wiki-18 instead of the download")
    p.add_argument("--seed", type=int, default=0, help="seeds the world, the question order and sampling")
    p.add_argument("--fact-order", choices=["fixed", "shuffled"], default="fixed",
                   help="synthetic world only: a passage's facts in the world's order, or in a new order at every "
                   "retrieval, seeded like sampling, so where a fact sits says nothing about which it is (fixed: "
                   "the order the demo's recorded runs read)")
    # rollout
    p.add_argument("--batch-prompts", type=count, help=f"B: informative groups per step {preset}")
    p.add_argument("--group-size", type=_number(int, 2), help="G: trajectories per question (at least 2: a group "
                   f"of one never has differing rewards, so the filter would drop every group) {preset}")
    p.add_argument("--max-turns", type=_number(int, 0),
                   help=f"turns before the last one, each a search or an invalid action (corrected); a search "
                   f"on the last turn ends the episode unanswered {preset}")
    p.add_argument("--topk", type=count, help=f"passages returned per search {preset}")
    p.add_argument("--max-turn-tokens", type=count, help=f"tokens the model may write per turn {preset}")
    p.add_argument("--max-response-tokens", type=count, help=f"tokens per trajectory after the prompt {preset}")
    p.add_argument("--temperature", type=positive,
                   help=f"sampling temperature; log-probs are taken at the same temperature {preset}")
    p.add_argument("--rollout-batch", type=count, help=f"trajectories generated together {preset}")
    p.add_argument("--max-gen-rounds", type=count, default=3, help="cap on generation rounds to refill filtered "
                   "groups; all rounds of a step sample at most B times this many groups")
    p.add_argument("--refill", choices=["batched", "rounds"], default="rounds",
                   help="rounds: every round samples B groups of the shuffled questions, one round after another (the "
                   "demo's tested schedule); batched: a round samples B / (informative share so far) groups at "
                   "once, each kind of question in proportion to how rarely it is informative, at most B / kinds "
                   "kept of one kind")
    # optimisation
    p.add_argument("--steps", type=_number(int, 0), help=f"training steps {preset}")
    p.add_argument("--max-minutes", type=_number(float, 0), default=0,
                   help="wall-clock budget of this process's training loop (evaluations included): after the step "
                   "that crosses it, evaluate, save and stop (0: no budget; equal-time comparisons)")
    p.add_argument("--lr", type=positive, help=f"AdamW learning rate {preset}")
    p.add_argument("--loss", default="dspo", choices=["dspo", "grpo"], help="sequence-level DSPO or token-level GRPO")
    p.add_argument("--no-filter", action="store_true", help="keep zero-variance groups (ablation)")
    p.add_argument("--clip-low", type=share, default=3e-4, help="DSPO: s_i is clipped below at 1 - clip_low")
    p.add_argument("--clip-high", type=positive, default=4e-4, help="DSPO: s_i is clipped above at 1 + clip_high")
    p.add_argument("--grpo-clip", type=share, default=0.2, help="GRPO: per-token ratio clip")
    p.add_argument("--mini-batches", type=count, default=2, help="optimizer steps per batch of rollouts (the second "
                   "is off-policy, where the clip acts)")
    p.add_argument("--micro-batch", type=count, help="distinct trajectories per forward/backward; one process "
                   f"without --grad-checkpointing encodes their shared prompt prefix once a pass, so larger is faster "
                   f"while memory lasts {preset}")
    p.add_argument("--micro-batch-tokens", type=_number(int, 0),
                   help=f"also cap a micro-batch's padded tokens (rows x longest); 0: no cap {preset}")
    p.add_argument("--old-logprobs", choices=["sampler", "recompute"],
                   help="pi_old of the off-policy mini-batches: the log-probs the sampler drew with, or a forward "
                   "pass before the first optimizer step (default: sampler with --dtype float32 and no --amp, "
                   "recompute otherwise, where bf16 rounding in the sampler differs by more than the clip; "
                   "episodes without sampler log-probs are always scored)")
    p.add_argument("--grad-clip", type=positive, default=1.0, help="max gradient norm")
    p.add_argument("--warmup", type=_number(int, 0), help=f"optimizer steps of linear learning-rate warm-up {preset}")
    # evaluation and output
    p.add_argument("--eval-every", type=_number(int, 0),
                   help=f"evaluate on the held-out split every N steps and after the last (0: never) {preset}")
    p.add_argument("--eval-size", type=_number(int, 0),
                   help=f"held-out questions per evaluation, taken in turn from each source (0: all) {preset}")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate --model (or --resume) greedily; write eval.json and the table eval.md")
    p.add_argument("--baseline", action="append", default=[], choices=["direct", "rag"],
                   help="with --eval-only, also a baseline row with the same model and index: answer without "
                   "search, or from the question's own top-k passages (repeatable)")
    p.add_argument("--out", default="runs/dspo", help="folder for metrics.jsonl, checkpoints, eval.json")
    p.add_argument("--save-every", type=count, help=f"checkpoint every N steps (and at the end) {preset}")
    p.add_argument("--keep", type=count, default=2, help="checkpoints kept")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint folder, or the latest one in --out")
    args = p.parse_args(argv)
    if args.data not in ("synthetic", "hotpotqa", "search-r1") and not args.corpus:
        p.error("--corpus is required when --data names QA files or FlashRAG datasets")
    if args.data == "synthetic" and args.eval_data:
        p.error("--eval-data needs --data other than synthetic (the world has its own test split)")
    if args.data != "synthetic" and args.fact_order == "shuffled":
        p.error(f"--fact-order shuffled needs --data synthetic (its passages are written one fact a line), not "
                f"--data {args.data}")
    apply_preset(args, p, parameters, processes)
    follow_compute_dtype(args)
    return args


def follow_compute_dtype(args) -> None:
    """--old-logprobs, unless given: the sampler's log-probs when the model computes in float32 (--dtype
    float32, no --amp), a scoring pass otherwise. Derived again after --resume has settled dtype and amp."""
    if args.sources["old_logprobs"] != "flag":
        args.old_logprobs = "sampler" if args.dtype == "float32" and not args.amp else "recompute"
        args.sources["old_logprobs"] = "default"


# ---------------------------------------------------------------------------------------------
# Data

def load_data(args):
    """(train examples, test examples, corpus); user data errors end the run with one line. The corpus is a
    list of passages when it is small and made here, else the path of a corpus file (see open_index).

    synthetic: the generated world and its own split. hotpotqa without --corpus: the official distractor
    files, train on train, evaluate on dev, the corpus their paragraphs. search-r1: NQ + HotpotQA, the seven
    evaluation sets, wiki-18. Otherwise FlashRAG names and/or QA files with --corpus: evaluation on
    --eval-data, else on the test (or dev) split of the same datasets, else (a file among them) on a seeded
    10% of the training questions, held out.
    """
    if args.data == "synthetic":
        world = synthetic_world(seed=args.seed, exclude=EXAMPLE_NAMES, split_facts=args.fact_order == "shuffled")
        return world.train, world.test, world.passages
    try:
        if args.data in ("search-r1", "hotpotqa") and not (args.data == "hotpotqa" and args.corpus):
            train, test, corpus = load_search_r1(DEFAULT_CACHE, eval_only=args.eval_only, corpus=args.corpus) \
                if args.data == "search-r1" else load_hotpotqa(DEFAULT_CACHE)
            if args.eval_data:
                test = load_qa_spec(args.eval_data, "eval", DEFAULT_CACHE)
            return train, test, corpus
        corpus = Path(args.corpus)
        if args.eval_only:
            return [], load_qa_spec(args.eval_data or args.data, "eval", DEFAULT_CACHE), corpus
        train = load_qa_spec(args.data, "train", DEFAULT_CACHE)
        if args.eval_data or all(item.strip() in FLASHRAG_SPLITS for item in args.data.split(",")):
            return train, load_qa_spec(args.eval_data or args.data, "eval", DEFAULT_CACHE), corpus
    except DataError as error:
        sys.exit(f"error: {error}")
    order = random.Random(args.seed).sample(train, len(train))
    held_out = max(1, len(order) // 10)  # at least one question
    return order[held_out:], order[:held_out], corpus


def open_index(corpus, name: str) -> BM25Index:
    """The BM25 index of `corpus`: built in memory from a list of passages; for a corpus file, built once
    into $DSPO_CACHE/index/ and mapped from there by every later run and by every process of this host
    (index_files.cached_index). A corpus that cannot be indexed ends the run with one line naming `name`."""
    try:
        if isinstance(corpus, list):
            return BM25Index(corpus)
        path = Path(corpus).resolve()
        folder = DEFAULT_CACHE / "index" / f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        return cached_index(path, folder, iter_corpus_jsonl)
    except ValueError as error:  # DataError included: a bad line of the corpus file
        sys.exit(f"error: {name}: {error}")
    except OSError as error:  # a full or read-only disk under the cache
        sys.exit(f"error: {name}: cannot write its index under {DEFAULT_CACHE / 'index'} (DSPO_CACHE moves it): "
                 f"{error.strerror or error}")


def rollout_stats(groups) -> dict:
    """What the policy did this step, over every trajectory sampled (all rounds, filtered ones too)."""
    every = [e for group in groups for e in group]
    rewards = torch.tensor([e.reward for e in every])
    generated, total = sum(sum(e.loss_mask) for e in every), sum(len(e.response_ids) for e in every)
    return {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(every) > 1 else 0.0,
            "frac_reward_zero_std": float(np.mean([not informative([e.reward for e in g]) for g in groups])),
            "num_turns/mean": float(np.mean([e.num_turns for e in every])),
            "env/number_of_valid_search": float(np.mean([e.valid_searches for e in every])),
            "env/finished": float(np.mean([e.finished for e in every])),
            "env/truncated": float(np.mean([e.truncated for e in every])),
            "response_length/mean": float(np.mean([len(e.response_ids) for e in every])),
            "state_tokens/coverage": generated / max(1, total)}


def settings_for(kind, args):
    """A RolloutSettings or UpdateSettings holding the values of the flags of the same names."""
    return kind(**{field.name: getattr(args, field.name) for field in fields(kind)})


# ---------------------------------------------------------------------------------------------
# The loop

def main(argv=None):
    # Arguments: every flag is checked before anything loads; the preset depends on the model's size.
    args = parse_args(argv)
    check_paths(args.data, args.eval_data, args.corpus, args.out)
    out = Path(args.out)
    checkpoint = find_checkpoint(out, args.resume) if args.resume else None
    parameters = parameter_count(str(checkpoint or args.model), args.trust_remote_code)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    args = parse_args(argv, parameters, processes)
    changed = continue_settings(args, saved_run_args(checkpoint), checkpoint, processes) if checkpoint else {}
    follow_compute_dtype(args)  # a resumed run may compute in another precision than the saved one
    rank, size, args.device = start_processes(args.device, args.dist_timeout)
    say = tqdm.write if rank == 0 else (lambda *_: None)
    for line in changed.values():
        say(line)
    say(settings_table(args, parameters, size))
    check_fit(args.model, parameters, args.dtype, args.amp, args.rounding, args.eval_only, size, args.device,
              device_bytes(args.device, size))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # the one process that writes to --out
        lock_run(out)

    # Data, model and index. The questions come first: a download that fails stops the run before the
    # weights load (minutes at 7B).
    train_set, test_set, corpus = load_data(args)
    if not args.eval_only and args.batch_prompts > len(train_set):  # each step would ask questions twice over
        fix = f"pass --batch-prompts {len(train_set)} or fewer" if train_set else \
            f"it needs questions beyond the {len(test_set)} held out for evaluation"
        sys.exit(f"error: --batch-prompts {args.batch_prompts} is more than the {len(train_set):,} training questions "
                 f"of --data {args.data}; {fix}")
    if rank == 0:  # after the input is known good, so a run that stops on it leaves the earlier one resumable
        # A run resumed from a checkpoint of another folder is a new run here: it shares no log with what is here.
        continues = checkpoint and checkpoint.resolve().parent == out.resolve()
        aside = None if continues or args.eval_only else set_aside_earlier_run(out)
        if aside:
            say(f"--out {out}: an earlier run's metrics and checkpoints moved to {aside} (--resume continues a run)")
    model, tokenizer = load_model(str(checkpoint or args.model), args.dtype, args.device, args.trust_remote_code)
    if args.grad_checkpointing:
        checkpoint_activations(model)
    if size > 1:
        shard(model, args.amp)
    index = open_index(corpus, args.corpus or f"--data {args.data}")
    eval_set = take_in_turn(test_set, args.eval_size) if 0 < args.eval_size < len(test_set) else test_set
    data = "the synthetic world of world.py (--data search-r1 for NQ + HotpotQA over wiki-18)" \
        if args.data == "synthetic" else args.data
    say(f"model {args.model} ({args.template}), data {data}: {len(train_set)} train / {len(test_set)} test "
        f"questions, {len(index.texts):,} passages, device {args.device}" + (f", {size} processes" if size > 1 else ""))
    sampling, device_type = settings_for(RolloutSettings, args), torch.device(args.device).type

    if args.eval_only:  # baselines first, as published tables order their rows
        with gathered(model), autocast(device_type, args.amp):
            results = {METHOD_LABELS[method]: evaluate_method(model, tokenizer, index, eval_set, sampling, method)
                       for method in [*args.baseline, "agent"]}
        if rank == 0:
            say(write_eval_report(out, results))
        return results

    # Optimizer, and where a resumed run left off
    optimizer = make_optimizer(model, args.lr, args.rounding)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / (args.warmup + 1)))
    start, data_state, evaluated = 0, {"epoch": 0, "position": 0}, False
    if checkpoint:
        start, data_state = resume_state(checkpoint, model, optimizer, scheduler,
                                         args.lr if "lr" in changed else None)
        dropped, evaluation_line = trim_metrics(out / "metrics.jsonl", start) if rank == 0 else (0, None)
        if dropped:
            say(f"metrics.jsonl: {dropped} line(s) from step {start} on moved to metrics.dropped.jsonl (they are "
                "written again)")
        abandoned = set_aside_later_checkpoints(out, start) if rank == 0 else None
        if abandoned:
            say(f"--out {out}: the checkpoints past step {start} moved to {abandoned} (those steps are run again)")
        # The run that saved this checkpoint evaluated it as it ended: that line stands for this step's evaluation
        # unless a setting that changes an evaluation changed. Every rank must agree (evaluating is collective).
        same = "run_args" not in changed and not set(changed) & CHANGES_EVALUATION  # an older checkpoint: unknown
        evaluated = all_reduce(int(evaluation_line is not None and same), "max") > 0
        logged = f" (its evaluation is logged already: val/em {evaluation_line['val/em']:.3f})" \
            if evaluated and evaluation_line else ""
        say(f"resumed from {checkpoint} at step {start}{logged}")

    def evaluation() -> dict:
        began = time.perf_counter()
        with gathered(model), autocast(device_type, args.amp):
            result = evaluate(model, tokenizer, index, eval_set, sampling)
        return {**result, "time/eval_s": time.perf_counter() - began}

    # Each kind of question (its source: synthetic-1hop, nq, ...) is read from its own shuffle and keeps its
    # own count of groups sampled and kept, so a round can ask each kind in proportion to how rarely the filter
    # keeps it: a kind the untrained model seldom gets right still reaches the update.
    by_kind = {}
    for question in train_set:
        by_kind.setdefault(question.source, []).append(question)
    kinds = data_state.setdefault("kinds", {kind: {"epoch": 0, "position": 0, "sampled": 0, "informative": 0}
                                            for kind in sorted(by_kind)})
    source = {}  # group id -> its question's kind, for fill_batch's balance and the log (this step's groups)

    def informative_share(kind: str) -> float:
        """The share of the kind's groups so far that were informative (passed the filter, whether or not the
        batch still had room for them; resumed runs included), from a prior of one in three."""
        return (kinds[kind]["informative"] + 1) / (kinds[kind]["sampled"] + 3)

    def sample_round(step: int, round_: int, count: int) -> list[list]:
        """Round `round_` of step `step`: `count` new questions, G scored trajectories each, as groups. With the
        batched refill each kind is asked in proportion to 1 / its informative share, else the next of one shuffle.
        Group ids stay unique if a question comes back, and on resume unless --batch-prompts or
        --max-gen-rounds changed (rounds then number groups from another origin; names stay unique in a step)."""
        if args.refill == "batched" and not args.no_filter:
            weights = {kind: 1 / informative_share(kind) for kind in by_kind}
            questions = questions_by_kind(by_kind, weights, count, kinds, args.seed)
        else:
            questions = next_questions(train_set, count, data_state, args.seed)
        examples = [q for q in questions for _ in range(args.group_size)]
        # Rounds of B number their groups one after another across the run (sampling seeds come from group ids,
        # so this keeps the draws of the recorded demo runs); a batched round names step, round and place.
        first = (step * args.max_gen_rounds + round_) * args.batch_prompts
        names = [f"{first + i}" if args.refill == "rounds" else f"{step}.{round_}.{i}" for i in range(len(questions))]
        group_ids = [f"{q.id}#{name}" for q, name in zip(questions, names) for _ in range(args.group_size)]
        with gathered(model), autocast(device_type, args.amp):
            episodes = generate_episodes(model, tokenizer, index, examples, group_ids, sampling)
        score_episodes(episodes, examples)
        source.update({gid: q.source for gid, q in zip(group_ids, examples)})
        return [episodes[i:i + args.group_size] for i in range(0, len(episodes), args.group_size)]

    def informative_rate() -> float:
        """The share of a round's groups the filter is expected to keep when each kind is asked in proportion to
        1 / its informative share: the harmonic mean of the kinds' shares."""
        return len(kinds) / sum(1 / informative_share(kind) for kind in kinds)

    learning = settings_for(UpdateSettings, args)
    log = open(out / "metrics.jsonl", "a") if rank == 0 else open(os.devnull, "w")
    with stop_on_signals() as stop, log:
        loop_began, done = time.perf_counter(), start
        for step in range(start, args.steps):
            record = {"step": step}
            if args.eval_every and step % args.eval_every == 0 and not (step == start and evaluated):
                record.update(evaluation())

            # Sample, and refill until B informative groups are in hand
            began = time.perf_counter()
            source.clear()
            kept, rounds, sampled = fill_batch(lambda round_, count: sample_round(step, round_, count),
                                               args.batch_prompts, args.max_gen_rounds,
                                               informative_rate() if args.refill == "batched" else None,
                                               use_filter=not args.no_filter,
                                               kind=lambda group: source[group[0].group_id],
                                               per_kind=math.ceil(args.batch_prompts / len(by_kind))
                                               if args.refill == "batched" else None)
            for group in sampled:
                kinds[source[group[0].group_id]]["sampled"] += 1
                kinds[source[group[0].group_id]]["informative"] += informative([e.reward for e in group])
            record["time/rollout_s"] = time.perf_counter() - began
            trained = [e for group in kept for e in group]
            for kind in [source[group[0].group_id] for group in kept]:  # kept groups by kind of question
                record[f"kept/{kind}"] = record.get(f"kept/{kind}", 0) + 1
            record.update(rollout_stats(sampled), num_gen_batches=rounds, trained_trajectories=len(trained),
                          sampled_trajectories=sum(len(group) for group in sampled))

            # Advantages and the update (nothing to learn from if every group was uninformative)
            began = time.perf_counter()
            if trained:
                rewards = torch.tensor([e.reward for e in trained])
                advantages = group_advantages(rewards, [e.group_id for e in trained])
                record["frac_zero_advantage"] = (advantages == 0).float().mean().item()
                record.update(update(model, optimizer, scheduler, trained, advantages, learning,
                                     tokenizer.pad_token_id, step))
            else:
                record["skipped"] = 1
            record["time/update_s"] = time.perf_counter() - began
            record["time/loop_s"] = spent = time.perf_counter() - loop_began  # the clock --max-minutes reads

            # Log
            log.write(json.dumps(record) + "\n")
            log.flush()
            clip = f"clip {record['clip_ratio/low_mean']:.2f}/{record['clip_ratio/high_mean']:.2f}" \
                if "clip_ratio/low_mean" in record else "no update"
            say(f"step {step:4d} reward {record['reward']:.3f} rounds {rounds} trained {len(trained):3d} "
                f"searches {record['env/number_of_valid_search']:.2f} {clip} "
                f"rollout {record['time/rollout_s']:.0f}s update {record['time/update_s']:.0f}s"
                + (f" val/em {record['val/em']:.3f}" if "val/em" in record else ""))

            # Checkpoint; stop on a signal (every rank after the same step) or when out of time
            done = step + 1
            stopping = all_reduce(len(stop), "max") > 0
            out_of_time = all_reduce(int(bool(args.max_minutes) and spent >= 60 * args.max_minutes), "max") > 0
            if done % args.save_every == 0 or done == args.steps or stopping or out_of_time:
                save_checkpoint(out, done, model, tokenizer, optimizer, scheduler, data_state, args.keep,
                                {**{name: getattr(args, name) for name in args.sources}, "processes": size})
            if stopping:
                say(f"stopped by signal after step {step}; checkpoint saved, resume with --resume")
                return
            if out_of_time:
                break

        # The trained model's evaluation, on a line of its own
        if args.eval_every and start <= args.steps and not (done == start and evaluated):
            log.write(json.dumps({"step": done, **evaluation()}) + "\n")


def run(argv=None):
    """main() as a command: a failed collective ends the process with one line instead of a traceback."""
    try:
        main(argv)
    except RuntimeError as error:
        line = collective_failure(error)
        if line is None:
            raise
        sys.exit(line)
    destroy_processes()


if __name__ == "__main__":
    run()
