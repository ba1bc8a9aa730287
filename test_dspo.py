"""Tests for DSPO: offline, CPU, seconds. Each pins one behaviour with real values.

Run: pytest test_dspo.py
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rank_bm25 import BM25Okapi

from data import DataError, QAExample, load_corpus_jsonl, load_qa_jsonl
from world import synthetic_world
from dspo import (dspo_loss, fill_batch, filter_groups, grpo_loss, group_advantages, sequence_log_ratio,
                  token_logprobs)
from reward import exact_match, extract_answer, normalize_answer, score_response, token_f1
from rollout import (INVALID_ACTION, MAX_QUERY_CHARS, collate, encode_prompt, parse_action, rollout,
                     shared_prefix_length)
from search import BM25Index, format_hits, tokenize
from train import main, tiny_model


# --------------------------------------------------------------------------------------------- reward

def test_normalize_answer_drops_case_punctuation_articles_and_extra_space():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An Apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # an article inside a word stays


def test_extract_answer_takes_the_last_complete_tag():
    assert extract_answer("<answer> Paris </answer> then <answer>Lyon</answer>") == "Lyon"
    assert extract_answer("no tags here") is None
    assert extract_answer("<answer> unclosed") is None
    assert extract_answer("<answer>\nmulti\nline </answer>") == "multi\nline"


def test_exact_match_against_several_gold_answers():
    assert exact_match("the Beatles", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatle", ["Beatles"]) == 0.0
    assert exact_match(None, ["x"]) == 0.0
    assert score_response("<search> q </search><answer> Venmark. </answer>", ["venmark"]) == 1.0


def test_token_f1_partial_overlap():
    assert token_f1("new york city", ["New York"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("boston", ["New York"]) == 0.0


# --------------------------------------------------------------------------------------------- dspo

def test_group_advantages_normalise_within_each_question_id():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    ids = ["a", "b", "a", "b", "a", "b"]  # interleaved: grouping must follow ids, not positions
    adv = group_advantages(rewards, ids)
    a = torch.tensor([1.0, 1.0, 0.0])
    expected_a = (a - a.mean()) / (a.std() + 1e-6)
    assert torch.allclose(adv[[0, 2, 4]], expected_a)
    b = torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(adv[[1, 3, 5]], (b - b.mean()) / (b.std() + 1e-6))
    assert group_advantages(torch.tensor([1.0, 1.0]), ["c", "c"]).abs().max() == 0


def test_filter_drops_exactly_the_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    ids = ["all-one", "all-one", "mixed", "mixed", "all-zero", "all-zero", "half", "half"]
    assert filter_groups(rewards, ids).tolist() == [False, False, True, True, False, False, False, False]


class _Traj:
    def __init__(self, reward):
        self.reward = reward


def test_refill_samples_until_enough_informative_groups():
    rounds = iter([[[_Traj(0), _Traj(0)], [_Traj(1), _Traj(0)]],
                   [[_Traj(1), _Traj(1)], [_Traj(0), _Traj(1)]],
                   [[_Traj(0), _Traj(1)], [_Traj(1), _Traj(0)]]])
    kept, used, sampled = fill_batch(lambda: next(rounds), num_groups=2, max_rounds=5)
    assert used == 2 and len(kept) == 2 and len(sampled) == 4
    assert all(len({t.reward for t in group}) == 2 for group in kept)


def test_refill_stops_at_the_cap():
    calls = []

    def uninformative():
        calls.append(1)
        return [[_Traj(0), _Traj(0)], [_Traj(1), _Traj(1)]]

    kept, used, sampled = fill_batch(uninformative, num_groups=2, max_rounds=3)
    assert kept == [] and used == 3 and len(calls) == 3 and len(sampled) == 6


def test_no_filter_trains_on_the_first_round_whole():
    kept, used, _ = fill_batch(lambda: [[_Traj(0), _Traj(0)]], num_groups=4, max_rounds=3, use_filter=False)
    assert used == 1 and len(kept) == 1


def test_dspo_loss_equals_hand_computation():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.3, 0.1, 9.0], [-0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    # s_1 = exp((0.3 + 0.1) / 2) = exp(0.2) = 1.221: above 1 + 0.1 with A > 0, so clipped to 1.1.
    # s_2 = exp(-0.2 / 3) = 0.936: inside [0.9, 1.1], unclipped; A < 0.
    s2 = math.exp(-0.2 / 3)
    expected = -(1.1 * 1 + s2 * -1) / 2
    loss, metrics = dspo_loss(logp, old, mask, adv, clip_low=0.1, clip_high=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["clip_ratio/high"] == 0.5 and metrics["clip_ratio/low"] == 0.0
    assert metrics["ratio/max"] == pytest.approx(math.exp(0.2), rel=1e-6)


def test_grpo_loss_equals_hand_computation():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(0.9)]])
    mask = torch.ones(1, 2)
    loss, metrics = grpo_loss(logp, old, mask, torch.tensor([2.0]), clip=0.2)
    # token 1: min(1.5*2, 1.2*2) = 2.4; token 2: min(0.9*2, 0.9*2) = 1.8; mean over tokens.
    assert loss.item() == pytest.approx(-(2.4 + 1.8) / 2, rel=1e-6)
    assert metrics["clip_ratio/high"] == 0.5


def test_no_gradient_from_a_trajectory_clipped_on_its_advantages_side():
    old = torch.zeros(3, 2)
    logp = torch.tensor([[0.01, 0.01], [0.0001, 0.0001], [0.01, 0.01]], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0])  # row 0 clipped above with A > 0; row 2 above but A < 0
    loss, _ = dspo_loss(logp, old, torch.ones(3, 2), adv, clip_low=3e-4, clip_high=4e-4)
    loss.backward()
    assert logp.grad[0].abs().max() == 0
    assert logp.grad[1].abs().min() > 0 and logp.grad[2].abs().min() > 0


def test_clip_fraction_zero_on_policy_and_positive_after_the_policy_moved():
    torch.manual_seed(0)
    model, _ = tiny_model()
    ids = torch.randint(0, 250, (8, 20))
    attn = torch.ones_like(ids)
    mask = torch.ones(8, 19)
    adv = torch.tensor([1.0, -1.0] * 4)
    with torch.no_grad():
        old = token_logprobs(model, ids, attn)
    loss, metrics = dspo_loss(token_logprobs(model, ids, attn), old, mask, adv)
    assert metrics["clip_ratio/low"] == 0 and metrics["clip_ratio/high"] == 0 and metrics["ratio/mean"] == 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss.backward()
    optimizer.step()
    _, metrics = dspo_loss(token_logprobs(model, ids, attn), old, mask, adv)
    assert metrics["clip_ratio/low"] + metrics["clip_ratio/high"] > 0


# --------------------------------------------------------------------------------------------- rollout

class ScriptedPolicy(torch.nn.Module):
    """Stands in for the model's sampler: writes a fixed text per turn, token by token, through the
    same stopping criteria HF generate would call. Everything else in rollout() runs for real."""

    def __init__(self, tokenizer, turns: list[str], prompt: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.turns = tokenizer, turns
        self.observations_in_prompt = prompt.count("<information>")

    def generate(self, input_ids, attention_mask, generation_config, stopping_criteria):
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        rows = []
        for row in input_ids.tolist():
            context = self.tokenizer.decode(row)
            turn = (context.count("<information>") - self.observations_in_prompt
                    + context.count("My previous action is invalid"))
            script = self.tokenizer(self.turns[min(turn, len(self.turns) - 1)], add_special_tokens=False)["input_ids"]
            rows.append(script + [eos] * generation_config.max_new_tokens)
        out = input_ids
        for step in range(generation_config.max_new_tokens):
            out = torch.cat([out, torch.tensor([[r[step]] for r in rows])], dim=1)
            if stopping_criteria[0](out, None).all():
                break
        return out


def _scripted_episode(world, turns, **kwargs):
    _, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    prompt = encode_prompt(tokenizer, world.test[0].question, "few-shot", 3)
    policy = ScriptedPolicy(tokenizer, turns, tokenizer.decode(prompt))
    # Byte-level tokens: two passages take ~500 of them, so the total budget is generous here.
    episodes, _ = rollout(policy, tokenizer, index, [prompt], ["q"], topk=2, max_response_tokens=4096,
                          share_prefix=False, **kwargs)
    return episodes[0], tokenizer, index


def test_loss_mask_is_one_exactly_on_generated_tokens(world):
    name = world.passages[5].split("\n")[0]
    turns = [f"<search> {name} </search>", "<answer> Venmark </answer><|im_end|>"]
    episode, tokenizer, index = _scripted_episode(world, turns, max_turns=2, max_turn_tokens=64)
    generated = [t for t, m in zip(episode.response_ids, episode.loss_mask) if m == 1]
    spliced = [t for t, m in zip(episode.response_ids, episode.loss_mask) if m == 0]
    # Generation stops at </answer>: the end-of-turn token the script would write next is never sampled.
    assert generated == tokenizer(turns[0] + "<answer> Venmark </answer>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(spliced).startswith(f"\n<information>Doc 1(Title: {name})")
    assert tokenizer.decode(spliced).endswith("</information>\n")
    assert episode.valid_searches == 1 and episode.num_turns == 2 and episode.finished and not episode.truncated
    assert score_response(episode.response_text, ["venmark"]) == 1.0
    input_ids, attention_mask, loss_mask = collate([episode], tokenizer.pad_token_id)
    assert loss_mask.shape == (1, input_ids.shape[1] - 1)
    assert loss_mask[0, :len(episode.prompt_ids) - 1].sum() == 0  # prompt tokens are never trained
    targets = input_ids[0, 1:][loss_mask[0].bool()].tolist()
    assert targets == generated


def test_sequence_ratio_ignores_information_tokens(world):
    name = world.passages[7].split("\n")[0]
    episode, tokenizer, _ = _scripted_episode(world, [f"<search> {name} </search>", "<answer> x </answer>"],
                                              max_turns=2, max_turn_tokens=64)
    _, _, mask = collate([episode], tokenizer.pad_token_id)
    torch.manual_seed(0)
    old = torch.randn(mask.shape)
    logp = old + 0.01 * torch.randn(mask.shape)
    changed = torch.where(mask.bool(), logp, logp + 5 * torch.randn(mask.shape))  # new information tokens
    assert (mask == 0).sum() > 50
    assert torch.equal(sequence_log_ratio(logp, old, mask), sequence_log_ratio(changed, old, mask))


def test_invalid_action_gets_a_corrective_observation(world):
    episode, tokenizer, _ = _scripted_episode(world, ["I think so.<|im_end|>", "<answer> x </answer>"],
                                              max_turns=2, max_turn_tokens=64)
    spliced = tokenizer.decode([t for t, m in zip(episode.response_ids, episode.loss_mask) if m == 0])
    assert spliced == INVALID_ACTION and episode.num_turns == 2 and episode.finished
    assert extract_answer(episode.response_text) == "x"


def test_turn_budget_truncates_the_episode(world):
    episode, _, _ = _scripted_episode(world, ["blah " * 40], max_turns=2, max_turn_tokens=10)
    assert episode.truncated and not episode.finished and len(episode.response_ids) == 10


def test_the_last_turn_runs_no_search(world):
    name = world.passages[3].split("\n")[0]
    episode, _, _ = _scripted_episode(world, [f"<search> {name} </search>", f"<search> {name} </search><|im_end|>"],
                                      max_turns=1, max_turn_tokens=64)
    assert episode.valid_searches == 1 and episode.num_turns == 2 and episode.finished
    assert extract_answer(episode.response_text) is None


def test_rollout_with_a_real_model_scores_exactly_the_sampled_tokens(world):
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    prompts = [encode_prompt(tokenizer, q.question, "zero-shot") for q in world.test[:3]]
    episodes, timings = rollout(model, tokenizer, index, prompts, ["a", "b", "c"], max_turns=1,
                                max_turn_tokens=12, max_response_tokens=40)
    assert set(timings) == {"generate", "search", "splice"}
    for e in episodes:
        assert len(e.response_ids) == len(e.loss_mask) and 0 < sum(e.loss_mask) <= 40
    input_ids, attention_mask, loss_mask = collate(episodes, tokenizer.pad_token_id)
    logp = token_logprobs(model, input_ids, attention_mask)
    assert logp.shape == loss_mask.shape and torch.isfinite(logp).all()


def test_shared_prefix_cache_changes_no_token_and_no_log_prob(world):
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    prompts = [encode_prompt(tokenizer, q.question, "few-shot", 2) for q in world.test[:3]]
    runs = [rollout(model, tokenizer, index, prompts, ["a", "b", "c"], greedy=True, max_turn_tokens=6,
                    max_response_tokens=30, share_prefix=share)[0] for share in (False, True)]
    assert [e.response_ids for e in runs[0]] == [e.response_ids for e in runs[1]]
    input_ids, attention_mask, loss_mask = collate(runs[1], tokenizer.pad_token_id)
    prefix_len = shared_prefix_length([e.prompt_ids for e in runs[1]])
    assert 100 < prefix_len < min(len(e.prompt_ids) for e in runs[1])
    full = token_logprobs(model, input_ids, attention_mask, 0.7)
    shared = token_logprobs(model, input_ids, attention_mask, 0.7, prefix_len)
    assert torch.allclose(full[loss_mask.bool()], shared[loss_mask.bool()], atol=1e-5)
    assert shared[:, :prefix_len].abs().max() == 0


HOSTILE_PIECES = ["<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>", "<", ">",
                  "/", " ", "\n", "\t", "\x00", "\x1b[31m", "\u202e", "東京", "é", "🙂", "a", "Paris", "the",
                  "..."]


def test_action_parser_and_reward_survive_hostile_text():
    rng = np.random.default_rng(1234)
    index = BM25Index(["Paris\nParis is the capital of France.", "Tokyo\n東京 is in Japan."])
    kinds = {}
    for case in range(3000):
        pieces = rng.choice(HOSTILE_PIECES, size=rng.integers(0, 40))
        text = "".join(pieces) + ("w " * int(rng.integers(0, 400)) if case % 7 == 0 else "")
        if case % 11 == 0:  # raw random code points, control characters and surrogates included
            text = "".join(chr(c) for c in rng.integers(0, 0x10FFFF, size=30) if not 0xD800 <= c < 0xE000)
        stopped, last_turn = bool(case % 3), case % 5 == 0
        kind, query = parse_action(text, stopped, last_turn)
        kinds[kind] = kinds.get(kind, 0) + 1
        assert (kind == "answer") == (extract_answer(text) is not None)
        if kind == "search":
            assert 0 < len(query) <= MAX_QUERY_CHARS and "<search>" not in query and query == query.strip()
            assert len(index.search([query], 2)[0]) == 2
        else:
            assert query == ""
        assert exact_match(extract_answer(text), [text]) in (0.0, 1.0)
        assert 0.0 <= token_f1(extract_answer(text), ["Paris", text]) <= 1.0
        normalize_answer(text)
    assert set(kinds) == {"answer", "search", "invalid", "truncated", "end"}, kinds


@pytest.mark.parametrize("text, stopped, last_turn, expected", [
    ("<search> capital of  France </search>", True, False, ("search", "capital of France")),
    ("<search> a <search> b </search>", True, False, ("search", "b")),  # nested: the innermost query
    ("<search>   </search>", True, False, ("invalid", "")),  # empty query
    ("capital </search>", True, False, ("invalid", "")),  # closed but never opened
    ("I think so.", True, False, ("invalid", "")),  # end of turn, no action
    ("<search> unclosed", False, False, ("truncated", "")),  # hit the turn's token budget
    ("<answer> Paris", True, False, ("invalid", "")),  # unclosed answer ended by end of turn
    ("<answer> Paris </answer>", True, False, ("answer", "")),
    ("<search> q </search>", True, True, ("end", "")),  # no search in the last turn
    ("<search>" + "long " * 200 + "</search>", True, False, ("search", ("long " * 52)[:MAX_QUERY_CHARS].strip())),
])
def test_each_action_has_a_defined_outcome(text, stopped, last_turn, expected):
    assert parse_action(text, stopped, last_turn) == expected


def test_an_answer_split_across_turns_counts_as_the_answer():
    assert parse_action("mark </answer>", True, False, earlier="<answer> Ven") == ("answer", "")
    assert extract_answer("<answer> Ven" + "mark </answer>") == "Venmark"


def test_answer_inside_retrieved_information_scores_nothing():
    _, tokenizer = tiny_model()
    index = BM25Index(["Trap\nThe answer is <answer> Venmark </answer> says this passage."])
    prompt = encode_prompt(tokenizer, "Where?", "zero-shot")
    policy = ScriptedPolicy(tokenizer, ["<search> trap </search>", "I do not know.<|im_end|>"],
                            tokenizer.decode(prompt))
    episode = rollout(policy, tokenizer, index, [prompt], ["q"], max_turns=1, max_turn_tokens=64,
                      max_response_tokens=4096, share_prefix=False)[0][0]
    assert "<answer> Venmark </answer>" in tokenizer.decode(episode.response_ids)  # the model saw it
    assert episode.finished and score_response(episode.response_text, ["Venmark"]) == 0.0


def test_context_overflow_ends_the_episode_truncated_not_with_an_error(world):
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    short = encode_prompt(tokenizer, "Where?", "zero-shot")
    long = encode_prompt(tokenizer, "Where? " * 200, "zero-shot")
    episodes, _ = rollout(model, tokenizer, index, [short, long], ["a", "b"], max_turns=2, max_turn_tokens=16,
                          max_response_tokens=512, max_context=len(short) + 10)
    fits, overflow = episodes
    assert overflow.truncated and overflow.response_ids == [] and overflow.num_turns == 0
    assert 0 < len(fits.response_ids) <= 10 and len(fits.loss_mask) == len(fits.response_ids)
    assert fits.finished or fits.truncated
    input_ids, attention_mask, loss_mask = collate(episodes, tokenizer.pad_token_id)
    assert loss_mask[1].sum() == 0 and loss_mask[0].sum() == sum(fits.loss_mask)
    logp = token_logprobs(model, input_ids, attention_mask)
    loss, _ = dspo_loss(logp, logp.detach(), loss_mask, torch.tensor([1.0, -1.0]))
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------- training

def test_two_step_tiny_run_writes_metrics_and_a_checkpoint_that_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    main(["--model", "tiny", "--steps", "2", "--no-filter", "--batch-prompts", "2", "--group-size", "2",
          "--max-turn-tokens", "8", "--max-response-tokens", "48", "--eval-every", "1", "--eval-size", "4",
          "--mini-batches", "2", "--micro-batch", "2", "--out", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in ["reward", "reward_std", "frac_reward_zero_std", "num_gen_batches", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "num_turns/mean", "env/number_of_valid_search", "response_length/mean",
                "state_tokens/coverage", "time/rollout_s", "time/update_s", "val/em"]:
        assert key in records[0], key
    assert records[0]["trained_trajectories"] == 4 and records[0]["clip_ratio/low_mean"] == 0.0
    checkpoint = out / "checkpoint-000002"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer("<search>", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("<search>")]


def test_eval_only_writes_em_per_source(tmp_path):
    result = main(["--model", "tiny", "--eval-only", "--eval-size", "4", "--max-turn-tokens", "4",
                   "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == result and saved["val/em"] == 0.0
    assert any(key.startswith("val/em/synthetic") for key in saved)


def test_a_malformed_data_file_stops_with_one_line_naming_file_and_line(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q1", "golden_answers": ["a"]}\n{"question": "q2"}\n')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"title": "T", "text": "x"}\n')
    with pytest.raises(SystemExit) as stop:
        main(["--model", "tiny", "--data", str(qa), "--corpus", str(corpus), "--out", str(tmp_path / "run")])
    assert f"{qa}:2" in str(stop.value) and "golden_answers" in str(stop.value) and "\n" not in str(stop.value)


def test_default_model_converts_from_the_packaged_gguf_once(tmp_path, monkeypatch):
    import time
    import train
    from transformers import AutoModelForCausalLM, AutoTokenizer
    monkeypatch.setattr(train, "CACHE", tmp_path)
    path = train.smollm2_checkpoint()
    began = time.perf_counter()
    assert train.smollm2_checkpoint() == path and time.perf_counter() - began < 1.0  # reused, not converted again
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    assert model.config.num_hidden_layers == 30 and 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert not hasattr(model.config, "quantization_config")


TINY_RUN = ["--model", "tiny", "--template", "zero-shot", "--batch-prompts", "2", "--group-size", "2",
            "--max-turn-tokens", "6", "--max-response-tokens", "24", "--eval-size", "2"]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, monkeypatch):
    import evaluate
    # A random tiny model never answers right; a reward from the text's length gives real gradients.
    monkeypatch.setattr(evaluate, "score_response", lambda response, answers: float(len(response) % 2))
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = TINY_RUN + ["--no-filter", "--eval-every", "2", "--save-every", "2", "--lr", "1e-2", "--warmup", "5"]
    main(common + ["--steps", "4", "--out", str(straight)])
    main(common + ["--steps", "2", "--out", str(split)])
    main(common + ["--steps", "4", "--out", str(split), "--resume"])
    untimed = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _records(straight / "metrics.jsonl")]
    resumed = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _records(split / "metrics.jsonl")]
    assert len(untimed) == 5 and any(r.get("grad_norm", 0) > 0 for r in untimed)  # the weights really moved
    # The split run also logged the final evaluation of its first half (step 2, evaluation only).
    assert resumed[:2] + resumed[3:] == untimed and resumed[2] == {k: v for k, v in untimed[2].items()
                                                                   if k == "step" or k.startswith("val/")}


def test_an_all_filtered_batch_is_skipped_and_logged_without_nan(tmp_path):
    main(TINY_RUN + ["--steps", "1", "--eval-every", "0", "--max-gen-rounds", "2", "--out", str(tmp_path)])
    record = _records(tmp_path / "metrics.jsonl")[0]
    assert record["skipped"] == 1 and record["num_gen_batches"] == 2 and record["frac_reward_zero_std"] == 1.0
    assert "loss" not in record and all(math.isfinite(v) for v in record.values() if isinstance(v, float))


def test_a_non_finite_gradient_skips_the_optimizer_step():
    from rollout import Episode
    import train
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
    episodes = [Episode(group_id="g", prompt_ids=[1, 2, 3], response_ids=[4, 5, 6, 7], loss_mask=[1, 1, 0, 1])
                for _ in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    args = train.parse_args(["--model", "tiny", "--mini-batches", "2", "--micro-batch", "2"])
    nan = float("nan")
    pad = tokenizer.pad_token_id
    result = train.update(model, optimizer, scheduler, episodes, torch.tensor([nan, nan, nan, nan]), args, pad)
    assert result["skipped_optimizer_steps"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # One poisoned trajectory costs only the mini-batch it lands in.
    result = train.update(model, optimizer, scheduler, episodes, torch.tensor([1.0, nan, -1.0, 0.5]), args, pad)
    assert result["skipped_optimizer_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_crash_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    import train
    model, tokenizer = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
    for step in (1, 2, 3):
        train.save_checkpoint(tmp_path, step, model, tokenizer, optimizer, scheduler, {"epoch": 0, "position": step},
                              keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "checkpoint-000003"]

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(train.torch, "save", disk_full)
    with pytest.raises(OSError):
        train.save_checkpoint(tmp_path, 4, model, tokenizer, optimizer, scheduler, {"epoch": 0, "position": 4},
                              keep=2)
    latest = train.find_checkpoint(tmp_path, "latest")
    assert latest.name == "checkpoint-000003"
    assert torch.load(latest / "trainer_state.pt", weights_only=True)["data_state"]["position"] == 3


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    import signal
    import time
    command = [sys.executable, "train.py", *TINY_RUN, "--no-filter", "--steps", "1000", "--eval-every", "0",
               "--save-every", "1000", "--out", str(tmp_path)]
    process = subprocess.Popen(command, cwd=Path(__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    done = len(_records(log))
    assert 1 <= done < 1000
    state = torch.load(tmp_path / f"checkpoint-{done:06d}" / "trainer_state.pt", weights_only=True)
    assert state["step"] == done and "stopped by signal" in output


def test_dspo_raises_mean_reward_on_a_small_problem():
    """A 1-layer policy over 8 tokens; reward 1 when the first sampled token is 5 (chance about 1/8).
    Group advantages, the filter and the clipped sequence-level loss with 4 mini-batches must lift
    the mean reward well above chance."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = Qwen2ForCausalLM(config).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    prompt = torch.tensor([[1, 2, 3]]).repeat(32, 1)
    group_ids = [i // 8 for i in range(32)]  # 4 questions x 8 samples
    history = []
    for step in range(25):
        with torch.no_grad():
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                                 max_new_tokens=3, min_new_tokens=3, pad_token_id=0, eos_token_id=None)
        rewards = (ids[:, 3] == 5).float()
        history.append(rewards.mean().item())
        keep = filter_groups(rewards, group_ids)
        if not keep.any():
            continue
        adv = group_advantages(rewards, group_ids)[keep]
        ids, attn = ids[keep], torch.ones_like(ids[keep])
        mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        mask[:, 2:] = 1  # targets 3..5 are the sampled tokens
        with torch.no_grad():
            old = token_logprobs(model, ids, attn)
        for chunk in torch.arange(ids.shape[0]).chunk(4):
            optimizer.zero_grad()
            loss, _ = dspo_loss(token_logprobs(model, ids[chunk], attn[chunk]), old[chunk], mask[chunk], adv[chunk])
            loss.backward()
            optimizer.step()
    assert sum(history[:3]) / 3 < 0.35
    assert sum(history[-5:]) / 5 > sum(history[:3]) / 3 + 0.4
    assert sum(history[-5:]) / 5 > sum(history[:3]) / 3 + 0.4


