"""One turn of generation for a batch of episodes: HF generate() with the exact sampler, per-row stop tags, and
the KV cache carried from turn to turn.

rollout.py calls TurnDecoder.turn() once per turn (it prepares the cache, then runs generate_turn()). What
happens underneath:
- The sampler is softmax(logits / temperature) over the whole vocabulary, built from a blank config, so a
  checkpoint's generation_config.json (top-k, top-p, repetition penalty) cannot change it: pi_old must be
  the distribution dspo.token_logprobs scores.
- Each row stops at its first end-of-turn token or completed stop tag (StopAtTags); the batch runs until
  the last row stops, and tokens a row samples after its stop are cut.
- The prompt prefix all episodes share (instruction and worked examples) is encoded once while the weights
  stay the same (prefix_cache) and its KV cache copied into the first turn. Each later turn continues from
  the cache the last turn's generate() returned, less finished episodes, and encodes per distinct row only
  its last sampled token and [left padding | observation]. Padding and tokens after a stop stay in the cache, masked
  out; positions count only attended tokens, so the model sees what re-encoding the unpadded episode would
  show it.
- Rows that repeat another row exactly are encoded once and their keys and values copied
  (encode_repeats_once); generate() then encodes only each row's last token. A group's tries always repeat
  each other on the first turn (the same question), and on later turns where they sampled the same text,
  as a confident policy often does (a first search that copies the question's name).
- The KV cache keeps spare room (spare_room_cache): a step writes its keys and values in place, where
  transformers' DynamicCache would concatenate, copying every cached key and value of every layer each step.

Left out: speculative decoding, paged attention, and continuous batching (a row that finishes early idles
until its batch's turn ends).
"""
import copy
import inspect
import time
import weakref
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, \
    StoppingCriteriaList
from transformers.cache_utils import DynamicLayer


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


class SampledLogprobs(LogitsProcessor):
    """Records log pi(token) of every token the sampler draws, pi = softmax(logits / temperature): at each
    step the log-prob of the last step's draw (now the last column of input_ids), and of the final draw in
    finish(). It sees the logits before generate() applies the temperature, and returns them unchanged."""

    def __init__(self, temperature: float):
        self.temperature, self.last, self.logps = temperature, None, []

    def __call__(self, input_ids, scores):
        self.record(input_ids[:, -1])
        self.last = torch.log_softmax(scores.float() / self.temperature, -1)  # [A, V]
        return scores

    def record(self, drawn: torch.Tensor) -> None:
        if self.last is not None:
            self.logps.append(self.last.gather(1, drawn[:, None].to(self.last.device))[:, 0].cpu())

    def finish(self, sequences: torch.Tensor, width: int) -> torch.Tensor:
        """[A, L] log-probs of the L tokens generate() appended after column `width`."""
        if sequences.shape[1] - width > len(self.logps):
            self.record(sequences[:, -1])
            self.last = None
        return torch.stack(self.logps, 1) if self.logps else torch.zeros(len(sequences), 0)


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


class SpareRoomLayer(DynamicLayer):
    """One layer's keys and values [B, H, T, D] as the first T positions of buffers [B, H, T + room, D]. An
    update writes its positions into the room; only when they do not fit are new buffers allocated (with
    ROOM positions to spare) and the cache copied once. Selecting or repeating rows makes new tensors, as in
    DynamicLayer; the old buffers are dropped then and the next update copies into new ones. The keys and
    values are the ones concatenation gives."""

    ROOM = 256  # spare positions a new buffer gets: a turn's tokens mostly fit, and memory grows by little

    def __init__(self):
        super().__init__()
        self.buffers = None  # (keys, values) [B, H, T + room, D] while self.keys and self.values are views of them

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self.keys = self.values = key_states.new_empty(0)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        end = length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2] or not _views_of(self.keys, self.buffers[0]) \
                or not _views_of(self.values, self.buffers[1]):
            self.buffers = tuple(state.new_empty(*state.shape[:2], end + self.ROOM, state.shape[3])
                                 for state in (key_states, value_states))
            if length:
                self.buffers[0][:, :, :length], self.buffers[1][:, :, :length] = self.keys, self.values
        self.buffers[0][:, :, length:end], self.buffers[1][:, :, length:end] = key_states, value_states
        self.keys, self.values = self.buffers[0][:, :, :end], self.buffers[1][:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.buffers = None

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        self.buffers = None

    def reset(self):
        super().reset()
        self.buffers = None


def _views_of(state: torch.Tensor, buffer: torch.Tensor) -> bool:
    """True when `state` is the first positions of `buffer` (the same memory, rows and heads)."""
    return state.numel() > 0 and state.data_ptr() == buffer.data_ptr() and state.shape[:2] == buffer.shape[:2] \
        and state.stride() == buffer.stride()


def spare_room_cache(model):
    """An empty KV cache for `model` whose full-attention layers keep spare room (SpareRoomLayer); sliding-window
    and other special layers stay transformers' own."""
    cache = DynamicCache(config=getattr(model, "config", None))
    if cache.layers:  # made from the config, one per layer
        cache.layers = [SpareRoomLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    elif cache.layer_class_to_replicate is DynamicLayer:  # no config: layers are made as they are needed
        cache.layer_class_to_replicate = SpareRoomLayer
    return cache


def prefix_cache(model, prefix: list[int]):
    """KV cache of the shared prompt prefix, batch 1. Every episode's first turn (every turn without
    reuse_cache) starts from it, so the few-shot history is encoded once, not per episode. In one process
    the last one made is kept and returned again while it is the same model with the same weights
    (weights_version), so a step's refill rounds and an evaluation's chunks encode the prefix once and an
    optimizer step makes a new one. Callers copy it before decoding into it (prefix_turn). Under torchrun
    the gathered weights are written by collectives, which no version counter sees: it is made every time."""
    alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    device = next(model.parameters()).device
    autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)  # CPU's too
    key = (tuple(prefix), weights_version(model), device, autocast) if alone else None
    if key is None or _last_prefix.get("key") != key or _last_prefix["model"]() is not model:
        with torch.no_grad():
            cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True,
                          **{cache_keyword(model): spare_room_cache(model)})[cache_keyword(model)]
        _last_prefix.update(key=key, model=weakref.ref(model), cache=cache)
    return _last_prefix["cache"]


