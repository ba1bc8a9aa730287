"""Probe: before training, how often does sampling find a right trajectory, per kind of question?

DSPO learns only from groups whose rewards differ (dspo.py). A kind of question that the untrained policy
never gets right, even once in a group, gives the filter nothing to keep and the update nothing to
reinforce, however long the run. This script samples --group-size trajectories for --questions training
questions of each source with train.py's rollout settings and reports, per source:

    correct           mean reward over the sampled trajectories
    2+ searches       fraction of trajectories that searched at least twice
    informative       fraction of groups whose rewards are not all equal (what the filter keeps)
    truncated         fraction that ran out of a token budget

    python -m tools.probe                                   # the demo's world and settings
    python -m tools.probe --distractors                     # the same, passages with their distractor sentences

Any train.py flag is accepted (--temperature, --topk, --max-turn-tokens, --model, ...).
Left out: other datasets than the synthetic world, and greedy decoding (train.py --eval-only does that).
"""
import argparse
import time

import numpy as np
import torch

from dspo import informative
from models import load_model
from prompts import EXAMPLE_NAMES
from reward import score_episodes
from rollout import RolloutSettings, generate_episodes
from search import BM25Index
from train import parse_args, settings_for
from world import synthetic_world


def probe(model, tokenizer, index, questions, settings: RolloutSettings, group_size: int) -> dict:
    """The numbers above for one list of questions, each sampled `group_size` times."""
    examples = [q for q in questions for _ in range(group_size)]
    group_ids = [f"{q.id}#probe" for q in examples]
    episodes = generate_episodes(model, tokenizer, index, examples, group_ids, settings, desc="probe")
    score_episodes(episodes, examples)
    rewards = np.array([e.reward for e in episodes]).reshape(len(questions), group_size)
    return {"questions": len(questions), "trajectories": len(episodes), "correct": float(rewards.mean()),
            "2+ searches": float(np.mean([e.valid_searches >= 2 for e in episodes])),
            "informative": float(np.mean([informative(group) for group in rewards])),
            "truncated": float(np.mean([e.truncated for e in episodes]))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=24, help="training questions per source")
    p.add_argument("--distractors", action="store_true", help="passages with their distractor sentences")
    own, rest = p.parse_known_args(argv)
    args = parse_args(rest)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    world = synthetic_world(seed=args.seed, exclude=EXAMPLE_NAMES, distractors=own.distractors)
    index = BM25Index(world.passages)
    print("| source | questions | trajectories | correct | 2+ searches | informative groups | truncated | s |")
    print("|---|---|---|---|---|---|---|---|")
    for source in sorted({q.source for q in world.train}):
        questions = [q for q in world.train if q.source == source][:own.questions]
        began = time.perf_counter()
        row = probe(model, tokenizer, index, questions, settings_for(RolloutSettings, args), args.group_size)
        print(f"| {source} | {row['questions']} | {row['trajectories']} | {row['correct']:.2f} | "
              f"{row['2+ searches']:.2f} | {row['informative']:.2f} | {row['truncated']:.2f} | "
              f"{time.perf_counter() - began:.0f} |", flush=True)


if __name__ == "__main__":
    main()