# "capital" and "paris" are in 3 of 5 passages, so their raw idf is negative and the epsilon floor applies.
HAND_TEXTS = [
    "Paris\nParis is the capital of France. Paris has the Eiffel Tower.",
    "France\nFrance is a country in Europe; its capital is Paris.",
    "Berlin\nBerlin is the capital of Germany.",
    "Eiffel Tower\nThe Eiffel Tower is a wrought-iron tower in Paris.",
    "Europe\nEurope is a continent.",
]
HAND_QUERIES = ["capital", "Paris paris tower", "eiffel zanzibar", "zanzibar", "what is the", "",
                "capital of Germany", "tower tower tower europe"]


def zipf_corpus(seed: int, n_texts: int, vocab_size: int = 40) -> tuple[list[str], list[str]]:
    """Passages of 0-30 words with word rank r drawn ~ 1/r: head words sit in most passages."""
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, vocab_size + 1)
    probs /= probs.sum()

    def words(n):
        return " ".join(f"w{r}" for r in rng.choice(vocab_size, size=n, p=probs))

    texts = [f"title{i}\n{words(rng.integers(0, 31))}" for i in range(n_texts)]
    queries = [words(rng.integers(1, 6)) + " unknownword" * int(rng.integers(0, 2)) for _ in range(12)]
    return texts, queries


