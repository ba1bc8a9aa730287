"""Rollout: prompts -> multi-turn generate/search episodes -> token ids, loss mask and stats.

One episode is a single assistant turn that the environment interrupts:

    <search> q1 </search>          model tokens       loss_mask = 1
    \n<information> Doc 1 ... </information>\n      loss_mask = 0 (spliced in by search)
    <search> q2 </search>          model tokens       loss_mask = 1
    ...
    <answer> a </answer><|im_end|> model tokens       loss_mask = 1

All active episodes of a batch generate together with HF `generate` until `</search>`,
`</answer>`, end of turn, or the per-turn token budget; the queries of that turn go to the index
in one batched call; the observations are tokenised on their own and appended. The mask is built
while concatenating token ids and the model's tokens are never re-tokenised, so the training
forward pass scores exactly the ids that were sampled. After `max_turns` searches comes one last
turn without search. An action that is neither a search nor an answer gets a short corrective
observation; running out of the per-turn or total budget ends the episode as truncated.

The prompt prefix all episodes share (the instruction and worked examples) is encoded once per call
and its KV cache copied into the first turn. Each later turn continues from the cache the last turn's
generate() returned, less finished episodes, and encodes per row only its last sampled token and
[left padding | observation]. Padding and tokens a row samples after its stop stay in the cache,
masked out; positions count only attended tokens, so the model sees what re-encoding the unpadded
episode would show it. Left out: tool calls other than search.
"""
import copy
import inspect
import re
import time
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from search import BM25Index, format_hits

SEARCH_TAG, ANSWER_TAG = "</search>", "</answer>"
INVALID_ACTION = ("\nMy previous action is invalid. To search, I write the query between <search> and "
                  "</search>. To answer, I write the answer between <answer> and </answer>.\n")
_ANSWER = re.compile(r"<answer>.*?</answer>", re.DOTALL)
MAX_QUERY_CHARS = 256  # a query is cut to this before it reaches the index

# ---------------------------------------------------------------------------------------------
# Prompts. Zero-shot suits instruction-tuned 7B models; a 135M model ignores a bare instruction
# (0 of 24 samples used the tags) but copies two worked episodes from its chat history. Their
# made-up entities are kept out of the synthetic world (see EXAMPLE_NAMES).

ZERO_SHOT = ("Answer the question below. Think step by step inside <think> and </think> whenever you "
             "receive new information. If you are missing knowledge, call the search engine with "
             "<search> query </search>; its top results come back between <information> and "
             "</information>. You may search as many times as you need. When no more knowledge is "
             "needed, give only the final answer inside <answer> and </answer>, for example "
             "<answer> Paris </answer>. Question: {question}\n")

SYSTEM = ("You answer questions with a search engine. To search, write <search> query </search>; the "
          "results come back between <information> and </information>. Search again if the results "
          "do not contain the answer. When you know the answer, write it as <answer> answer </answer>.")

EXAMPLE_PASSAGES = [
    "Ilvane Dorsk\nIlvane Dorsk is a glassblower who was born in Marrowick. Dorsk trained under Peltro "
    "Quane and later opened a workshop near the Ossel river.",
    "Marrowick\nMarrowick is a harbour town in the country of Venmark. It is known for its salt markets.",
    "Peltro Quane\nPeltro Quane is a glassblower born in Tallowen. Quane taught many apprentices.",
    "Tessaly Brune\nTessaly Brune is a cartographer who works for Grennock Maps, a company founded in "
    "Oskarra.",
    "Oskarra\nOskarra is a mountain city in the country of Dulmere. Its flag is green.",
]
EXAMPLE_NAMES = frozenset({"Ilvane Dorsk", "Marrowick", "Venmark", "Peltro Quane", "Tallowen", "Ossel",
                           "Tessaly Brune", "Grennock Maps", "Oskarra", "Dulmere"})
# (question, search queries in order, answer)
EXAMPLE_EPISODES = [
    ("Where was Ilvane Dorsk born?", ["Ilvane Dorsk"], "Marrowick"),
    ("In which country was Grennock Maps founded?", ["Grennock Maps", "Oskarra"], "Dulmere"),
]


def observation(hits_text: str) -> str:
    return f"\n<information>{hits_text}</information>\n"