_last_prefix = {}  # "key" and "model": what the cache was made from; "cache": the prefix's KV cache, batch 1


def weights_version(model) -> tuple:
    """Changes whenever a parameter is written or replaced: torch counts every in-place write to a tensor
    (an optimizer step, load_state_dict, a no_grad add_) in its _version, and a new tensor has new memory.
    Writes through .data bypass the count; nothing here writes weights that way."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


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


def prefix_turn(active: list[int], prefix: list[int], cache) -> TurnCache:
    """Every active row holding just the shared prefix (maybe empty), its batch-1 `cache` expanded to all."""
    input_ids = torch.tensor([prefix], dtype=torch.long).expand(len(active), -1)  # [A, P]
    if cache is not None:
        # generate() appends to the cache it is given, so each call works on its own expanded copy.
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(active))
    return TurnCache(active, input_ids, torch.ones_like(input_ids), cache)


def extend(previous: TurnCache, active: list[int], sequences, pad_id) -> TurnCache:
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


def encode_repeats_once(model, state: TurnCache) -> TurnCache:
    """Encode what `state.cache` lacks of `state.input_ids`, all but the last column, once per distinct row, and
    copy its keys and values to the rows that repeat it; generate() then encodes only the last column.
    A group's tries are the same episode until they first sample different tokens, so on the first turn and
    often later many of a turn's new tokens are repeats. Two rows count as the same when they have the same
    mask and the same tokens where it is 1: masked slots (padding, tokens after a stop) are never attended.
    The keys and values are those of encoding every row (up to float rounding). Returns `state` as it is
    when no row repeats another or only the last column is uncached; otherwise selects rows of
    `state.cache` in place and returns a state holding the filled cache."""
    cached = state.cache.get_seq_length() if state.cache is not None else 0
    width = state.input_ids.shape[1]
    rows = torch.cat([state.input_ids * state.attention_mask, state.attention_mask], 1).tolist()
    first = {}  # a row's tokens and mask -> the first row that has them
    for row, key in enumerate(map(tuple, rows)):
        first.setdefault(key, row)
    if len(first) == len(rows) or width - cached < 2:
        return state
    distinct = torch.tensor(list(first.values()))                            # [U] one row of each kind
    slot = {row: j for j, row in enumerate(first.values())}
    copies = torch.tensor([slot[first[key]] for key in map(tuple, rows)])    # [A] each row's distinct row
    cache = state.cache if state.cache is not None else spare_room_cache(model)
    device = next(model.parameters()).device
    if cached:
        cache.batch_select_indices(distinct.to(device))
    mask = state.attention_mask[distinct, :width - 1]  # [U, width - 1]
    # Positions as generate() derives them: attended tokens count; masked slots get a placeholder, never read.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, cached:]
    with torch.no_grad():
        model(input_ids=state.input_ids[distinct, cached:width - 1].to(device), attention_mask=mask.to(device),
              position_ids=positions.to(device), use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    cache.batch_select_indices(copies.to(device))
    return TurnCache(state.episodes, state.input_ids, state.attention_mask, cache)


def sampler_config(max_new_tokens: int, greedy: bool, temperature: float, pad_id: int, eos_ids: set[int]):
    """The sampler, built from scratch: softmax(logits / temperature) over the whole vocabulary (greedy: its
    argmax), exactly the distribution dspo.token_logprobs scores. No top-k, top-p, min-p, typical-p,
    repetition or n-gram penalty: any of them would make pi_old differ from the policy that sampled. Greedy
    leaves top_k unset: it is a sampling flag, and generate() warns of a 0 there on every evaluation."""
    neutral = dict(top_k=None if greedy else 0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
                   eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                   length_penalty=1.0, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
                   forced_bos_token_id=None, forced_eos_token_id=None, min_length=0, min_new_tokens=None,
                   num_beams=1, renormalize_logits=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=1.0 if greedy else
                            temperature, pad_token_id=pad_id, eos_token_id=sorted(eos_ids),
                            return_dict_in_generate=True, **neutral)


def generate_turn(model, tokenizer, state: TurnCache, max_new_tokens, stop_strings, eos_ids, pad_id, greedy,
                   temperature) -> tuple[list[tuple[list[int], bool, list[float]]], TurnCache]:
    """One batched generate call that encodes what `state.cache` lacks of `state.input_ids`, then samples.
    Returns each row's new tokens cut at its stop, whether it stopped, and the sampler's log-prob of each
    kept token (empty when greedy), and the state after it."""
    width = state.input_ids.shape[1]
    stopper = StopAtTags(tokenizer, stop_strings, eos_ids, width)
    recorder = SampledLogprobs(temperature) if not greedy else None
    config = sampler_config(max_new_tokens, greedy, temperature, pad_id, eos_ids)
    device = next(model.parameters()).device
    kwargs = {cache_keyword(model): state.cache if state.cache is not None else spare_room_cache(model)}
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
                                 logits_processor=LogitsProcessorList([recorder] if recorder else []),
                                 synced_gpus=False, **kwargs)
    finally:
        if shipped is not None:
            model.generation_config = shipped
    sequences = out.sequences.cpu()  # [A, T + L]
    new = sequences[:, width:]  # [A, L]
    stop_at = stopper.stop_at if stopper.stop_at is not None else torch.full((len(new),), -1)
    # Each row keeps its tokens up to its stop; one that never stopped ran out of its budget and keeps all.
    kept = torch.where(stop_at >= 0, stop_at + 1, new.shape[1])  # [A]
    logps = recorder.finish(sequences, width) if recorder else torch.zeros(len(new), 0)  # [A, L] or [A, 0]
    if recorder and logps.shape[1] != new.shape[1]:
        raise RuntimeError(f"generate() ran the logits processors {logps.shape[1]} times for {new.shape[1]} "
                           "sampled tokens: the sampler's log-probs would not line up with its tokens")
    turns = [(new[row, :int(n)].tolist(), bool(stop_at[row] >= 0), logps[row, :int(n)].tolist())
             for row, n in enumerate(kept)]
    # A row that stopped early was fed padding until the last row stopped: cached, but masked from now on.
    new_mask = (torch.arange(new.shape[1]) < kept[:, None]).long()  # [A, L]
    return turns, TurnCache(state.episodes, sequences, torch.cat([state.attention_mask, new_mask], 1),
                            getattr(out, cache_keyword(model), None))


class TurnDecoder:
    """Generates a rollout's turns one at a time and keeps what can be reused between them: the KV cache of
    the prompts' shared prefix (share_prefix) and each row's KV cache from its last turn (reuse_cache); rows
    that repeat another are encoded once (share_repeats). None of them changes a sampled token (up to float
    rounding); each only saves prefill time. `seconds` adds up where the time went: "prefix" (encoding the
    shared prefix) and "generate" (turn setup, encoding repeated rows once, and generate())."""

    def __init__(self, model, tokenizer, share_prefix: bool = True, reuse_cache: bool = True,
                 share_repeats: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.share_prefix, self.reuse_cache, self.share_repeats = share_prefix, reuse_cache, share_repeats
        self.eos_ids = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.seconds = {"prefix": 0.0, "generate": 0.0}

    def start(self, prompts: list[list[int]]) -> None:
        """A new rollout of `prompts`: encode their shared prefix once, forget the last rollout's rows."""
        began = time.perf_counter()
        self.prefix = prompts[0][:shared_prefix_length(prompts)] if self.share_prefix else []
        self.prefix_kv = prefix_cache(self.model, self.prefix) if self.prefix else None
        self.state = None  # the last turn's rows, tokens and KV cache (kept with reuse_cache)
        self.seconds["prefix"] += time.perf_counter() - began

    def turn(self, active: list[int], sequences: list[list[int]], max_new_tokens: int, stop_strings: list[str],
             greedy: bool, temperature: float) -> list[tuple[list[int], bool, list[float]]]:
        """One turn for the `active` episodes, whose token ids so far are `sequences`: each row's new tokens,
        cut at its stop, whether it stopped, and the sampler's log-probs of those tokens (empty when greedy).
        Without reuse_cache every turn starts over from the prefix and re-encodes the episode so far."""
        began = time.perf_counter()
        state = self.state if self.state is not None else prefix_turn(active, self.prefix, self.prefix_kv)
        state = extend(state, active, sequences, self.pad_id)
        if self.share_repeats:
            state = encode_repeats_once(self.model, state)
        turns, state = generate_turn(self.model, self.tokenizer, state, max_new_tokens, stop_strings, self.eos_ids,
                                     self.pad_id, greedy, temperature)
        self.state = state if self.reuse_cache else None  # frees this turn's KV cache before the next is built
        self.seconds["generate"] += time.perf_counter() - began
        return turns