def reference(texts: list[str]) -> BM25Okapi:
    return BM25Okapi([tokenize(text) for text in texts])


def reference_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:k]  # stable: equal scores keep the lower passage index first


def test_tokenize_lowercases_splits_punctuation_and_drops_stopwords():
    assert tokenize("What is the Capital of FRANCE? Paris!") == ["capital", "france", "paris"]
    assert tokenize("Jean-Paul's 1999 world_cup") == ["jean", "paul", "s", "1999", "world_cup"]


def test_tokenize_handles_empty_control_and_unicode_text():
    assert tokenize("") == []
    assert tokenize("the of a") == []
    assert tokenize("\x00\x01\t\n \r") == []
    assert tokenize("Ünïcödé CAFÉ 東京 naïve") == ["ünïcödé", "café", "東京", "naïve"]
    assert tokenize("x\x00y\ud800z") == ["x", "y", "z"]  # a lone surrogate is not a word character


def test_scores_match_rank_bm25_on_hand_corpus_with_epsilon_floor():
    index, baseline = BM25Index(HAND_TEXTS), reference(HAND_TEXTS)
    assert baseline.idf["capital"] == pytest.approx(0.25 * baseline.average_idf)  # the floor is in play
    for query in HAND_QUERIES:
        expected = baseline.get_scores(tokenize(query))
        np.testing.assert_allclose(index.scores(query), expected, rtol=1e-6, atol=1e-12)
    # a repeated term counts once per occurrence; an unknown term adds nothing
    np.testing.assert_allclose(index.scores("tower tower"), 2 * index.scores("tower"), rtol=1e-12)
    np.testing.assert_array_equal(index.scores("zanzibar"), np.zeros(5))
    assert index.scores("capital")[1] > 0


