"""Questions, gold answers and passages: the file formats a search agent trains and is evaluated on.

A QA example is a question with its gold answers (the reward is exact match against any of them); a passage
is one string "Title\ntext" that search.py indexes. Formats:

- QA JSONL, the FlashRAG / Search-R1 shape, one object a line; `id` is optional:
      {"id": "test_0", "question": "who wrote hamlet?", "golden_answers": ["William Shakespeare"]}
- Corpus JSONL, either the wiki-18 shape (title line wrapped in double quotes) or a plain title/text shape:
      {"id": "1", "contents": "\"Hamlet\"\nHamlet is a tragedy by William Shakespeare ..."}
      {"title": "Hamlet", "text": "Hamlet is a tragedy by William Shakespeare ..."}

The synthetic world to train on without downloads is in world.py.
Every error a user's file can cause is a DataError whose one-line message says what and where (file:line).
Left out: gzip, memory mapping (every passage is held in memory, so use a subset of wiki-18 on a laptop),
and answer normalisation (reward.py's job).
"""
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class QAExample:
    id: str
    question: str
    answers: list[str]
    source: str  # which file or generator it came from, e.g. "nq", "synthetic-2hop"; used to split metrics


class DataError(ValueError):
    """A problem in a user's data file; the message is one line, 'path:line: what'."""


def _jsonl_objects(path):
    """Yield (1-based line number, dict) for each non-blank line of a JSONL file, read line by line."""
    try:
        file = open(path, "rb")  # bytes, so a bad encoding can be reported with its line number
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    with file:
        for line_no, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_no}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def load_qa_jsonl(path, source: str | None = None) -> list[QAExample]:
    """Read FlashRAG-style QA lines. `source` defaults to the file name up to its first '_' or '.'
    ("nq_test.jsonl" -> "nq"); a missing id becomes f"{source}-{line_no}"."""
    source = source or Path(path).name.split(".")[0].split("_")[0]
    examples = []
    for line_no, record in _jsonl_objects(path):
        where = f"{path}:{line_no}"
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: missing or empty field 'question'")
        if "golden_answers" not in record:
            raise DataError(f"{where}: missing field 'golden_answers'")
        answers = record["golden_answers"]
        if isinstance(answers, str):  # some exports store a single answer bare
            answers = [answers]
        if not isinstance(answers, list) or not answers:
            raise DataError(f"{where}: 'golden_answers' must be a non-empty list of strings")
        if not all(isinstance(answer, str) and answer.strip() for answer in answers):
            raise DataError(f"{where}: 'golden_answers' holds a non-string or empty answer")
        example_id = str(record.get("id", f"{source}-{line_no}"))
        examples.append(QAExample(example_id, question.strip(), [a.strip() for a in answers], source))
    if not examples:
        raise DataError(f"{path}: no questions")
    return examples


def load_corpus_jsonl(path) -> list[str]:
    """Read passages as "Title\\ntext" from wiki-18 lines (id, contents) or plain lines (title, text)."""
    passages = []
    for line_no, record in _jsonl_objects(path):
        if isinstance(record.get("contents"), str):
            title, _, text = record["contents"].partition("\n")
            title = title.strip()
            if len(title) >= 2 and title[0] == title[-1] == '"':  # wiki-18 quotes every title
                title = title[1:-1]
        elif isinstance(record.get("title"), str) and isinstance(record.get("text"), str):
            title, text = record["title"].strip(), record["text"]
        else:
            raise DataError(f"{path}:{line_no}: expected string field 'contents', or 'title' and 'text'")
        passages.append(f"{title}\n{text.strip()}")
    if not passages:
        raise DataError(f"{path}: empty corpus")
    return passages
