"""Questions, gold answers and passages: the file formats a search agent trains and is evaluated on.

A QA example is a question with its gold answers (the reward is exact match against any of them); a passage
is one string "Title\ntext" that search.py indexes. Formats:

- QA JSONL, the FlashRAG / Search-R1 shape, one object a line; `id` is optional, other fields (`metadata`)
  are ignored:
      {"id": "test_0", "question": "who wrote hamlet?", "golden_answers": ["William Shakespeare"]}
- Corpus JSONL, either the wiki-18 shape (title line wrapped in double quotes) or a plain title/text shape,
  gzip-compressed when the name ends in .gz (decompressed line by line as it is read):
      {"id": "1", "contents": "\"Hamlet\"\nHamlet is a tragedy by William Shakespeare ..."}
      {"title": "Hamlet", "text": "Hamlet is a tragedy by William Shakespeare ..."}
- HotpotQA's official distractor-setting JSON: one list of records, each with `_id`, `question`, `answer`,
  `supporting_facts`, `type`, `level` and `context` = [[title, [sentence, ...]], ...]. A sentence carries
  its own leading space, so a paragraph's text is its sentences joined with "". Every context paragraph of
  the train and dev files, each distinct one once, is the corpus of `load_hotpotqa`.

Named datasets are fetched once into a cache folder: HotpotQA from its authors' site; from the Hugging Face
hub, the FlashRAG files (`<dataset>/<split>.jsonl` in the dataset repo RUC-NLPIR/FlashRAG_datasets) and
wiki-18 (`wiki-18.jsonl.gz` in PeterJinGo/wiki-18-corpus), the questions and corpus Search-R1 trains and
evaluates on; `load_search_r1` reads that whole setup, the paper's `--data search-r1`. A file put in the
cache by hand is used as is, so an offline machine works too.

The synthetic world to train on without downloads is in world.py.
Every error a user's file can cause is a DataError whose one-line message says what and where (file:line).
A download resumes where an earlier run broke off (HTTP Range) and counts its bytes against the size the
server announced. A corpus file's passages are not held in memory: index_files.py writes their index to
disk and reads a passage's text only when a search returns it. Left out: checksums of downloads, streaming
of question files (hotpot_train_v1.1.json, over 500 MB, is parsed whole), and answer normalisation
(reward.py's job).
"""
import contextlib
import fcntl
import gzip
import itertools
import http.client
import json
import os
import random
import re
import sys
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

DEFAULT_CACHE = Path(os.environ.get("DSPO_CACHE", Path.home() / ".cache" / "dspo"))
HOTPOTQA_URLS = {"train": "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_train_v1.1.json",
                 "dev": "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json"}
FLASHRAG_REPO = "RUC-NLPIR/FlashRAG_datasets"
# The splits each dataset has in that repo; Search-R1 evaluates on test where there is one, else dev.
FLASHRAG_SPLITS = {"nq": ("train", "dev", "test"), "triviaqa": ("train", "dev", "test"), "popqa": ("test",),
                   "hotpotqa": ("train", "dev"), "2wikimultihopqa": ("train", "dev"), "musique": ("train", "dev"),
                   "bamboogle": ("test",)}
WIKI18_REPO, WIKI18_FILE = "PeterJinGo/wiki-18-corpus", "wiki-18.jsonl.gz"  # Search-R1's scripts/download.py
# Search-R1 trains on the NQ and HotpotQA train splits and evaluates on these seven (FlashRAG names).
SEARCH_R1_TRAIN = "nq,hotpotqa"
SEARCH_R1_EVAL = "nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle"
PROGRESS_STEP = 1 << 20  # bytes read between progress-bar updates: a per-line update would cost seconds
_HALF_PAIR = re.compile("[\ud800-\udfff]")  # what a JSON escape of half a surrogate pair decodes to


def _whole_characters(text: str) -> str:
    """`text` with each lone half of a surrogate pair (a JSON "\\ud83d" cut from its other half), which no
    tokenizer takes, replaced by U+FFFD."""
    return _HALF_PAIR.sub("\ufffd", text)