@pytest.mark.parametrize("seed,n_texts", [(0, 1), (1, 7), (2, 60), (3, 300)])
def test_scores_match_rank_bm25_on_random_zipf_corpora(seed, n_texts):
    texts, queries = zipf_corpus(seed, n_texts)
    index, baseline = BM25Index(texts), reference(texts)
    for query in queries:
        np.testing.assert_allclose(index.scores(query), baseline.get_scores(tokenize(query)),
                                   rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("seed,n_texts", [(0, 1), (4, 9), (5, 200)])
def test_top_k_matches_stable_argsort_of_rank_bm25_scores(seed, n_texts):
    texts, queries = zipf_corpus(seed, n_texts)
    index, baseline = BM25Index(texts), reference(texts)
    for k in (1, 3, 10, n_texts + 5):
        for query, hits in zip(queries, index.search(queries, k)):
            expected = baseline.get_scores(tokenize(query))
            top = reference_top_k(expected, k)
            assert [doc for doc, _ in hits] == top.tolist()
            np.testing.assert_allclose([score for _, score in hits], expected[top], rtol=1e-6, atol=1e-12)


def test_search_breaks_ties_by_lower_index():
    texts = ["t0\nred apple", "t1\ngreen pear", "t2\nred apple", "t3\nred apple", "t4\nblue sky"]
    hits = BM25Index(texts).search(["apple"], 2)[0]
    assert [doc for doc, _ in hits] == [0, 2]
    assert hits[0][1] == hits[1][1] > 0


def test_query_without_known_terms_returns_first_passages_with_zero_score():
    assert BM25Index(HAND_TEXTS).search(["zanzibar", ""], 3) == [[(0, 0.0), (1, 0.0), (2, 0.0)]] * 2


def test_k_beyond_corpus_returns_every_passage_and_k_zero_none():
    index = BM25Index(HAND_TEXTS)
    assert sorted(doc for doc, _ in index.search(["paris"], 50)[0]) == [0, 1, 2, 3, 4]
    assert index.search(["paris"], 0) == [[]]
    assert len(index) == 5 and index.texts is HAND_TEXTS


def test_batched_search_equals_one_query_at_a_time():
    texts, queries = zipf_corpus(6, 120)
    index = BM25Index(texts)
    assert index.search(queries, 5) == [index.search([query], 5)[0] for query in queries]
    assert index.search([], 5) == []


def test_corpus_without_indexable_words_scores_zero():
    index = BM25Index(["", "The\nof the", "\x00"])
    np.testing.assert_array_equal(index.scores("the anything"), np.zeros(3))
    assert index.search(["anything"], 2) == [[(0, 0.0), (1, 0.0)]]


def test_format_hits_renders_numbered_title_and_text_lines():
    texts = ["Paris\nParis is the capital.\nIt has a tower.", "Berlin\nBerlin is big."]
    assert format_hits([(1, 2.5), (0, 1.0)], texts) == (
        "Doc 1(Title: Berlin) Berlin is big.\n"
        "Doc 2(Title: Paris) Paris is the capital. It has a tower.")
    assert format_hits([], texts) == ""


def test_empty_corpus_raises_value_error():
    with pytest.raises(ValueError, match="empty corpus: no passages to index"):
        BM25Index([])


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def assert_one_line_error(excinfo, where):
    message = str(excinfo.value)
    assert where in message, message
    assert "\n" not in message


# --- QA JSONL --------------------------------------------------------------------------------------

def test_qa_loader_reads_flashrag_lines_with_and_without_id(tmp_path):
    path = write_lines(tmp_path / "nq_test.jsonl", [
        json.dumps({"id": "test_0", "question": "who wrote hamlet?", "golden_answers": ["Shakespeare", "W. S."]}),
        "",
        json.dumps({"question": "capital of france?", "golden_answers": "Paris"}),
    ])
    examples = load_qa_jsonl(path)
    assert examples == [
        QAExample("test_0", "who wrote hamlet?", ["Shakespeare", "W. S."], "nq"),
        QAExample("nq-3", "capital of france?", ["Paris"], "nq"),
    ]
    assert load_qa_jsonl(path, source="custom")[1].id == "custom-3"


@pytest.mark.parametrize("bad_line, line_no", [
    ('{"question": "q", "golden_answers": ["a"]', 3),          # truncated JSON
    ('["q", "a"]', 3),                                          # not an object
    ('{"golden_answers": ["a"]}', 3),                           # missing question
    ('{"question": "q"}', 3),                                   # missing answers
    ('{"question": "q", "golden_answers": []}', 3),             # empty answers
    ('{"question": "q", "golden_answers": ["a", 7]}', 3),       # non-string answer
])
def test_qa_loader_rejects_malformed_line_naming_file_and_line(tmp_path, bad_line, line_no):
    good = json.dumps({"question": "q", "golden_answers": ["a"]})
    path = write_lines(tmp_path / "train.jsonl", [good, good, bad_line, good])
    with pytest.raises(DataError) as excinfo:
        load_qa_jsonl(path)
    assert_one_line_error(excinfo, f"{path}:{line_no}:")


def test_qa_loader_missing_field_message_names_the_field(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", ['{"question": "q"}'])
    with pytest.raises(DataError, match=r"train\.jsonl:1: missing field 'golden_answers'$"):
        load_qa_jsonl(path)


def test_qa_loader_rejects_non_utf8_naming_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"question": "q", "golden_answers": ["a"]}\n{"question": "caf\xe9", "golden_answers": ["a"]}\n')
    with pytest.raises(DataError) as excinfo:
        load_qa_jsonl(path)
    assert_one_line_error(excinfo, f"{path}:2:")


def test_qa_loader_reports_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_qa_jsonl(tmp_path / "nope.jsonl")
    assert str(excinfo.value) == f"{tmp_path / 'nope.jsonl'}: no such file"
    empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError) as excinfo:
        load_qa_jsonl(empty)
    assert str(excinfo.value) == f"{empty}: no questions"


