"""Reward: exact match of the final answer.

The policy's own response (prompt and retrieved <information> text excluded) is searched for its
last <answer> ... </answer> span; the span is normalised and compared with every gold answer:

    r = 1  if normalize(answer) == normalize(g) for some gold g,   else 0

normalize() is the SQuAD / FlashRAG convention: lowercase, drop punctuation, drop the articles
a/an/the, collapse white space (a gold answer with nothing left, "The" say, keeps its articles, or its
punctuation, so an empty answer cannot match it). Token F1 (the same normalisation, bag-of-words
precision/recall) is kept for evaluation only; training uses the binary reward, as the paper does.

Left out on purpose: format rewards, partial credit, length penalties. A response with no answer
tag scores 0 like a wrong answer.
"""
import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str, articles: bool = False) -> str:
    """Lowercase, drop punctuation, drop a/an/the (kept with `articles`), collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = text if articles else _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_answer(response: str) -> str | None:
    """The text inside the last complete <answer>...</answer> pair, stripped; None if there is none."""
    matches = _ANSWER.findall(response)
    if not matches:
        return None
    return matches[-1].strip()


def _compared(prediction: str, gold: str) -> tuple[str, str]:
    """(prediction, gold) as exact match and F1 compare them: normalised; for a gold answer that normalises
    to nothing, normalised keeping articles ("The"), else only lowercased ("?"), so an empty answer cannot
    match it."""
    for articles in (False, True):
        if normalize_answer(gold, articles):
            return normalize_answer(prediction, articles), normalize_answer(gold, articles)
    return " ".join(prediction.lower().split()), " ".join(gold.lower().split())


def exact_match(prediction: str | None, answers: list[str]) -> float:
    """1.0 if the prediction equals some gold answer once both are normalised (see _compared), else 0.0."""
    if prediction is None:
        return 0.0
    return float(any(predicted == gold for predicted, gold in (_compared(prediction, g) for g in answers)))


def token_f1(prediction: str | None, answers: list[str]) -> float:
    """Best token-level F1 against any gold answer (0 when there is no prediction)."""
    if prediction is None:
        return 0.0
    best = 0.0
    for answer in answers:
        predicted, gold = (text.split() for text in _compared(prediction, answer))
        common = sum((Counter(predicted) & Counter(gold)).values())
        if common == 0:
            continue
        precision = common / len(predicted)
        recall = common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def score_response(response: str, answers: list[str]) -> float:
    """The training reward of one trajectory: exact match of its last answer."""
    return exact_match(extract_answer(response), answers)


def score_episodes(episodes, examples) -> None:
    """Set each episode's reward: exact match of its response against its example's gold answers."""
    for episode, example in zip(episodes, examples, strict=True):
        episode.reward = score_response(episode.response_text, example.answers)