def worked_episode(queries: list[str], answer: str, topk: int) -> str:
    """The assistant text of one in-context example, with real search results over EXAMPLE_PASSAGES."""
    index = BM25Index(EXAMPLE_PASSAGES)
    hits = index.search(queries, min(topk, 2))
    steps = [f"<search> {q} </search>" + observation(format_hits(h, EXAMPLE_PASSAGES)) for q, h in zip(queries, hits)]
    return "".join(steps) + f"<answer> {answer} </answer>"


def build_messages(question: str, template: str, topk: int = 3) -> list[dict]:
    if template == "zero-shot":
        return [{"role": "user", "content": ZERO_SHOT.format(question=question)}]
    assert template == "few-shot", template
    messages = [{"role": "system", "content": SYSTEM}]
    for example_question, queries, answer in EXAMPLE_EPISODES:
        messages.append({"role": "user", "content": f"Question: {example_question}"})
        messages.append({"role": "assistant", "content": worked_episode(queries, answer, topk)})
    messages.append({"role": "user", "content": f"Question: {question}"})
    return messages


def encode_prompt(tokenizer, question: str, template: str, topk: int = 3) -> list[int]:
    return encode_messages(tokenizer, build_messages(question, template, topk))


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to the start of the assistant's reply."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    # Base models without a chat template get the same conversation as plain text.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Actions

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


# ---------------------------------------------------------------------------------------------
# Episodes

@dataclass
class Episode:
    group_id: str                 # the question's id: advantages are normalised within it
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)   # model tokens and observations
    loss_mask: list[int] = field(default_factory=list)      # 1 where the model generated the token
    response_text: str = ""       # the model's own text only (observations left out)
    num_turns: int = 0
    valid_searches: int = 0
    finished: bool = False        # ended by an answer, or by the last turn without one
    truncated: bool = False       # ran out of the per-turn or total token budget
    reward: float = 0.0


class StopAtTags(StoppingCriteria):
    """Stops each row at its first end-of-turn token or completed stop tag; records where."""

    def __init__(self, tokenizer, stop_strings: list[str], eos_ids: set[int], prompt_width: int):
        self.tokenizer, self.stop_strings, self.eos_ids = tokenizer, stop_strings, eos_ids
        self.prompt_width = prompt_width
        self.window = max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stop_strings) + 2
        self.stop_at = None  # [B] index of the last kept new token, -1 while running

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[:, self.prompt_width:]
        step = new.shape[1] - 1
        if self.stop_at is None:
            self.stop_at = torch.full((new.shape[0],), -1, dtype=torch.long)
        for row in (self.stop_at < 0).nonzero().flatten().tolist():
            tail = self.tokenizer.decode(new[row, max(0, step - self.window):])
            if int(new[row, -1]) in self.eos_ids or any(s in tail for s in self.stop_strings):
                self.stop_at[row] = step
        return (self.stop_at >= 0).to(input_ids.device)


def end_of_turn_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return {i for i in ids if i is not None}


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix, kept one token short of the shortest sequence."""
    shortest = min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def prefix_cache(model, prefix: list[int]):
    """KV cache of the shared prompt prefix, batch 1. Every episode's first turn (every turn without
    reuse_cache) starts from it, so the few-shot history is encoded once per rollout, not per episode."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=torch.tensor([prefix], device=device), use_cache=True)[cache_keyword(model)]