# --- Corpus JSONL ----------------------------------------------------------------------------------

def test_corpus_loader_wiki18_and_plain_shapes_give_same_passages(tmp_path):
    wiki = write_lines(tmp_path / "wiki.jsonl", [
        json.dumps({"id": "1", "contents": '"Hamlet"\nHamlet is a tragedy by William Shakespeare.'}),
        json.dumps({"id": "2", "contents": '"Paris"\nParis is the capital of France.'}),
    ])
    plain = write_lines(tmp_path / "plain.jsonl", [
        json.dumps({"title": "Hamlet", "text": "Hamlet is a tragedy by William Shakespeare."}),
        json.dumps({"title": "Paris", "text": "Paris is the capital of France."}),
    ])
    expected = ["Hamlet\nHamlet is a tragedy by William Shakespeare.", "Paris\nParis is the capital of France."]
    assert load_corpus_jsonl(wiki) == expected
    assert load_corpus_jsonl(plain) == expected


@pytest.mark.parametrize("bad_line", ['{"id": "1", "contents": "x"', '"just a string"', '{"id": "1", "body": "x"}'])
def test_corpus_loader_rejects_malformed_line_naming_file_and_line(tmp_path, bad_line):
    good = json.dumps({"title": "T", "text": "t"})
    path = write_lines(tmp_path / "corpus.jsonl", [good, bad_line])
    with pytest.raises(DataError) as excinfo:
        load_corpus_jsonl(path)
    assert_one_line_error(excinfo, f"{path}:2:")


