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
import datetime
import itertools
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import (find_checkpoint, lock_run, resume_state, save_checkpoint, saved_run_args, stop_on_signals,
                         trim_metrics)
from data import (DEFAULT_CACHE, FLASHRAG_SPLITS, DataError, load_corpus_jsonl, load_hotpotqa, load_qa_spec,
                  load_search_r1)
from dspo import dspo_loss, fill_batch, grpo_loss, group_advantages, token_logprobs
from evaluate import METHOD_LABELS, evaluate, evaluate_method, generate_episodes, write_eval_report
from models import (DEFAULT_MODEL, all_reduce, checkpoint_activations, gathered, load_model, make_optimizer,
                    parameter_count, shard, world)
from rollout import EXAMPLE_NAMES, collate, shared_prefix_length
from search import BM25Index, estimate_index_bytes
from world import synthetic_world


# Settings that depend on the model's size and the hardware. A flag given on the command line wins over
# the preset; the run prints every value and where it came from. Sources of the values:
# - laptop: SmolLM2-135M on the synthetic world, chosen by the demo runs in results/ (a 135M model reads one
#   passage as well as two and writes noise at temperature 1, so: top-1, short turns, T 0.5, few-shot).
# - the GPU presets: Search-R1's NQ + HotpotQA recipe (group of 5, top-3 passages, up to 4 searches, 500
#   tokens a turn, a 4,096-token context, temperature 1, lr 1e-6 warmed up over 28.5% of the optimizer
#   steps, 2 mini-batches a batch, a zero-shot instruction). Precision: on one GPU, bf16 weights with
#   stochastic rounding, 8 bytes a parameter, is what fits a 7B's update in 80 GB (results/); sharded over
#   several GPUs, fp32 master weights with bf16 compute, exact, 16 bytes a parameter divided among them.
PRESETS = {
    "laptop": dict(dtype="float32", amp=False, rounding="kahan", grad_checkpointing=False, template="few-shot",
                   batch_prompts=4, group_size=4, max_turns=2, topk=1, max_turn_tokens=24,
                   max_response_tokens=320, temperature=0.5, rollout_batch=64, steps=10, lr=5e-6, warmup=0,
                   micro_batch=8, micro_batch_tokens=0, eval_every=5, eval_size=32, save_every=10),
    "one GPU": dict(dtype="bfloat16", amp=False, rounding="stochastic", grad_checkpointing=True,
                    template="zero-shot", batch_prompts=64, group_size=5, max_turns=4, topk=3, max_turn_tokens=500,
                    max_response_tokens=4096, temperature=1.0, rollout_batch=64, steps=500, lr=1e-6, warmup=285,
                    micro_batch=8, micro_batch_tokens=4096, eval_every=50, eval_size=500, save_every=50),
    "many GPUs": dict(dtype="float32", amp=True, rounding="kahan", grad_checkpointing=True, template="zero-shot",
                      batch_prompts=256, group_size=5, max_turns=4, topk=3, max_turn_tokens=500,
                      max_response_tokens=4096, temperature=1.0, rollout_batch=160, steps=500, lr=1e-6, warmup=285,
                      micro_batch=8, micro_batch_tokens=8192, eval_every=50, eval_size=500, save_every=50),
}


