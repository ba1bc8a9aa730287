"""The policy update: one batch of scored episodes -> old log-probs -> mini-batches of clipped-loss steps.

    pi_old   log-probs of the policy that sampled the batch: the first mini-batch is on-policy, its pi_old
             its own forward, detached; later ones take the sampler's own log-probs (old_logprobs "sampler",
             float32 compute) or are scored once before the first optimizer step ("recompute", bf16)
    for each of M mini-batches (a shuffle of the batch split M ways; identical trajectories in it, same
                                tokens, mask and advantage, are scored once, the advantage times their count):
        for each micro-batch (rows and padded tokens capped, longest first): loss (dspo.py) and backward,
            weighted so the step's loss is the mean over the mini-batch's trajectories
        clip the gradient norm, one optimizer step (skipped if the gradient is not finite)

Later mini-batches are off-policy, which is what the clip is for. The sampler computed every sampled token's
log-prob already; in float32 it equals the update's forward up to rounding (~1e-6, against a clip of 3e-4),
so no pass is spent on it. In bf16 the sampler's cached, batched decoding rounds differently from the
update's forward by more than the clip, so pi_old is scored by the update's own forward there. Either way
`sampler_logp_gap` logs the largest difference on the on-policy mini-batch. Under torchrun each rank takes every W-th
distinct trajectory of a mini-batch and FSDP2 averages gradients over ranks. Left out: gradient accumulation
across batches, a value function, a KL penalty.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from distributed import all_reduce, gathered, rank_and_size
from dspo import dspo_loss, grpo_loss, token_logprobs
from generation import shared_prefix_length
from rollout import collate, sampler_logprobs


@dataclass
class UpdateSettings:
    """What the update needs to know (train.py fills it from its flags)."""
    loss: str                 # "dspo" (sequence-level) or "grpo" (token-level)
    clip_low: float           # DSPO: s_i is clipped below at 1 - clip_low
    clip_high: float          # DSPO: s_i is clipped above at 1 + clip_high
    grpo_clip: float          # GRPO: per-token ratio clip
    mini_batches: int         # optimizer steps per batch
    micro_batch: int          # distinct trajectories per forward/backward (copies are scored once)
    micro_batch_tokens: int   # cap on a micro-batch's padded tokens (0: none)
    grad_clip: float          # max gradient norm
    temperature: float        # the sampling temperature: log-probs are taken at it
    old_logprobs: str         # pi_old of later mini-batches: "sampler" (its log-probs) or "recompute" (a pass)
    amp: bool                 # bf16 autocast over fp32 weights
    grad_checkpointing: bool  # recompute activations in the backward pass
    seed: int                 # seeds the shuffle, with the step


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


def distinct_trajectories(episodes, advantages, rows: list[int], copies: torch.Tensor) -> list[int]:
    """The first of each set of rows with the same tokens, loss mask and advantage, in order; adds to
    copies[first] (in place) one for every other row of its set. A group often samples the same trajectory
    twice, and k copies are one term of the loss counted k times, so the update scores each once, its
    advantage multiplied by k."""
    first = {}
    for i in rows:
        key = (tuple(episodes[i].prompt_ids + episodes[i].response_ids), tuple(episodes[i].loss_mask),
               advantages[i].item())
        if key in first:
            copies[first[key]] += 1
        else:
            first[key] = i
    return list(first.values())


def update(model, optimizer, scheduler, episodes, advantages, settings: UpdateSettings, pad_id: int,
           step: int = 0) -> dict:
    """Old log-probs once (for the off-policy mini-batches), then settings.mini_batches optimizer steps
    (micro-batched) on a shuffled batch. Returns the step's metrics (means over its optimizer steps).

    With W ranks each takes every W-th distinct trajectory of a mini-batch; FSDP2 averages gradients over
    ranks, so a trajectory's loss, standing for k copies, is weighted W k / (mini-batch size) and the step
    equals one process's. Every rank runs the same number of forward/backward passes (a rank short of work
    repeats one with weight 0), because each pass gathers parameters collectively.

    An episode without model tokens (sum(loss_mask) == 0: a prompt that alone fills the context, kept when
    the filter is off) has no log-prob the loss could move. It is left out before the shuffle, so it gets no
    forward pass and no place in the mean's denominator: the step is exactly the step on the other episodes,
    and `episodes_without_model_tokens` counts what was left out. Every rank holds every episode, so all
    leave out the same ones; a batch with nothing else takes no optimizer step.
    """
    rank, size = rank_and_size()
    device = next(model.parameters()).device
    with_tokens = [i for i, e in enumerate(episodes) if any(e.loss_mask)]
    without_tokens = len(episodes) - len(with_tokens)
    if without_tokens:
        episodes, advantages = [episodes[i] for i in with_tokens], advantages[with_tokens]
    if not episodes:
        return {"episodes_without_model_tokens": without_tokens, "skipped": 1, "skipped_optimizer_steps": 0,
                "distinct_trajectories": 0}
    # The same shuffle on every rank, and the same after a resume.
    order = torch.randperm(len(episodes), generator=torch.Generator().manual_seed(settings.seed * 100003 + step))
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in episodes]
    share_prefix = size == 1 and not settings.grad_checkpointing
    copies = torch.ones(len(episodes))  # copies[i]: the identical trajectories of its mini-batch row i stands for
    plan = []  # per mini-batch: [(episode indices, loss weight, metrics weight)], the same count on every rank
    for chunk in np.array_split(order.tolist(), min(settings.mini_batches, len(order))):
        distinct = distinct_trajectories(episodes, advantages, chunk.tolist(), copies)
        mine = micro_batches(distinct[rank::size], lengths, settings.micro_batch, settings.micro_batch_tokens)
        # The loss is a mean over the mini-batch's trajectories; the metrics are means over distinct ones.
        mine = [(rows, size * len(rows) / len(chunk), size * len(rows) / len(distinct)) for rows in mine]
        count = all_reduce(len(mine), "max")
        mine += [([chunk[0]], 0.0, 0.0)] * (count - len(mine))
        plan.append(mine)

    def batch(rows):
        tensors = [t.to(device) for t in collate([episodes[i] for i in rows], pad_id)]
        # The prefix pass needs a KV cache, which checkpointed layers do not return; and with several ranks
        # every pass must be one forward per module.
        prefix_len = shared_prefix_length([episodes[i].prompt_ids for i in rows]) if share_prefix else 0
        return (*tensors, (advantages[rows] * copies[rows]).to(device), prefix_len)

    def logprobs(rows):  # logits only where the loss reads: the model's own tokens
        input_ids, attention_mask, loss_mask, _, prefix_len = batch(rows)
        return token_logprobs(model, input_ids, attention_mask, settings.temperature, prefix_len, loss_mask)

    # pi_old, the policy that sampled this batch: [rows, T-1] per micro-batch. The first mini-batch is on-policy,
    # so its pi_old is its own forward's log-probs, detached (None here), and needs no pass of its own.
    sampled = sampler_logprobs(episodes)  # [N, T-1] or None
    if settings.old_logprobs == "sampler" and sampled is not None:
        old_logps = [[None] * len(plan[0])] + [[sampled[rows, :max(lengths[i] for i in rows) - 1].to(device)
                                                for rows, *_ in mine] for mine in plan[1:]]
    else:  # scored before the first optimizer step
        with torch.no_grad(), gathered(model), autocast(device.type, settings.amp):
            old_logps = [[None] * len(plan[0])] + [[logprobs(rows) for rows, *_ in mine] for mine in plan[1:]]

    sums, steps, skipped, ratio_min, ratio_max, gap_max = {}, 0, 0, math.inf, -math.inf, 0.0
    model.train(settings.grad_checkpointing)  # HF checkpoints layers only in train mode; dropout is off anyway
    for mine, old in tqdm(list(zip(plan, old_logps)), desc="update", leave=False, dynamic_ncols=True,
                          disable=rank != 0):
        optimizer.zero_grad(set_to_none=True)
        for (rows, weight, metrics_weight), old_logp in zip(mine, old):
            input_ids, attention_mask, loss_mask, adv, prefix_len = batch(rows)
            with autocast(device.type, settings.amp):
                logp = token_logprobs(model, input_ids, attention_mask, settings.temperature, prefix_len,
                                      loss_mask)
            if old_logp is None:  # on-policy: how far the sampler's log-probs are from this forward's
                old_logp = logp.detach()
                if sampled is not None and weight:
                    gap = (sampled[rows, :old_logp.shape[1]].to(device) - old_logp).abs() * loss_mask
                    gap_max = max(gap_max, gap.max().item())
            if settings.loss == "dspo":
                loss, metrics = dspo_loss(logp, old_logp, loss_mask, adv, settings.clip_low, settings.clip_high)
            else:
                loss, metrics = grpo_loss(logp, old_logp, loss_mask, adv, settings.grpo_clip)
            # The objective is a mean over the mini-batch's trajectories, accumulated micro-batch by micro-batch.
            (loss * weight).backward()
            low, high = metrics.pop("ratio/min"), metrics.pop("ratio/max")
            if weight:
                ratio_min, ratio_max = min(ratio_min, low), max(ratio_max, high)
            sums["loss"] = sums.get("loss", 0.0) + loss.item() * weight / size
            for key, value in metrics.items():  # every rank has every key
                sums[key] = sums.get(key, 0.0) + value * metrics_weight / size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
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
                   **({"sampler_logp_gap": all_reduce(gap_max, "max")} if sampled is not None else {}),
                   "skipped_optimizer_steps": skipped, "episodes_without_model_tokens": without_tokens,
                   "distinct_trajectories": len(episodes) - int((copies - 1).sum())})
    return result


def autocast(device_type: str, amp: bool):
    """bf16 compute for amp on one device; on many, FSDP2's mixed-precision policy does it."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp and rank_and_size()[1] == 1)