@dataclass
class QAExample:
    id: str
    question: str
    answers: list[str]
    source: str  # which file or generator it came from, e.g. "nq", "synthetic-2hop"; used to split metrics


class DataError(ValueError):
    """A problem in a user's data file; the message is one line, 'path:line: what'."""


def _open_bytes(path):
    """`path` opened for reading bytes (so a bad encoding can be reported where it is); DataError if it can't be."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None


def _gzip_lines(path, file):
    """The lines of an open gzip file, decompressed as they are read. A file cut short (a partial download)
    or corrupt stops with a DataError, so its readable start is never taken for the whole."""
    try:
        with gzip.GzipFile(fileobj=file) as lines:
            yield from lines
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"{path}: incomplete or corrupt gzip file ({reason}); delete it and download it "
                        f"again") from None


def _line_error(path, line_no: int, what: str, unread) -> DataError:
    """DataError 'path:line_no: what', once `unread`, the rest of a gzip file's lines (nothing for a plain
    file), has been read through: corrupt bytes decompress into garbled lines before the checksum at the
    end of the file catches them, and then the corruption is the error to report."""
    for _ in unread:
        pass
    return DataError(f"{path}:{line_no}: {what}")


def _jsonl_objects(path, progress: str | None = None):
    """Yield (1-based line number, dict) for each non-blank line of a JSONL file, read line by line and
    decompressed on the way if its name ends in .gz; with `progress`, a bar of the file's bytes read (the
    compressed bytes of a .gz) under that label."""
    file = _open_bytes(path)
    size = os.fstat(file.fileno()).st_size
    lines = _gzip_lines(path, file) if Path(path).suffix == ".gz" else file
    unread = lines if lines is not file else ()  # what a bad line's error reads through first
    with file, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=progress, leave=False,
                    disable=progress is None) as bar:
        reported, unreported = 0, 0  # bytes of the file shown on the bar; bytes of lines read since
        for line_no, raw in enumerate(lines, start=1):
            unreported += len(raw)
            if unreported >= PROGRESS_STEP:
                bar.update(file.tell() - reported)
                reported, unreported = file.tell(), 0
            try:
                line = raw.decode("utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
            except UnicodeDecodeError:
                raise _line_error(path, line_no, "not UTF-8 text", unread) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise _line_error(path, line_no, f"not valid JSON ({error.msg})", unread) from None
            if not isinstance(record, dict):
                raise _line_error(path, line_no, f"expected a JSON object, got {type(record).__name__}", unread)
            if "\\u" in line:
                record = {key: _whole_characters(value) if isinstance(value, str) else value
                          for key, value in record.items()}
            yield line_no, record
        bar.update(file.tell() - reported)


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


def iter_corpus_jsonl(path):
    """Yield passages as "Title\ntext" from wiki-18 lines (id, contents) or plain lines (title, text), from a
    .jsonl or .jsonl.gz file, one at a time (wiki-18 is 13 GB unpacked), with a progress bar of bytes read.
    A file without a single passage raises DataError at its end."""
    count = 0
    for line_no, record in _jsonl_objects(path, progress=f"reading {Path(path).name}"):
        if isinstance(record.get("contents"), str):
            title, _, text = record["contents"].partition("\n")
            title = title.strip()
            if len(title) >= 2 and title[0] == title[-1] == '"':  # wiki-18 quotes every title
                title = title[1:-1]
        elif isinstance(record.get("title"), str) and isinstance(record.get("text"), str):
            title, text = record["title"].strip(), record["text"]
        else:
            raise DataError(f"{path}:{line_no}: expected string field 'contents', or 'title' and 'text'")
        count += 1
        yield f"{title}\n{text.strip()}"
    if not count:
        raise DataError(f"{path}: empty corpus")


def load_corpus_jsonl(path) -> list[str]:
    """Every passage of a corpus file (iter_corpus_jsonl), as a list."""
    return list(iter_corpus_jsonl(path))


# --- Downloads -------------------------------------------------------------------------------------

def download(url: str, cache, name: str | None = None) -> Path:
    """`cache`/`name` (default: the URL's file name), fetched from `url` the first time with a progress bar of
    bytes. The bytes go to `name`.part, renamed into place only once as many arrived as the server announced,
    so a partial file is never mistaken for the real one. An interrupted download keeps its .part and the
    next call resumes it with an HTTP Range request, If-Range the version (ETag or Last-Modified) its bytes
    came from: the server sends the rest, or the whole file if it changed or ignores ranges, and a .part the
    server cannot continue (416: as long as the file or longer) is kept if the server says it is the file's
    length, else starts over. Processes that want one file at once (torchrun ranks) take turns on a lock
    file beside it: the first downloads, the others find the file. A failed download leaves the lock file
    (an empty .<name>.lock) for the next try."""
    path = Path(cache) / (name or url.rsplit("/", 1)[-1])
    if path.exists():
        return path
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with one_at_a_time(lock, f"{path}: waiting for another process's download"):
            if not path.exists():  # it may have arrived while this process waited
                _fetch(url, path)
            lock.unlink(missing_ok=True)  # the file is in place, so a process that locks anew finds it
    except OSError as error:  # _fetch reports its own; this is the folder or the lock (read-only, no flock)
        raise DataError(f"cannot download {url} into {path.parent} ({error.strerror or error}); DSPO_CACHE moves "
                        f"the cache, or download it by hand to {path}") from None
    return path


@contextlib.contextmanager
def one_at_a_time(lock_path, waiting: str):
    """The processes of a host that enter this block with one lock file run it one after another (an
    exclusive flock, released when the block ends or the process dies); one that must wait prints `waiting`."""
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _fetch(url: str, path: Path) -> None:
    """download()'s work: `url` into `path` through `path`.part, resumed where one is left."""
    partial, version = path.with_name(path.name + ".part"), path.with_name(path.name + ".part.version")
    try:
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        if have and version.exists():
            headers["If-Range"] = version.read_text()
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
        except urllib.error.HTTPError as error:
            if error.code != 416 or not have:
                raise
            if (error.headers or {}).get("Content-Range") == f"bytes */{have}":  # .part is the whole file: the
                os.replace(partial, path)  # run was stopped between its last byte and the rename
                version.unlink(missing_ok=True)
                return
            partial.unlink()  # nothing left to send after .part's bytes: they are not this file's start
            return _fetch(url, path)
        with response:
            resumed = have > 0 and getattr(response, "status", 200) == 206  # 206: the rest of the file
            if resumed and not response.headers.get("Content-Range", f"bytes {have}-").startswith(f"bytes {have}-"):
                partial.unlink()  # the server continues from another byte: start over
                return _fetch(url, path)
            have = have if resumed else 0
            if not resumed:  # a new .part: remember which version of the file its bytes are
                etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
                stamp = etag if etag and not etag.startswith("W/") else modified  # If-Range takes strong ETags only
                if stamp:
                    version.write_text(stamp)
                else:
                    version.unlink(missing_ok=True)
            length = response.headers.get("Content-Length")
            size = have + int(length) if length else None
            with open(partial, "ab" if resumed else "wb") as out, \
                    tqdm(total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name) as bar:
                while chunk := response.read(PROGRESS_STEP):
                    out.write(chunk)
                    bar.update(len(chunk))
                if size is not None and out.tell() != size:
                    raise http.client.IncompleteRead(b"", size - out.tell())
        os.replace(partial, path)
        version.unlink(missing_ok=True)
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts and resets are OSErrors
        reason = " ".join(str(getattr(error, "reason", None) or error).split()) or type(error).__name__
        resume = "run again to resume, or " if partial.exists() and partial.stat().st_size else ""
        raise DataError(f"cannot download {url} ({reason}); {resume}download it by hand to {path}") from None


def hub_file(repo: str, filename: str, folder) -> Path:
    """`folder`/`filename`, fetched from the Hugging Face dataset `repo` the first time (resumable, size
    checked: see download); a file already there (put by hand, say) is used as is."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return download(f"{endpoint}/datasets/{repo}/resolve/main/{filename}", folder, filename)


# --- HotpotQA (official distractor-setting files) --------------------------------------------------

def _hotpotqa_record(path, number: int, record) -> tuple[QAExample, list[str]]:
    """One record of a HotpotQA file -> (its question, its context paragraphs as "Title\\ntext")."""
    where = f"{path}: record {number}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("_id", "question", "answer"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise DataError(f"{where}: missing, empty or non-string field '{field}'")
    context = record.get("context")
    if not isinstance(context, list):
        raise DataError(f"{where}: field 'context' must be a list of [title, [sentences]] pairs")
    paragraphs = []
    for pair in context:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], list) and all(isinstance(s, str) for s in pair[1])):
            raise DataError(f"{where}: a 'context' entry is not a [title, [sentences]] pair of strings")
        paragraphs.append(_whole_characters(f"{pair[0].strip()}\n{''.join(pair[1]).strip()}"))
    example = QAExample(record["_id"], _whole_characters(record["question"].strip()),
                        [_whole_characters(record["answer"].strip())], "hotpotqa")
    return example, paragraphs


def read_hotpotqa(path) -> tuple[list[QAExample], list[str]]:
    """(questions, every context paragraph in record order, repeats included) of one HotpotQA JSON file.
    Records are numbered from 1 in error messages."""
    with _open_bytes(path) as file:
        raw = file.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
    del raw  # the train file's 500+ MB of bytes need not live on while its text is parsed
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no questions")
    examples, paragraphs = [], []
    for number, record in enumerate(records, start=1):
        example, context = _hotpotqa_record(path, number, record)
        examples.append(example)
        paragraphs += context
    return examples, paragraphs


def load_hotpotqa(cache=DEFAULT_CACHE) -> tuple[list[QAExample], list[QAExample], list[str]]:
    """(train questions, dev questions, passages) of HotpotQA's distractor setting, downloaded once into
    `cache`. The passages are every context paragraph of both files, each distinct one once, in first-seen
    order (train file first): a small Wikipedia that holds the gold paragraphs of every question."""
    train, train_paragraphs = read_hotpotqa(download(HOTPOTQA_URLS["train"], cache))
    dev, dev_paragraphs = read_hotpotqa(download(HOTPOTQA_URLS["dev"], cache))
    passages = list(dict.fromkeys(train_paragraphs + dev_paragraphs))  # a dict keeps first-seen order
    return train, dev, passages


# --- FlashRAG / Search-R1 QA files -----------------------------------------------------------------

def flashrag_file(dataset: str, split: str, cache=DEFAULT_CACHE) -> Path:
    """`cache`/flashrag/<dataset>/<split>.jsonl, fetched from the Hugging Face hub the first time."""
    return hub_file(FLASHRAG_REPO, f"{dataset}/{split}.jsonl", Path(cache) / "flashrag")


def wiki18_file(cache=DEFAULT_CACHE) -> Path:
    """`cache`/wiki-18/wiki-18.jsonl.gz, Search-R1's Wikipedia (Dec 2018, 100-word passages), fetched from
    the Hugging Face hub the first time; it is read compressed, never unpacked on disk."""
    return hub_file(WIKI18_REPO, WIKI18_FILE, Path(cache) / "wiki-18")


def load_qa_spec(spec: str, role: str, cache=DEFAULT_CACHE) -> list[QAExample]:
    """The questions of a comma-separated mix of FlashRAG dataset names and QA JSONL paths, e.g.
    "nq,hotpotqa" or "nq,my/questions.jsonl", in that order. A name reads its train split for role "train";
    for role "eval" its test split, or dev where it has no test. Each example's `source` is its dataset
    name; for a path, the name of its folder if that is a dataset name (FlashRAG's own layout,
    nq/test.jsonl), else the file's stem (questions.jsonl -> "questions")."""
    assert role in ("train", "eval"), role
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise DataError(f"data '{spec}': no dataset names or files")
    examples = []
    for item in items:
        if item in FLASHRAG_SPLITS:
            splits = FLASHRAG_SPLITS[item]
            if role == "train" and "train" not in splits:
                raise DataError(f"{item}: has no train split (FlashRAG has only {'/'.join(splits)}); "
                                f"use it to evaluate")
            split = "train" if role == "train" else "test" if "test" in splits else "dev"
            examples += load_qa_jsonl(flashrag_file(item, split, cache), source=item)
        elif Path(item).is_file():
            folder = Path(item).parent.name
            examples += load_qa_jsonl(item, source=folder if folder in FLASHRAG_SPLITS else Path(item).stem)
        else:
            raise DataError(f"{item}: neither a dataset name ({', '.join(FLASHRAG_SPLITS)}) nor a file")
    return examples


def load_search_r1(cache=DEFAULT_CACHE, eval_only: bool = False,
                   corpus=None) -> tuple[list[QAExample], list[QAExample], Path]:
    """(train questions, eval questions, corpus file) of Search-R1's setup: the NQ + HotpotQA train splits
    (none with `eval_only`), the seven evaluation sets of SEARCH_R1_EVAL, and wiki-18, each downloaded once
    into `cache`. `corpus`, a .jsonl or .jsonl.gz path (a local copy or subset of wiki-18), replaces the
    wiki-18 download. The small question files are fetched first, so a missing one stops the run before
    the corpus download does. The corpus is returned as a path, for index_files.cached_index to index once and
    map afterwards (iter_corpus_jsonl reads it)."""
    train = [] if eval_only else load_qa_spec(SEARCH_R1_TRAIN, "train", cache)
    evaluation = load_qa_spec(SEARCH_R1_EVAL, "eval", cache)
    return train, evaluation, Path(wiki18_file(cache) if corpus is None else corpus)


# ---------------------------------------------------------------------------------------------
# Question order

def take_in_turn(examples, count: int):
    """The first `count` examples taking one from each source in turn, so every dataset of a mixed
    evaluation set is represented (its own order kept within a source)."""
    by_source = {}
    for example in examples:
        by_source.setdefault(example.source, []).append(example)
    interleaved = [x for row in itertools.zip_longest(*by_source.values()) for x in row if x is not None]
    return interleaved[:count]


def next_questions(train_set, count: int, state: dict, seed: int):
    """The next `count` questions of a per-epoch shuffle; `state` (epoch, position) is checkpointed."""
    chosen = []
    while len(chosen) < count:
        order = random.Random(seed * 100003 + state["epoch"]).sample(range(len(train_set)), len(train_set))
        take = order[state["position"]:state["position"] + count - len(chosen)]
        chosen += [train_set[i] for i in take]
        state["position"] += len(take)
        if state["position"] >= len(train_set):
            state["epoch"], state["position"] = state["epoch"] + 1, 0
    return chosen


def questions_by_kind(by_kind: dict[str, list], weights: dict[str, float], count: int, states: dict,
                      seed: int) -> list:
    """`count` questions split among the kinds of `by_kind` (source -> its questions) in proportion to
    `weights` (largest remainder), each kind read from its own per-epoch shuffle; states[kind] (epoch,
    position) is checkpointed."""
    total = sum(weights.values())
    exact = {kind: count * weights[kind] / total for kind in by_kind}
    counts = {kind: int(value) for kind, value in exact.items()}
    for kind in sorted(exact, key=lambda k: counts[k] - exact[k])[:count - sum(counts.values())]:
        counts[kind] += 1
    return [q for kind in by_kind for q in next_questions(by_kind[kind], counts[kind], states[kind], seed)]