def pick_preset(parameters: int, processes: int) -> str:
    """laptop below 1B parameters (whatever the device); above, one GPU or many by the process count."""
    if parameters < 1e9:
        return "laptop"
    return "one GPU" if processes == 1 else "many GPUs"


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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
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
    # rollout
    p.add_argument("--batch-prompts", type=count, help=f"B: informative groups per step {preset}")
    p.add_argument("--group-size", type=_number(int, 2), help="G: trajectories per question (at least 2: a group "
                   f"of one never has differing rewards, so the filter would drop every group) {preset}")
    p.add_argument("--max-turns", type=_number(int, 0),
                   help=f"searches allowed before the last answer-only turn {preset}")
    p.add_argument("--topk", type=count, help=f"passages returned per search {preset}")
    p.add_argument("--max-turn-tokens", type=count, help=f"tokens the model may write per turn {preset}")
    p.add_argument("--max-response-tokens", type=count, help=f"tokens per trajectory after the prompt {preset}")
    p.add_argument("--temperature", type=positive,
                   help=f"sampling temperature; log-probs are taken at the same temperature {preset}")
    p.add_argument("--rollout-batch", type=count, help=f"trajectories generated together {preset}")
    p.add_argument("--max-gen-rounds", type=count, default=3, help="cap on generation rounds to refill filtered groups")
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
    p.add_argument("--micro-batch", type=count, help="trajectories per forward/backward; each pass also encodes the "
                   f"shared prompt prefix once, so larger is faster while memory lasts {preset}")
    p.add_argument("--micro-batch-tokens", type=_number(int, 0),
                   help=f"also cap a micro-batch's padded tokens (rows x longest); 0: no cap {preset}")
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
    args.preset = pick_preset(parameters, processes)
    args.sources = {}
    for name, value in vars(args).copy().items():
        if name in PRESETS[args.preset] and value is None:
            setattr(args, name, PRESETS[args.preset][name])
            args.sources[name] = "preset"
        elif name not in ("preset", "sources"):
            args.sources[name] = "flag" if name in PRESETS[args.preset] or value != p.get_default(name) else "default"
    return args


def preset_help() -> str:
    """--help's table of the presets, one row per setting."""
    names = list(PRESETS)
    lines = ["presets (a flag given overrides its value; the run prints which applied):",
             f"  {'setting':<20}" + "".join(f"{n:>12}" for n in names)]
    lines += [f"  --{key.replace('_', '-'):<18}" + "".join(f"{str(PRESETS[n][key]):>12}" for n in names)
              for key in PRESETS[names[0]]]
    lines.append("laptop: models under 1B parameters; one GPU / many GPUs: 1B and up, one process / torchrun. "
                 "The laptop values come from the demo runs (results/), the GPU ones from Search-R1's recipe and "
                 "the measured one-GPU fit of a 7B (train.py's PRESETS says which).")
    return "\n".join(lines)


def settings_table(args, parameters: int, processes: int) -> str:
    """Every effective setting and where it came from, two to a line, for the start of a run."""
    cells = [f"{name.replace('_', '-'):<20} {str(value):<14} {args.sources[name]:<7}"
             for name, value in vars(args).items() if name in args.sources]
    rows = [" | ".join(cells[i:i + 2]) for i in range(0, len(cells), 2)]
    return (f"preset {args.preset} (a model of {parameters / 1e9:.2f}B parameters, {processes} process"
            f"{'es' if processes > 1 else ''}); settings:\n  " + "\n  ".join(rows))


def state_bytes(parameters: int, dtype: str, amp: bool, rounding: str, processes: int) -> float:
    """Bytes one device holds for weights, gradients and AdamW's moments: 16 a parameter in float32, 10 in
    bf16 with Kahan compensation, 8 in bf16 with stochastic rounding. Sharded over `processes`, each holds its
    share, plus the full parameters it gathers to generate (bf16 with --amp). Activations come on top."""
    per_parameter = 16 if dtype == "float32" else 10 if rounding == "kahan" else 8
    if processes == 1:
        return parameters * per_parameter
    return parameters * (per_parameter / processes + (2 if amp or dtype == "bfloat16" else 4))


