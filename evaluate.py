"""Generate scored trajectories; evaluate the policy and two baselines greedily; write the results table.

generate_episodes() is the sampler of training (one trajectory per example, in chunks of --rollout-batch,
each scored by exact match). evaluate_method() runs one method greedily on held-out questions and
summarize() turns its episodes into the numbers of a published search-agent table (Search-R1, DSPO):

    EM_d = mean over the questions of dataset d of  1[normalize(answer) == normalize(some gold)]
    Avg  = mean over datasets d of EM_d          (unweighted: a small dataset weighs as much as a large one)

plus F1, searches per question and response length (generated tokens), overall and per dataset. The dataset
of a question is its QAExample.source. evaluate() is the flat view training logs ("val/em", "val/em/<source>").
write_eval_report() writes eval.json and eval.md with one row per method.

Methods, all with the same model, index, --topk and token budgets:
- agent:  the search agent (rollout.py's prompt, up to --max-turns searches, then an answer-only turn).
- direct: the question alone, answered in one turn with no search.
- rag:    the top-k BM25 passages for the question itself, shown inside <information> exactly as
          search.format_hits renders them for the agent, answered in one turn. That one retrieval is the
          method's, not a model search: rag reports 0 searches per question, like direct.
The baselines reuse rollout() with max_turns=0, so they stop, truncate and score exactly as the agent does.

Left out: sampled (pass@k) evaluation, LLM-judged or cover-match accuracy, confidence intervals, and baselines
that need other models or training (IRCoT, Search-o1, SFT, R1 without search).
"""
import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from reward import extract_answer, exact_match, score_response, token_f1
from models import world
from rollout import EXAMPLE_EPISODES, EXAMPLE_PASSAGES, encode_messages, encode_prompt, rollout
from search import BM25Index, format_hits

METHOD_LABELS = {"direct": "Direct", "rag": "RAG", "agent": "Search agent (this checkpoint)"}
# Column order and names of the published tables; any other source gets a column after these.
DATASETS = {"nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
            "2wikimultihopqa": "2Wiki", "musique": "Musique", "bamboogle": "Bamboogle"}


def generate_episodes(model, tokenizer, index, examples, group_ids, args, template, greedy=False, desc="rollout",
                      method="agent"):
    """One trajectory per example (repeat an example for a group), in chunks of --rollout-batch, scored.

    `method` "agent" searches (up to --max-turns); "direct" and "rag" answer in one turn from their own
    prompts. With W processes each generates a contiguous W-th of the examples and every process gets all
    the episodes back, in order. Each chunk's sampling is seeded from --seed and its first group id, so
    a chunk samples the same tokens whichever process runs it (and after a resume).
    """
    rank, size = world()
    share = math.ceil(len(examples) / size)
    mine = range(min(len(examples), rank * share), min(len(examples), (rank + 1) * share))
    episodes = []
    with tqdm(total=len(mine), desc=desc, leave=False, dynamic_ncols=True, disable=rank != 0) as bar:
        for start in range(mine.start, mine.stop, args.rollout_batch):
            chunk = examples[start:min(start + args.rollout_batch, mine.stop)]
            if method == "agent":
                prompts = [encode_prompt(tokenizer, example.question, template, args.topk) for example in chunk]
            else:
                prompts = baseline_prompts(tokenizer, index, chunk, method, template, args.topk)
            torch.manual_seed(zlib.crc32(f"{args.seed}/{group_ids[start]}".encode()))
            chunk_episodes, _ = rollout(
                model, tokenizer, index, prompts, group_ids[start:start + len(chunk)],
                max_turns=args.max_turns if method == "agent" else 0, topk=args.topk,
                max_turn_tokens=args.max_turn_tokens, max_response_tokens=args.max_response_tokens, greedy=greedy,
                temperature=args.temperature, max_context=getattr(model.config, "max_position_embeddings", None))
            for episode, example in zip(chunk_episodes, chunk):
                episode.reward = score_response(episode.response_text, example.answers)
            episodes += chunk_episodes
            bar.update(len(chunk))
    if size > 1:
        parts = [None] * size
        dist.all_gather_object(parts, episodes)
        episodes = [episode for part in parts for episode in part]
    return episodes


# ---------------------------------------------------------------------------------------------
# Baselines: one answer-only turn, with nothing (direct) or the question's own top-k passages (rag)

DIRECT_ZERO_SHOT = ("Answer the question below from your own knowledge; no search engine is available. Give "
                    "only the final answer inside <answer> and </answer>, for example <answer> Paris </answer>. "
                    "Question: {question}\n")
RAG_ZERO_SHOT = ("Answer the question below. Search results for it are given between <information> and "
                 "</information>. Give only the final answer inside <answer> and </answer>, for example "
                 "<answer> Paris </answer>. Question: {question}\n<information>{information}</information>\n")
DIRECT_SYSTEM = "You answer questions from what you know. Write the answer as <answer> answer </answer>."
RAG_SYSTEM = ("You answer questions with the search results given after each question. Write the answer as "
              "<answer> answer </answer>.")