def test_corpus_loader_reports_missing_file_empty_corpus_and_bad_bytes(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_corpus_jsonl(tmp_path / "nope.jsonl")
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError) as excinfo:
        load_corpus_jsonl(empty)
    assert str(excinfo.value) == f"{empty}: empty corpus"
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"title": "T", "text": "t"}\n\n\xff\xfe\n')
    with pytest.raises(DataError) as excinfo:
        load_corpus_jsonl(binary)
    assert_one_line_error(excinfo, f"{binary}:3:")


# --- Synthetic world -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world():
    return synthetic_world(seed=0)


def titles(world):
    return [passage.split("\n", 1)[0] for passage in world.passages]


def test_synthetic_world_is_deterministic_per_seed(world):
    assert synthetic_world(seed=0) == world
    assert synthetic_world(seed=1).passages != world.passages


def test_synthetic_world_is_identical_in_another_process_with_other_hash_seed(world):
    script = ("from world import synthetic_world; "
              "w = synthetic_world(seed=0); print(repr((w.train, w.test, w.passages)))")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={"PYTHONHASHSEED": "12345"}, cwd=Path(__file__).parent).stdout
    assert output.strip() == repr((world.train, world.test, world.passages))


def test_synthetic_world_default_sizes_and_split(world):
    assert len(world.passages) == 198
    assert (len(world.train), len(world.test)) == (480, 120)
    ids = [e.id for e in world.train + world.test]
    assert len(set(ids)) == len(ids) and all(i.startswith("syn-") and len(i) == 10 for i in ids)
    assert not {e.id for e in world.train} & {e.id for e in world.test}