def device_bytes(device: str, processes: int) -> float:
    """Memory of one GPU, or this host's RAM shared by the processes on it."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / local


def check_fit(args, parameters: int, processes: int, available: float) -> None:
    """Stop before any weight is read when the weights and optimizer state alone exceed the device."""
    needed = state_bytes(parameters, args.dtype, args.amp, args.rounding, processes)
    if args.eval_only:  # no gradients or optimizer state: the weights, whole on every device to generate
        needed = parameters * (4 if args.dtype == "float32" else 2)
    if needed <= available:
        return
    layout = f"{args.dtype}" + (" + amp" if args.amp else "") + (f" + {args.rounding} rounding"
                                                                  if args.dtype == "bfloat16" else "")
    smallest = state_bytes(parameters, "bfloat16", False, "stochastic", processes)
    advice = "pass --dtype bfloat16 --rounding stochastic (8 bytes a parameter)" if smallest <= available else \
        f"even bf16 with stochastic rounding needs {smallest / 2 ** 30:.0f} GiB: shard it over more GPUs with " \
        "torchrun, or train a smaller model"
    sys.exit(f"error: --model {args.model} ({parameters / 1e9:.1f}B parameters, {layout}) needs about "
             f"{needed / 2 ** 30:.0f} GiB for weights, gradients and AdamW state on each device, more than the "
             f"{available / 2 ** 30:.0f} GiB of {args.device}; {advice}")


def check_paths(args) -> None:
    """Stop in one line naming the flag and the path when an input file is missing or --out cannot be
    written, before anything slow (a model conversion, a download, an index build) has happened. Writing is
    tested by creating a file where the run will, because permission bits say nothing for root."""
    specs = [("--data", args.data)] if args.data not in ("synthetic", "search-r1") else []
    for flag, spec in specs + ([("--eval-data", args.eval_data)] if args.eval_data else []):
        for item in (part.strip() for part in spec.split(",")):
            if item and item not in FLASHRAG_SPLITS and not Path(item).is_file():
                alone = "synthetic or search-r1 alone, or " if flag == "--data" else ""
                sys.exit(f"error: {flag} {item}: no such file, and not a dataset name ({alone}a comma-separated mix "
                         f"of {', '.join(FLASHRAG_SPLITS)} and QA JSONL files)")
    if args.corpus and not Path(args.corpus).is_file():
        sys.exit(f"error: --corpus {args.corpus}: no such file")
    out = Path(args.out)
    folder = next(path for path in [out, *out.parents] if path.exists() or path == path.parent)
    if not folder.is_dir():
        where = "is a file" if folder == out else f"lies under the file {folder}"
        sys.exit(f"error: --out {args.out}: {where}; it must be a folder (made if missing)")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dspo-write-test-"):
            pass
    except OSError as error:
        sys.exit(f"error: --out {args.out}: cannot write in {folder} ({error.strerror})")


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
        if args.data == "search-r1":
            train, test, passages = load_search_r1(DEFAULT_CACHE, eval_only=args.eval_only, corpus=args.corpus)
            if args.eval_data:
                test = load_qa_spec(args.eval_data, "eval", DEFAULT_CACHE)
            return train, test, passages
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

    An episode without model tokens (sum(loss_mask) == 0: a prompt that alone fills the context, kept by
    --no-filter) has no log-prob the loss could move. It is left out before the shuffle, so it gets no forward
    pass and no place in the mean's denominator: the step is exactly the step on the other episodes, and
    `episodes_without_model_tokens` counts what was left out. Every rank holds every episode, so all leave out
    the same ones; a batch with nothing else takes no optimizer step.
    """
    rank, size = world()
    device = next(model.parameters()).device
    with_tokens = [i for i, e in enumerate(episodes) if any(e.loss_mask)]
    without_tokens = len(episodes) - len(with_tokens)
    if without_tokens:
        episodes, advantages = [episodes[i] for i in with_tokens], advantages[with_tokens]
    if not episodes:
        return {"episodes_without_model_tokens": without_tokens, "skipped": 1, "clip_ratio/low_mean": 0.0,
                "clip_ratio/high_mean": 0.0, "skipped_optimizer_steps": 0}
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
                   "skipped_optimizer_steps": skipped, "episodes_without_model_tokens": without_tokens})
    return result


