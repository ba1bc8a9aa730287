"""DSPO: group advantages, a dynamic filter, and a clipped sequence-level policy loss.

For each question q the policy samples a group of G trajectories y_1..y_G with rewards r_1..r_G.

1. Group advantage (no critic):    A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-6)
2. Dynamic filter: a group whose rewards are all equal has A_i = 0 for every member and carries no
   signal, so it is dropped and further questions are sampled until the batch holds B informative
   groups or a cap on generation rounds is reached. A round samples B groups, or (the batched refill)
   B / (the share of groups informative so far), so one large round does what several small ones would.
3. Sequence-level importance ratio over M_i, the tokens the model generated itself (prompt and
   retrieved <information> tokens are excluded):
       s_i = exp( 1/|M_i| * sum_{t in M_i} (log pi_theta(y_i,t) - log pi_old(y_i,t)) )
4. Clipped objective, mean over trajectories, no KL term:
       L = -1/N sum_i min( s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i )
   with eps_low = 3e-4, eps_high = 4e-4 (GSPO's values: a length-normalised ratio moves little).

The token-level GRPO loss (per-token ratio clipped at 0.2, mean over each sequence's tokens, then
over sequences) is kept as the baseline to compare against.

Left out: the reference-model KL penalty, entropy bonus, value function, and any reward shaping.
Tensors here are plain: this file knows nothing of search, prompts or tokenizers.
"""
import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOGIT_CHUNK = 256  # positions whose logits are turned to fp32 log-probs at a time


def _members(group_ids: Sequence[Hashable]) -> list[list[int]]:
    """Indices of the trajectories of each group, in first-seen order."""
    members = defaultdict(list)
    for i, gid in enumerate(group_ids):
        members[gid].append(i)
    return list(members.values())


def group_advantages(rewards: torch.Tensor, group_ids: Sequence[Hashable], eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean) / (std + eps) within the group sharing group_ids[i]. rewards: [N] -> [N]."""
    assert rewards.dim() == 1 and len(group_ids) == rewards.numel()
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    for index in _members(group_ids):
        group = rewards[index].float()
        # A group of one has no spread to normalise by; it carries no signal either.
        std = group.std() if len(index) > 1 else torch.tensor(0.0)
        advantages[index] = (group - group.mean()) / (std + eps)
    return advantages


def informative(rewards: Sequence[float]) -> bool:
    """The dynamic filter's test: a group carries signal only when its rewards are not all equal."""
    return len({float(r) for r in rewards}) > 1


def filter_groups(rewards: torch.Tensor, group_ids: Sequence[Hashable]) -> torch.Tensor:
    """keep[i] is True when the group of trajectory i is informative. [N] -> [N] bool."""
    keep = torch.zeros(len(group_ids), dtype=torch.bool)
    for index in _members(group_ids):
        keep[index] = informative(rewards[index].tolist())
    return keep