def test_synthetic_world_has_both_hop_counts_in_both_splits(world):
    for split in (world.train, world.test):
        sources = [e.source for e in split]
        assert sources.count("synthetic-1hop") == sources.count("synthetic-2hop") > 0


def test_synthetic_world_names_are_unique_and_answers_single(world):
    names = titles(world)
    assert len(set(names)) == len(names)
    assert all(1 <= len(name.split()) <= 2 for name in names)
    assert all(len(e.answers) == 1 and e.answers[0] in names for e in world.train + world.test)


def test_synthetic_answers_are_in_corpus_but_never_in_question(world):
    corpus = "\n".join(world.passages)
    for example in world.train + world.test:
        assert example.answers[0] in corpus
        assert example.answers[0] not in example.question


def test_synthetic_two_hop_answer_is_absent_from_subject_passage(world):
    two_hop = [e for e in world.train + world.test if e.source == "synthetic-2hop"]
    for example in two_hop:
        subjects = [p for p in world.passages if p.split("\n", 1)[0] in example.question]
        assert len(subjects) == 1, example.question
        assert example.answers[0] not in subjects[0]


def test_synthetic_one_hop_answer_is_in_subject_passage(world):
    for example in [e for e in world.train + world.test if e.source == "synthetic-1hop"]:
        subjects = [p for p in world.passages if p.split("\n", 1)[0] in example.question]
        assert len(subjects) == 1 and example.answers[0] in subjects[0]


def test_synthetic_world_never_uses_excluded_names(world):
    taken = titles(world)[:2]  # names the seed-0 world would use
    exclude = frozenset({"Brell Tavosh", "Quarnith", *taken})
    other = synthetic_world(seed=0, exclude=exclude)
    corpus = "\n".join(other.passages).lower()
    for name in exclude:
        for word in name.lower().split():
            assert word not in corpus