def autocast(args):
    """bf16 compute for --amp on one device; on many, FSDP2's mixed-precision policy does it."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp and world()[1] == 1)


# ---------------------------------------------------------------------------------------------
# The loop

def start_processes(args) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU) and take this
    rank's GPU. Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = args.device.startswith("cuda")
        if cuda:
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=args.dist_timeout))
    return world()


# What --resume does with a setting that differs from the saved run's. NOT_CARRIED_OVER says what this
# command does and where, and always takes today's value, silently. Any other setting not given now
# continues with the saved value. A flag given with a new value: HOW_LONG takes it with a note;
# REFUSED_ON_RESUME stops (the checkpoint's model is what resume loads; another seed reshuffles the data
# mid-epoch or, synthetic, builds another world; the optimizer state was saved for the other weight dtype or
# bf16 rounding; with --eval-only only --model is refused); --lr is applied to the loaded optimizer; every
# other hyperparameter (template, batch shape, clips, loss, warm-up, ...) takes the new value, printed.
NOT_CARRIED_OVER = {"out", "resume", "device", "dist_timeout", "eval_only", "baseline", "trust_remote_code"}
HOW_LONG = {"steps", "max_minutes", "eval_every", "eval_size", "save_every", "keep"}
REFUSED_ON_RESUME = {"model", "seed", "dtype", "rounding"}


def continue_settings(args, saved: dict | None, checkpoint: Path) -> dict[str, str]:
    """Reconcile args with the settings `checkpoint` was saved with (see REFUSED_ON_RESUME); returns, per
    flag given with a new value, a line saying which value is used. Effective values are compared, so a
    flag equal to the saved value (given or from a preset) says nothing."""
    if saved is None:
        return {"run_args": f"--resume: {checkpoint} has no run_args.json (an older checkpoint): the flags given "
                            "now apply"}
    notes = {}
    for name, before in saved.items():
        now = getattr(args, name, before)
        if name not in args.sources or name in NOT_CARRIED_OVER or now == before:
            continue
        flag = f"--{name.replace('_', '-')}"
        if args.sources[name] != "flag":
            setattr(args, name, before)
            args.sources[name] = "resumed"
        elif name in REFUSED_ON_RESUME and (name == "model" or not args.eval_only) and \
                (name != "rounding" or args.dtype == "bfloat16"):
            sys.exit(f"error: {flag} {now}: {checkpoint} was saved by a run with {flag} {before}; a changed {flag} "
                     f"cannot continue it: start a new --out, or drop {flag}")
        else:
            effect = "applied to the optimizer" if name == "lr" else "" if name in HOW_LONG else \
                "a changed hyperparameter"
            notes[name] = f"--resume: {flag} {now} (the saved run had {before}): using {now}" + \
                (f", {effect}" if effect else "")
    return notes


def main(argv=None):
    args = parse_args(argv)  # every flag is checked before anything loads
    check_paths(args)
    out = Path(args.out)
    checkpoint = find_checkpoint(out, args.resume) if args.resume else None
    parameters = parameter_count(str(checkpoint or args.model), args.trust_remote_code)
    args = parse_args(argv, parameters, int(os.environ.get("WORLD_SIZE", "1")))
    changed = continue_settings(args, saved_run_args(checkpoint), checkpoint) if checkpoint else {}
    rank, size = start_processes(args)
    say = tqdm.write if rank == 0 else (lambda *_: None)
    for line in changed.values():
        say(line)
    say(settings_table(args, parameters, size))
    check_fit(args, parameters, size, device_bytes(args.device, size))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # the one process that writes to --out
        lock_run(out)

    model, tokenizer = load_model(str(checkpoint or args.model), args.dtype, args.device, args.trust_remote_code)
    if args.grad_checkpointing:
        checkpoint_activations(model)
    if size > 1:
        shard(model, args.amp)
    train_set, test_set, passages = load_data(args)
    if not args.eval_only and args.batch_prompts > len(train_set):  # each step would ask questions twice over
        fix = f"pass --batch-prompts {len(train_set)} or fewer" if train_set else \
            f"it needs questions beyond the {len(test_set)} held out for evaluation"
        sys.exit(f"error: --batch-prompts {args.batch_prompts} is more than the {len(train_set):,} training questions "
                 f"of --data {args.data}; {fix}")
    if len(passages) > 100_000:
        say(f"BM25 index: about {estimate_index_bytes(passages) / 2 ** 30:.1f} GiB for {len(passages):,} passages")
    try:
        index = BM25Index(passages)
    except ValueError as error:
        sys.exit(f"error: {args.corpus or args.data}: {error}")
    eval_set = take_in_turn(test_set, args.eval_size) if args.eval_size else test_set
    data = "the synthetic world of world.py (--data search-r1 for NQ + HotpotQA over wiki-18)" \
        if args.data == "synthetic" else args.data
    say(f"model {args.model} ({args.template}), data {data}: {len(train_set)} train / {len(test_set)} test "
        f"questions, {len(passages)} passages, device {args.device}" + (f", {size} processes" if size > 1 else ""))

    if args.eval_only:  # baselines first, as published tables order their rows
        with gathered(model), autocast(args):
            results = {METHOD_LABELS[method]: evaluate_method(model, tokenizer, index, eval_set, args, args.template,
                                                              method) for method in [*args.baseline, "agent"]}
        if rank == 0:
            say(write_eval_report(out, results))
        return results

    optimizer = make_optimizer(model, args.lr, args.rounding)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / (args.warmup + 1)))
    start, data_state = 0, {"epoch": 0, "position": 0}
    if checkpoint:
        start, data_state = resume_state(checkpoint, model, optimizer, scheduler,
                                         args.lr if "lr" in changed else None)
        dropped = trim_metrics(out / "metrics.jsonl", start) if rank == 0 else 0
        if dropped:
            say(f"metrics.jsonl: {dropped} line(s) from step {start} on moved to metrics.dropped.jsonl (they are "
                "written again)")
        say(f"resumed from {checkpoint} at step {start}")

    serial = [0]  # makes group ids unique even if a question comes back; reset from the step (resume)

    def sample_round():
        questions = next_questions(train_set, args.batch_prompts, data_state, args.seed)
        examples = [q for q in questions for _ in range(args.group_size)]
        group_ids = [f"{q.id}#{serial[0] + i}" for i, q in enumerate(questions) for _ in range(args.group_size)]
        serial[0] += len(questions)
        with gathered(model), autocast(args):
            episodes = generate_episodes(model, tokenizer, index, examples, group_ids, args, args.template)
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
                    record.update(evaluate(model, tokenizer, index, eval_set, args, args.template))
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
                save_checkpoint(out, step + 1, model, tokenizer, optimizer, scheduler, data_state, args.keep,
                                {name: getattr(args, name) for name in args.sources})
            if stopping:
                say(f"stopped by signal after step {step}; checkpoint saved, resume with --resume")
                break


def collective_failure(error: Exception) -> str | None:
    """One line for a collective that timed out or lost a peer (gloo raises a plain RuntimeError); else None."""
    text = str(error)
    if not dist.is_initialized() or not (isinstance(error, dist.DistError) or any(
            mark in text for mark in ("Timed out", "timed out", "Connection closed by peer", "NCCL"))):
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0])  # drop gloo's [source:line] prefix
    rank, size = world()
    return (f"error: rank {rank} of {size}: a collective failed ({detail}); another rank is stuck or has died "
            "(see its output); --dist-timeout sets how long a rank waits")


def run(argv=None):
    """main() as a command: a failed collective ends the process with one line instead of a traceback."""
    try:
        main(argv)
    except RuntimeError as error:
        line = collective_failure(error)
        if line is None:
            raise
        sys.exit(line)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run()
