"""Generate scored trajectories, and evaluate a policy greedily on held-out questions.

generate_episodes() is the sampler of training (one trajectory per example, in chunks of --rollout-batch,
each scored by exact match); evaluate() runs it greedily on questions never trained on and reports EM and F1
overall and per source, searches per question and response length.
"""
import numpy as np
from tqdm import tqdm

from reward import extract_answer, score_response, token_f1
from rollout import encode_prompt, rollout


def generate_episodes(model, tokenizer, index, examples, group_ids, args, template, greedy=False, desc="rollout"):
    """One trajectory per example (repeat an example for a group), in chunks of --rollout-batch, scored."""
    episodes = []
    with tqdm(total=len(examples), desc=desc, leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(examples), args.rollout_batch):
            chunk = examples[start:start + args.rollout_batch]
            prompts = [encode_prompt(tokenizer, example.question, template, args.topk) for example in chunk]
            chunk_episodes, _ = rollout(
                model, tokenizer, index, prompts, group_ids[start:start + args.rollout_batch],
                max_turns=args.max_turns, topk=args.topk, max_turn_tokens=args.max_turn_tokens,
                max_response_tokens=args.max_response_tokens, greedy=greedy, temperature=args.temperature,
                max_context=getattr(model.config, "max_position_embeddings", None))
            for episode, example in zip(chunk_episodes, chunk):
                episode.reward = score_response(episode.response_text, example.answers)
            episodes += chunk_episodes
            bar.update(len(chunk))
    return episodes


def evaluate(model, tokenizer, index, examples, args, template) -> dict:
    """Greedy rollouts on held-out questions: EM and F1 overall and per source, searches, length."""
    episodes = generate_episodes(model, tokenizer, index, examples, [e.id for e in examples], args, template,
                                 greedy=True, desc="eval")
    result = {"val/em": float(np.mean([e.reward for e in episodes])),
              "val/f1": float(np.mean([token_f1(extract_answer(e.response_text), x.answers)
                                       for e, x in zip(episodes, examples)])),
              "val/searches": float(np.mean([e.valid_searches for e in episodes])),
              "val/response_length": float(np.mean([sum(e.loss_mask) for e in episodes]))}
    for source in sorted({x.source for x in examples}):
        scores = [e.reward for e, x in zip(episodes, examples) if x.source == source]
        result[f"val/em/{source}"] = float(np.mean(scores))
    return result
