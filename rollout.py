"""Rollout: prompts -> multi-turn generate/search episodes -> token ids, loss mask and stats.

One episode is a single assistant turn that the environment interrupts:

    <search> q1 </search>          model tokens       loss_mask = 1
    \n<information> Doc 1 ... </information>\n      loss_mask = 0 (spliced in by search)
    <search> q2 </search>          model tokens       loss_mask = 1
    ...
    <answer> a </answer><|im_end|> model tokens       loss_mask = 1

All active episodes of a batch generate together until `</search>`, `</answer>`, end of turn, or the
per-turn token budget (generation.py does one such turn); the queries of that turn go to the index in one
batched call; the observations are tokenised on their own and appended. The mask is built while
concatenating token ids and the model's tokens are never re-tokenised, so the training forward pass scores
exactly the ids that were sampled. After `max_turns` turns comes one last turn without search. An
action that is neither a search nor an answer gets a short corrective observation and uses up a turn;
running out of the per-turn or total budget ends the episode as truncated.

generate_episodes() is the sampler that training and evaluation call: one episode per example, in chunks,
seeded per chunk, split across processes under torchrun. Left out: tool calls other than search.
"""
import math
import random
import re
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from distributed import rank_and_size
from generation import TurnDecoder
from prompts import INVALID_ACTION, baseline_prompts, encode_prompt, observation
from search import BM25Index, format_hits

SEARCH_TAG, ANSWER_TAG = "</search>", "</answer>"
_ANSWER = re.compile(r"<answer>.*?</answer>", re.DOTALL)
MAX_QUERY_CHARS = 256  # a query is cut to this before it reaches the index


def parse_action(text: str, stopped: bool, last_turn: bool, earlier: str = "") -> tuple[str, str]:
    """What one turn of model text asks for, as (kind, payload). Never raises. Kinds:
    "answer" (a complete <answer>...</answer> in the model's own text, `earlier` turns included, so an
    answer split across turns counts, as it does for the reward), "truncated" (the turn hit its token
    budget), "end" (the last turn finished without an answer), "search" (payload: the query, white
    space collapsed, cut to MAX_QUERY_CHARS), "invalid" (anything else, an empty query included)."""
    if _ANSWER.search(earlier + text):
        return "answer", ""
    if not stopped:
        return "truncated", ""
    if last_turn:
        return "end", ""
    close = text.find(SEARCH_TAG)
    open_ = text.rfind("<search>", 0, max(close, 0))
    if close < 0 or open_ < 0:
        return "invalid", ""
    query = " ".join(text[open_ + len("<search>"):close].split())[:MAX_QUERY_CHARS].strip()
    return ("search", query) if query else ("invalid", "")


@dataclass
class Episode:
    group_id: str                 # the question's id: advantages are normalised within it
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)   # model tokens and observations
    loss_mask: list[int] = field(default_factory=list)      # 1 where the model generated the token
    sampler_logps: list[float] | None = field(default_factory=list)  # log pi_old of each model token as the
                                  # sampler drew it, 0.0 on observations, aligned with response_ids; None greedy
    response_text: str = ""       # the model's own text only (observations left out)
    num_turns: int = 0
    valid_searches: int = 0
    finished: bool = False        # ended by an answer, or by the last turn without one
    truncated: bool = False       # ran out of the per-turn or total token budget
    reward: float = 0.0