def baseline_messages(question: str, method: str, template: str, information: str = "", topk: int = 3) -> list[dict]:
    """The chat of a baseline. `information` is the formatted hits for rag (ignored by direct). Few-shot
    shows rollout.py's two example questions answered in this baseline's format; rag's examples retrieve
    over EXAMPLE_PASSAGES with the example question as the query, at least two passages so the two-hop
    example's answer is among them."""
    assert method in ("direct", "rag"), method
    if template == "zero-shot":
        prompt = DIRECT_ZERO_SHOT if method == "direct" else RAG_ZERO_SHOT
        return [{"role": "user", "content": prompt.format(question=question, information=information)}]
    assert template == "few-shot", template

    def question_turn(text, hits_text):
        return f"Question: {text}" + (f"\n<information>{hits_text}</information>" if method == "rag" else "")

    examples_index = BM25Index(EXAMPLE_PASSAGES)
    messages = [{"role": "system", "content": DIRECT_SYSTEM if method == "direct" else RAG_SYSTEM}]
    for example_question, _, answer in EXAMPLE_EPISODES:
        hits_text = format_hits(examples_index.search([example_question], max(topk, 2))[0], EXAMPLE_PASSAGES)
        messages.append({"role": "user", "content": question_turn(example_question, hits_text)})
        messages.append({"role": "assistant", "content": f"<answer> {answer} </answer>"})
    messages.append({"role": "user", "content": question_turn(question, information)})
    return messages


def baseline_prompts(tokenizer, index: BM25Index, examples, method: str, template: str, topk: int) -> list[list[int]]:
    """Prompt token ids per example; rag searches the index once for all the questions."""
    informations = [""] * len(examples)
    if method == "rag":
        hits = index.search([example.question for example in examples], topk)
        informations = [format_hits(h, index.texts) for h in hits]
    return [encode_messages(tokenizer, baseline_messages(example.question, method, template, information, topk))
            for example, information in zip(examples, informations)]


# ---------------------------------------------------------------------------------------------
# Scores

def summarize(episodes, examples) -> dict:
    """EM, F1, searches and response length over all questions and per dataset (source), Avg = the
    unweighted mean of the per-dataset EMs. Scores come from the response text, not episode.reward."""
    assert examples and len(episodes) == len(examples), (len(episodes), len(examples))

    def numbers(pairs):
        answers = [(extract_answer(e.response_text), x.answers) for e, x in pairs]
        return {"n": len(pairs),
                "em": float(np.mean([exact_match(a, gold) for a, gold in answers])),
                "f1": float(np.mean([token_f1(a, gold) for a, gold in answers])),
                "searches": float(np.mean([e.valid_searches for e, _ in pairs])),
                "response_length": float(np.mean([sum(e.loss_mask) for e, _ in pairs]))}

    pairs = list(zip(episodes, examples))
    datasets = {source: numbers([(e, x) for e, x in pairs if x.source == source])
                for source in dataset_order({x.source for x in examples})}
    return dict(numbers(pairs), em_avg=float(np.mean([d["em"] for d in datasets.values()])), datasets=datasets)


def dataset_order(sources) -> list[str]:
    """The published column order, then any other source alphabetically."""
    return [s for s in DATASETS if s in sources] + sorted(set(sources) - set(DATASETS))


def evaluate_method(model, tokenizer, index, examples, args, template, method: str = "agent") -> dict:
    """Greedy episodes of one method ("agent", "direct" or "rag") on `examples`, summarized."""
    episodes = generate_episodes(model, tokenizer, index, examples, [e.id for e in examples], args, template,
                                 greedy=True, desc=f"eval {method}", method=method)
    return dict(summarize(episodes, examples), method=method)


def evaluate(model, tokenizer, index, examples, args, template) -> dict:
    """The agent's evaluation as flat keys for the training log: val/em, val/f1, val/searches,
    val/response_length, val/em_avg (unweighted over sources) and val/em/<source>."""
    summary = evaluate_method(model, tokenizer, index, examples, args, template, "agent")
    result = {f"val/{key}": summary[key] for key in ("em", "f1", "searches", "response_length", "em_avg")}
    result.update({f"val/em/{source}": numbers["em"] for source, numbers in summary["datasets"].items()})
    return result


# ---------------------------------------------------------------------------------------------
# The table

def eval_table(results: dict[str, dict]) -> str:
    """Markdown: one row per method (label -> summarize() output, in the given order), a column per
    dataset any row has, then Avg, searches per question and generated tokens per response."""
    sources = dataset_order({s for summary in results.values() for s in summary["datasets"]})
    header = ["Method", *[DATASETS.get(s, s) for s in sources], "Avg", "Searches", "Length"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for label, summary in results.items():
        cells = [f"{summary['datasets'][s]['em']:.3f}" if s in summary["datasets"] else "-" for s in sources]
        cells += [f"{summary['em_avg']:.3f}", f"{summary['searches']:.2f}", f"{summary['response_length']:.1f}"]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    counts = {}
    for summary in results.values():
        for source, numbers in summary["datasets"].items():
            counts.setdefault(source, numbers["n"])
    sizes = ", ".join(f"{DATASETS.get(s, s)} {counts[s]}" for s in sources)
    note = (f"Exact match, greedy decoding. Questions: {sizes}. Avg: unweighted mean over the datasets. "
            "Searches: search calls the model made per question (RAG's one retrieval is not counted). "
            "Length: tokens the model generated per question.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_eval_report(out, results: dict[str, dict]) -> str:
    """Write eval.json (every number: label -> summarize() output) and eval.md (eval_table) into the
    folder `out`; return the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    table = eval_table(results)
    (out / "eval.md").write_text(table)
    return table