def cache_keyword(model) -> str:
    """Newer transformers name the KV cache `cache`, older ones `past_key_values`; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class TurnCache:
    """Each row's tokens so far and their KV cache. A row's attended tokens are its episode, in order."""
    episodes: list[int]           # [A] the episode of each row
    input_ids: torch.Tensor       # [A, T] every token fed or sampled
    attention_mask: torch.Tensor  # [A, T] 0 on padding and on tokens sampled after a row's stop
    cache: object                 # KV cache of the first columns of input_ids (None: of none); generate() adds the rest


def _prefix_turn(active: list[int], prefix: list[int], cache) -> TurnCache:
    """Every active row holding just the shared prefix (maybe empty), its batch-1 `cache` expanded to all."""
    input_ids = torch.tensor([prefix], dtype=torch.long).expand(len(active), -1)  # [A, P]
    if cache is not None:
        # generate() appends to the cache it is given, so each call works on its own expanded copy.
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(active))
    return TurnCache(active, input_ids, torch.ones_like(input_ids), cache)


def _extend(previous: TurnCache, active: list[int], sequences, pad_id) -> TurnCache:
    """`previous` cut to the `active` episodes, each row extended by what its episode gained since (the
    prompt after the prefix, or the last turn's observation): [previous | left padding | new tokens]."""
    rows = torch.tensor([previous.episodes.index(i) for i in active])
    if previous.cache is not None and len(active) < len(previous.episodes):
        previous.cache.batch_select_indices(rows)  # in place: finished episodes leave the cache
    old_ids, old_mask = previous.input_ids[rows], previous.attention_mask[rows]  # [A, T]
    known = [ids[mask.bool()].tolist() for ids, mask in zip(old_ids, old_mask)]  # each episode so far
    assert all(k == s[:len(k)] for k, s in zip(known, sequences)), "rows out of step with their episodes"
    new = [torch.tensor(s[len(k):], dtype=torch.long) for k, s in zip(known, sequences)]
    new_ids = pad_sequence(new, batch_first=True, padding_value=pad_id, padding_side="left")  # [A, N]
    new_mask = pad_sequence([torch.ones_like(t) for t in new], batch_first=True, padding_side="left")
    # generate() derives positions from attention_mask.cumsum(-1) - 1, so masked holes (padding, tokens
    # after a stop) give every attended token the position it has in the unpadded episode.
    return TurnCache(active, torch.cat([old_ids, new_ids], 1), torch.cat([old_mask, new_mask], 1), previous.cache)


def sampler_config(max_new_tokens: int, greedy: bool, temperature: float, pad_id: int, eos_ids: set[int]):
    """The sampler, built from scratch: softmax(logits / temperature) over the whole vocabulary (greedy: its
    argmax), exactly the distribution dspo.token_logprobs scores. No top-k, top-p, min-p, typical-p,
    repetition or n-gram penalty: any of them would make pi_old differ from the policy that sampled."""
    neutral = dict(top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                   repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                   length_penalty=1.0, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
                   forced_bos_token_id=None, forced_eos_token_id=None, min_length=0, min_new_tokens=None,
                   num_beams=1, renormalize_logits=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=1.0 if greedy else
                            temperature, pad_token_id=pad_id, eos_token_id=sorted(eos_ids),
                            return_dict_in_generate=True, **neutral)


def _generate_turn(model, tokenizer, state: TurnCache, max_new_tokens, stop_strings, eos_ids, pad_id, greedy,
                   temperature) -> tuple[list[tuple[list[int], bool]], TurnCache]:
    """One batched generate call that encodes what `state.cache` lacks of `state.input_ids`, then samples.
    Returns each row's new tokens cut at its stop and whether it stopped, and the state after it."""
    width = state.input_ids.shape[1]
    stopper = StopAtTags(tokenizer, stop_strings, eos_ids, width)
    config = sampler_config(max_new_tokens, greedy, temperature, pad_id, eos_ids)
    device = next(model.parameters()).device
    kwargs = {cache_keyword(model): state.cache} if state.cache is not None else {}
    # generate() fills every setting the config leaves unset from model.generation_config, which a checkpoint's
    # generation_config.json sets (Qwen2.5-Instruct: repetition_penalty, top_k, top_p, temperature, do_sample):
    # a blank one stands in for the call, so nothing is inherited. synced_gpus=False: the parameters are
    # gathered, so ranks that run different numbers of turns and tokens must not wait for each other (the
    # default under FSDP keeps every rank decoding until all ranks finish each call, which deadlocks).
    shipped = getattr(model, "generation_config", None)
    if shipped is not None:
        model.generation_config = GenerationConfig()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=state.input_ids.to(device), attention_mask=state.attention_mask.to(device),
                                 generation_config=config, stopping_criteria=StoppingCriteriaList([stopper]),
                                 synced_gpus=False, **kwargs)
    finally:
        if shipped is not None:
            model.generation_config = shipped
    sequences = out.sequences.cpu()  # [A, T + L]
    new = sequences[:, width:]  # [A, L]
    stop_at = stopper.stop_at if stopper.stop_at is not None else torch.full((len(new),), -1)
    # Each row keeps its tokens up to its stop; one that never stopped ran out of its budget and keeps all.
    kept = torch.where(stop_at >= 0, stop_at + 1, new.shape[1])  # [A]
    turns = [(new[row, :int(n)].tolist(), bool(stop_at[row] >= 0)) for row, n in enumerate(kept)]
    # A row that stopped early was fed padding until the last row stopped: cached, but masked from now on.
    new_mask = (torch.arange(new.shape[1]) < kept[:, None]).long()  # [A, L]
    return turns, TurnCache(state.episodes, sequences, torch.cat([state.attention_mask, new_mask], 1),
                            getattr(out, cache_keyword(model), None))


