"""Sampler gap: how far the log-probs the sampler drew with are from the update's forward pass.

The update takes pi_old of its off-policy mini-batches from the sampler (update.py, --old-logprobs sampler).
That is sound while the two agree to well inside the clip (3e-4 on s_i). This script samples
--questions training questions --group-size times each with train.py's rollout settings, scores the same
ids with the update's forward (dspo.token_logprobs), and prints, over the model's own tokens:

    tokens            model tokens compared
    max / mean gap    largest and mean |sampler - forward| of one token's log-prob
    max |log s_i|     largest |mean over a trajectory's tokens of (sampler - forward)|: the ratio s_i the
                      update would see at step 0 if it used the sampler's values

    python -m tools.sampler_gap                          # the demo's model and settings, float32
    python -m tools.sampler_gap --dtype bfloat16         # bf16 weights: the gap that keeps the scoring pass
    python -m tools.sampler_gap --amp                    # fp32 weights under bf16 autocast (the GPU presets)

Any train.py flag is accepted (--model, --temperature, --group-size, ...).
"""
import argparse

import torch

from dspo import token_logprobs
from generation import shared_prefix_length
from models import load_model, parameter_count
from rollout import RolloutSettings, collate, generate_episodes, sampler_logprobs
from train import load_data, open_index, parse_args, settings_for
from update import autocast


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=8, help="training questions, each sampled --group-size times")
    own, rest = p.parse_known_args(argv)
    args = parse_args(rest)
    args = parse_args(rest, parameter_count(args.model, args.trust_remote_code))
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    model.eval()
    train, _, corpus = load_data(args)
    examples = [q for q in train[:own.questions] for _ in range(args.group_size)]
    device = next(model.parameters()).device
    with autocast(device.type, args.amp):  # as train.py samples
        episodes = generate_episodes(model, tokenizer, open_index(corpus, f"--data {args.data}"), examples,
                                     [f"{q.id}#gap" for q in examples], settings_for(RolloutSettings, args))
    input_ids, attention_mask, mask = collate(episodes, tokenizer.pad_token_id)
    prefix_len = shared_prefix_length([e.prompt_ids for e in episodes])
    with torch.no_grad(), autocast(device.type, args.amp):  # as update.py scores
        forward = token_logprobs(model, input_ids.to(device), attention_mask.to(device), args.temperature,
                                 prefix_len, mask.to(device)).float().cpu()
    difference = (sampler_logprobs(episodes) - forward) * mask  # [B, T-1], 0 off the model's tokens
    gap = {"tokens": int(mask.sum()), "max gap": difference.abs().max().item(),
           "mean gap": (difference.abs().sum() / mask.sum()).item(),
           "max |log s_i|": (difference.sum(1) / mask.sum(1).clamp(min=1)).abs().max().item()}
    print(f"model {args.model} dtype {args.dtype} amp {args.amp}: {len(episodes)} trajectories, " +
          ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in gap.items()))
    return gap


if __name__ == "__main__":
    main()