def rollout(model, tokenizer, index: BM25Index, prompts: list[list[int]], group_ids: list[str], *,
            max_turns: int = 2, topk: int = 3, max_turn_tokens: int = 48, max_response_tokens: int = 512,
            max_context: int | None = None, greedy: bool = False, temperature: float = 1.0,
            decoder: TurnDecoder | None = None, shuffle: random.Random | None = None) -> list[Episode]:
    """Run every prompt to an answer, a truncation, or the turn limit.
    max_turns=0 gives one answer-only turn and no search: the baselines of evaluate.py answer that way.
    `decoder` generates the turns (default: a TurnDecoder with both of its caches). With `shuffle` every
    retrieved passage shows its lines in an order it draws (format_hits).

    An episode may use min(max_response_tokens, max_context - prompt length) tokens after its prompt;
    one that runs out, even before its first token, ends truncated instead of raising."""
    episodes = [Episode(group_id=g, prompt_ids=list(p)) for p, g in zip(prompts, group_ids)]
    limits = [min(max_response_tokens, (max_context or 1 << 62) - len(p)) for p in prompts]
    for episode, limit in zip(episodes, limits):
        episode.truncated = limit <= 0
    active = [i for i, e in enumerate(episodes) if not e.truncated]
    if not active:
        return episodes
    decoder = decoder or TurnDecoder(model, tokenizer)
    decoder.start(prompts)
    for turn in range(max_turns + 1):
        if not active:
            break
        last_turn = turn == max_turns
        stop_strings = [SEARCH_TAG, ANSWER_TAG]  # on the last turn a search ends the episode unanswered
        budgets = [limits[i] - len(episodes[i].response_ids) for i in active]
        sequences = [episodes[i].prompt_ids + episodes[i].response_ids for i in active]
        turns = decoder.turn(active, sequences, min(max_turn_tokens, max(budgets)), stop_strings, greedy,
                             temperature)

        searching, queries, still_active = [], [], []
        for i, (tokens, stopped, logps), budget in zip(active, turns, budgets):
            episode = episodes[i]
            stopped, tokens = stopped and len(tokens) <= budget, tokens[:budget]
            if episode.sampler_logps is not None:  # None from the first turn that came without them (greedy)
                episode.sampler_logps = episode.sampler_logps + logps[:len(tokens)] \
                    if len(logps) >= len(tokens) else None
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            kind, query = parse_action(text, stopped, last_turn, episode.response_text)
            episode.response_ids += tokens
            episode.loss_mask += [1] * len(tokens)
            episode.response_text += text
            episode.num_turns += 1
            episode.finished = kind in ("answer", "end")
            episode.truncated = kind == "truncated"
            if kind == "search":
                searching.append(i)
                queries.append(query)
            elif kind == "invalid":
                _append_observation(episode, tokenizer, INVALID_ACTION, limits[i])
                if not episode.truncated:
                    still_active.append(i)

        hits = index.search(queries, topk) if queries else []
        for i, query_hits in zip(searching, hits):
            episode = episodes[i]
            episode.valid_searches += 1
            _append_observation(episode, tokenizer, observation(format_hits(query_hits, index.texts, shuffle)),
                                limits[i])
            if not episode.truncated:
                still_active.append(i)
        active = sorted(still_active)
    return episodes


def _append_observation(episode: Episode, tokenizer, text: str, limit: int) -> None:
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    room = limit - len(episode.response_ids)
    if len(tokens) >= room:
        # No room left to answer after this observation: the episode ends here.
        tokens, episode.truncated = tokens[:max(room, 0)], True
    episode.response_ids += tokens
    episode.loss_mask += [0] * len(tokens)
    if episode.sampler_logps is not None:
        episode.sampler_logps += [0.0] * len(tokens)


def collate(episodes: list[Episode], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, T], attention_mask [B, T], and loss mask [B, T-1] aligned with targets."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    input_ids = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros_like(input_ids)
    for row, e in enumerate(episodes):
        ids = e.prompt_ids + e.response_ids
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        loss_mask[row, len(e.prompt_ids):len(ids)] = torch.tensor(e.loss_mask, dtype=torch.long)
    # Token t is predicted from position t-1, so the mask over targets drops the first column.
    return input_ids, attention_mask, loss_mask[:, 1:]