def rollout(model, tokenizer, index: BM25Index, prompts: list[list[int]], group_ids: list[str], *,
            max_turns: int = 2, topk: int = 3, max_turn_tokens: int = 48, max_response_tokens: int = 512,
            max_context: int | None = None, greedy: bool = False, temperature: float = 1.0,
            share_prefix: bool = True, reuse_cache: bool = True) -> tuple[list[Episode], dict]:
    """Run every prompt to an answer, a truncation, or the turn limit. Returns episodes and timings (s).
    max_turns=0 gives one answer-only turn and no search: the baselines of evaluate.py answer that way.
    share_prefix encodes the prompts' common prefix once; reuse_cache carries each episode's KV cache from
    turn to turn. Neither changes a token (up to float rounding); both only save prefill time.

    An episode may use min(max_response_tokens, max_context - prompt length) tokens after its prompt;
    one that runs out, even before its first token, ends truncated instead of raising."""
    episodes = [Episode(group_id=g, prompt_ids=list(p)) for p, g in zip(prompts, group_ids)]
    limits = [min(max_response_tokens, (max_context or 1 << 62) - len(p)) for p in prompts]
    for episode, limit in zip(episodes, limits):
        episode.truncated = limit <= 0
    active = [i for i, e in enumerate(episodes) if not e.truncated]
    prefix = prompts[0][:shared_prefix_length(prompts)] if share_prefix and active else []
    cache = prefix_cache(model, prefix) if prefix else None
    eos_ids = end_of_turn_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    state = None  # the last turn's rows, tokens and KV cache, kept with reuse_cache
    timings = {"generate": 0.0, "search": 0.0, "splice": 0.0}
    for turn in range(max_turns + 1):
        if not active:
            break
        last_turn = turn == max_turns
        stop_strings = [SEARCH_TAG, ANSWER_TAG]  # on the last turn a search ends the episode unanswered
        budgets = [limits[i] - len(episodes[i].response_ids) for i in active]
        start = time.perf_counter()
        sequences = [episodes[i].prompt_ids + episodes[i].response_ids for i in active]
        # Without reuse_cache every turn starts over from the prefix and re-encodes the episode so far.
        state = _extend(state if state is not None else _prefix_turn(active, prefix, cache), active, sequences, pad_id)
        turns, state = _generate_turn(model, tokenizer, state, min(max_turn_tokens, max(budgets)), stop_strings,
                                      eos_ids, pad_id, greedy, temperature)
        state = state if reuse_cache else None  # frees this turn's KV cache before the next one is built
        timings["generate"] += time.perf_counter() - start

        start = time.perf_counter()
        searching, queries, still_active = [], [], []
        for i, (tokens, stopped), budget in zip(active, turns, budgets):
            episode = episodes[i]
            stopped, tokens = stopped and len(tokens) <= budget, tokens[:budget]
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
        timings["splice"] += time.perf_counter() - start

        start = time.perf_counter()
        hits = index.search(queries, topk) if queries else []
        timings["search"] += time.perf_counter() - start
        start = time.perf_counter()
        for i, query_hits in zip(searching, hits):
            episode = episodes[i]
            episode.valid_searches += 1
            _append_observation(episode, tokenizer, observation(format_hits(query_hits, index.texts)), limits[i])
            if not episode.truncated:
                still_active.append(i)
        active = sorted(still_active)
        timings["splice"] += time.perf_counter() - start
    return episodes, timings


def _append_observation(episode: Episode, tokenizer, text: str, limit: int) -> None:
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    room = limit - len(episode.response_ids)
    if len(tokens) >= room:
        # No room left to answer after this observation: the episode ends here.
        tokens, episode.truncated = tokens[:max(room, 0)], True
    episode.response_ids += tokens
    episode.loss_mask += [0] * len(tokens)


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
