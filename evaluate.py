"""Evaluation: the policy and two baselines, greedy, on held-out questions; the results table.

evaluate_method() runs one method greedily on held-out questions (rollout.generate_episodes) and
summarize() turns its episodes into the numbers of a published search-agent table (Search-R1, DSPO):

    EM_d = mean over the questions of dataset d of  1[normalize(answer) == normalize(some gold)]
    Avg  = mean over datasets d of EM_d          (unweighted: a small dataset weighs as much as a large one)

plus F1, searches per question and response length (generated tokens), overall and per dataset. The dataset
of a question is its QAExample.source. evaluate() is the flat view training logs ("val/em", "val/em/<source>",
"val/searches/<source>").
write_eval_report() writes eval.json and eval.md with one row per method.

Methods, all with the same model, index, --topk and token budgets:
- agent:  the search agent (prompts.py's prompt, up to max_turns searches, then an answer-only turn).
- direct: the question alone, answered in one turn with no search.
- rag:    the top-k BM25 passages for the question itself, shown inside <information> exactly as
          search.format_hits renders them for the agent, answered in one turn. That one retrieval is the
          method's, not a model search: rag reports 0 searches per question, like direct.
Their prompts are in prompts.py.
The baselines reuse rollout() with max_turns=0, so they stop, truncate and score exactly as the agent does.

Left out: sampled (pass@k) evaluation, LLM-judged or cover-match accuracy, confidence intervals, and baselines
that need other models or training (IRCoT, Search-o1, SFT, R1 without search).
"""
import json
from pathlib import Path

import numpy as np

from reward import exact_match, extract_answer, token_f1
from rollout import RolloutSettings, generate_episodes

METHOD_LABELS = {"direct": "Direct", "rag": "RAG", "agent": "Search agent (this checkpoint)"}
# Column order and names of the published tables; any other source gets a column after these.
DATASETS = {"nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
            "2wikimultihopqa": "2Wiki", "musique": "Musique", "bamboogle": "Bamboogle"}


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


def evaluate_method(model, tokenizer, index, examples, settings: RolloutSettings, method: str = "agent") -> dict:
    """Greedy episodes of one method ("agent", "direct" or "rag") on `examples`, summarized."""
    episodes = generate_episodes(model, tokenizer, index, examples, [e.id for e in examples], settings,
                                 greedy=True, desc=f"eval {method}", method=method)
    return dict(summarize(episodes, examples), method=method)


def evaluate(model, tokenizer, index, examples, settings: RolloutSettings) -> dict:
    """The agent's evaluation as flat keys for the training log: val/em, val/f1, val/searches,
    val/response_length, val/em_avg (unweighted over sources), val/em/<source> and val/searches/<source>."""
    summary = evaluate_method(model, tokenizer, index, examples, settings, "agent")
    result = {f"val/{key}": summary[key] for key in ("em", "f1", "searches", "response_length", "em_avg")}
    for source, numbers in summary["datasets"].items():
        result.update({f"val/em/{source}": numbers["em"], f"val/searches/{source}": numbers["searches"]})
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