def fill_batch(sample_groups: Callable[[int, int], list[list]], num_groups: int, max_rounds: int,
               informative_rate: float | None = None, use_filter: bool = True,
               kind: Callable[[list], Hashable] = lambda group: None,
               per_kind: int | None = None) -> tuple[list[list], int, list[list]]:
    """Sample rounds of groups until num_groups informative ones are kept or max_rounds rounds ran.

    sample_groups(r, count) returns `count` new groups for round r (r = 0, 1, ...), each a list of records
    with a `.reward`. With informative_rate=None every round asks for num_groups groups. Given the share of
    groups the filter has passed in earlier steps (fixed for the step), a round asks for as many as that
    rate says will fill what is missing, so one batched round usually does the work of several small ones;
    all rounds together ask for at most num_groups * max_rounds groups either way. When a round holds more informative groups than
    are missing, they are taken in turn from each `kind` (e.g. 1-hop and 2-hop questions), the kind kept
    least so far first, and at most `per_kind` of one kind are kept, so a kind the policy finds easy cannot
    crowd out one it finds hard (a step may then train on fewer than num_groups).
    Returns (kept groups, rounds used, every group sampled). Without the filter one round of num_groups is
    kept whole.
    """
    if not use_filter:
        groups = sample_groups(0, num_groups)
        return groups, 1, groups
    kept, sampled, rounds = [], [], 0
    while rounds < max_rounds and len(kept) < num_groups and len(sampled) < num_groups * max_rounds:
        wanted = num_groups if informative_rate is None else \
            math.ceil((num_groups - len(kept)) / max(informative_rate, 1e-3))
        groups = sample_groups(rounds, min(wanted, num_groups * max_rounds - len(sampled)))
        rounds += 1
        sampled.extend(groups)
        waiting = defaultdict(list)  # kind -> its informative groups of this round, in sampled order
        for group in groups:
            room = per_kind is None or sum(kind(g) == kind(group) for g in kept + waiting[kind(group)]) < per_kind
            if informative([item.reward for item in group]) and room:
                waiting[kind(group)].append(group)
        while len(kept) < num_groups and any(waiting.values()):
            least = min((k for k in waiting if waiting[k]), key=lambda k: sum(kind(g) == k for g in kept))
            kept.append(waiting[least].pop(0))
    return kept, rounds, sampled


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                   prefix_len: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for t = 1..T-1 of right-padded sequences. [B, T] -> [B, T-1].

    pi is the distribution the rollout sampled from, softmax(logits / temperature). With prefix_len > 0
    the rows share their first prefix_len tokens (the prompt's instruction and examples): that prefix is
    encoded once and its KV cache broadcast to the batch; gradients still flow through it. Targets
    up to token prefix_len (the last one is predicted from inside the prefix) get log-prob 0, so prefix_len
    must stop short of every row's prompt (update.py's shared_prefix_length does): those are prompt tokens
    (a `mask` that reads one of them is a ValueError).

    With `mask` ([B, T-1], the tokens the loss will read) logits are computed only at the positions where
    some row has a masked target, and every other log-prob is 0. In an agent's trajectory most tokens are
    retrieved passages, so this skips most of the output layer and its softmax (values are unchanged).
    """
    if mask is not None and prefix_len and mask[:, :prefix_len].any():
        raise ValueError(f"token_logprobs: a target the loss reads lies inside the shared prefix ({prefix_len} "
                         "tokens), where every log-prob is 0")
    keep = torch.arange(prefix_len, input_ids.shape[1] - 1, device=input_ids.device)  # predicting positions
    if mask is not None:
        keep = mask[:, prefix_len:].any(0).nonzero().flatten() + prefix_len
        keep = keep if len(keep) else torch.tensor([input_ids.shape[1] - 2], device=input_ids.device)
    if prefix_len == 0:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=keep).logits
    else:
        keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = model(input_ids=input_ids[:1, :prefix_len], use_cache=True, logits_to_keep=1)[keyword]
        cache.batch_repeat_interleave(input_ids.shape[0])
        logits = model(input_ids=input_ids[:, prefix_len:], attention_mask=attention_mask,
                       logits_to_keep=keep - prefix_len, **{keyword: cache}).logits
    targets = input_ids[:, keep + 1]  # [B, K]
    # The fp32 softmax runs over slices of positions and is recomputed in the backward pass, so with a 150k
    # vocabulary no [B, T, V] fp32 tensor (gigabytes) is ever whole or kept for the backward.
    slices = zip(logits.split(LOGIT_CHUNK, 1), targets.split(LOGIT_CHUNK, 1))
    if torch.is_grad_enabled():
        logp = torch.cat([checkpoint(_target_logprobs, part, part_targets, temperature, use_reentrant=False)
                          for part, part_targets in slices], 1)
    else:
        logp = torch.cat([_target_logprobs(part, part_targets, temperature) for part, part_targets in slices], 1)
    return logp.new_zeros(input_ids.shape[0], input_ids.shape[1] - 1).index_copy(1, keep, logp)


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, t, V] logits, [B, t] targets -> [B, t] log-probs; cross_entropy needs no second [B, t, V] tensor."""
    return -F.cross_entropy((logits.float() / temperature).flatten(0, 1), targets.flatten(),
                            reduction="none").view(targets.shape)


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = mean over the masked tokens of (logp - old_logp). [B, T] -> [B]."""
    mask = mask.to(logp.dtype)
    return ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _token_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_old || pi_theta), mean over masked tokens."""
    log_ratio = (logp - old_logp).detach()
    kl = log_ratio.exp() - 1 - log_ratio
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


def dspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              clip_low: float = 3e-4, clip_high: float = 4e-4) -> tuple[torch.Tensor, dict]:
    """Clipped sequence-level surrogate, mean over the B trajectories. logp, old_logp, mask: [B, T]."""
    mask = mask.to(logp.dtype)
    ratio = sequence_log_ratio(logp, old_logp, mask).exp()  # [B]
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        # "Clipped" means the min picked the constant side: no gradient flows from that trajectory.
        low = ((ratio < 1 - clip_low) & (advantages < 0)).float().mean()
        high = ((ratio > 1 + clip_high) & (advantages > 0)).float().mean()
        metrics = {"clip_ratio/low": low.item(), "clip_ratio/high": high.item(),
                   "ratio/mean": ratio.mean().item(), "ratio/min": ratio.min().item(),
                   "ratio/max": ratio.max().item(), "approx_kl": _token_kl(logp, old_logp, mask).item()}
    return loss, metrics


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Token-level PPO/GRPO baseline: per-token ratios clipped at 1 +- clip, token mean per sequence."""
    mask = mask.to(logp.dtype)
    ratio = (logp - old_logp).exp()  # [B, T]
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    with torch.no_grad():
        count = mask.sum().clamp(min=1.0)
        low = (((ratio < 1 - clip) & (adv < 0)).to(mask.dtype) * mask).sum() / count
        high = (((ratio > 1 + clip) & (adv > 0)).to(mask.dtype) * mask).sum() / count
        token_ratio = ratio[mask.bool()]
        metrics = {"clip_ratio/low": low.item(), "clip_ratio/high": high.item(),
                   "ratio/mean": token_ratio.mean().item(), "ratio/min": token_ratio.min().item(),
                   "ratio/max": token_ratio.max().item(), "approx_kl": _token_kl(logp, old_logp, mask).item()}
    return loss, metrics