def sampler_logprobs(episodes: list[Episode]) -> torch.Tensor | None:
    """The sampler's log-probs laid out as collate's loss mask: [B, T-1], entry t the log-prob of token t+1,
    0 on prompts, observations and padding; None when an episode does not carry them (greedy, or made by hand)."""
    if any(e.sampler_logps is None or len(e.sampler_logps) != len(e.response_ids) for e in episodes):
        return None
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    logps = torch.zeros(len(episodes), width)
    for row, e in enumerate(episodes):
        logps[row, len(e.prompt_ids):len(e.prompt_ids) + len(e.response_ids)] = torch.tensor(e.sampler_logps)
    return logps[:, 1:]


# ---------------------------------------------------------------------------------------------
# The sampler: rollout() over many examples, in chunks, on every process

@dataclass
class RolloutSettings:
    """What the sampler needs to know (train.py fills it from its flags)."""
    template: str             # "few-shot" or "zero-shot" (prompts.py)
    max_turns: int            # turns before the last (searches or corrected invalid actions)
    topk: int                 # passages a search returns
    max_turn_tokens: int      # tokens the model may write per turn
    max_response_tokens: int  # tokens an episode may hold after its prompt
    temperature: float        # sampling temperature (greedy evaluation ignores it)
    rollout_batch: int        # episodes generated together
    seed: int                 # seeds each chunk's sampling with its first group id
    fact_order: str = "fixed"  # "shuffled": a passage's lines in a new order at every retrieval, seeded as sampling


def generate_episodes(model, tokenizer, index, examples, group_ids, settings: RolloutSettings, greedy=False,
                      desc="rollout", method="agent") -> list[Episode]:
    """One episode per example (repeat an example for a group), in chunks of settings.rollout_batch.

    `method` "agent" searches (up to max_turns); "direct" and "rag" answer in one turn from their own
    prompts (prompts.py). With W processes each generates a contiguous W-th of the examples and every
    process gets all the episodes back, in order. Each chunk's sampling is seeded from the seed, its first
    group id and that row's place in its group, so the same chunk samples the same tokens whichever process
    runs it and after a resume (another process count or rollout batch cuts other chunks, which sample
    otherwise). The episodes are not scored: reward.score_episodes does that.
    """
    rank, size = rank_and_size()
    share = math.ceil(len(examples) / size)
    mine = range(min(len(examples), rank * share), min(len(examples), (rank + 1) * share))
    episodes = []
    with tqdm(total=len(mine), desc=desc, leave=False, dynamic_ncols=True, disable=rank != 0) as bar:
        for start in range(mine.start, mine.stop, settings.rollout_batch):
            chunk = examples[start:min(start + settings.rollout_batch, mine.stop)]
            # A chunk that starts inside its group (a rollout batch smaller than the group, or a rank's share
            # cut mid-group) adds its offset there, so it does not draw the tries of the chunk before it.
            offset = 0
            while start - offset > 0 and group_ids[start - offset - 1] == group_ids[start]:
                offset += 1
            chunk_seed = zlib.crc32(f"{settings.seed}/{group_ids[start]}{f'/{offset}' if offset else ''}".encode())
            torch.manual_seed(chunk_seed)
            shuffle = random.Random(chunk_seed) if settings.fact_order == "shuffled" else None
            if method == "agent":
                prompts = [encode_prompt(tokenizer, x.question, settings.template, settings.topk) for x in chunk]
            else:
                prompts = baseline_prompts(tokenizer, index, chunk, method, settings.template, settings.topk, shuffle)
            episodes += rollout(
                model, tokenizer, index, prompts, group_ids[start:start + len(chunk)],
                max_turns=settings.max_turns if method == "agent" else 0, topk=settings.topk,
                max_turn_tokens=settings.max_turn_tokens, max_response_tokens=settings.max_response_tokens,
                greedy=greedy, temperature=settings.temperature,
                max_context=getattr(model.config, "max_position_embeddings", None),
                shuffle=shuffle)
            bar.update(len(chunk))
    if size > 1:
        parts = [None] * size
        dist.all_gather_object(parts, episodes)
        episodes = [episode for part in parts for episode in part]
    return episodes
