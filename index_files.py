"""The BM25 index of search.py on disk: saved, memory-mapped, streamed from a corpus file, built once per host.

`save_index` writes each array as .npy and the passages as one UTF-8 blob; `load_index` maps them, so loading
takes milliseconds at any size, the processes of a host share one copy in the page cache, and a passage is
decoded only when a hit asks for it. `build_index` streams passages into that layout (texts to the blob,
postings spilled per chunk, then placed by term), and `cached_index` keys a folder by the corpus file's size
and sha256, the BM25 parameters and the tokeniser, with a file lock so one process of a host builds while
the others wait and then map it. `BM25Index(texts)` builds the same arrays in memory for small corpora.

A folder holds one .npy file per array of search.ARRAYS, texts.bin (the passages' UTF-8 bytes back to back)
and manifest.json (BM25 parameters, sizes, and the key of the corpus it was built from), written last:
a build goes to a temporary folder that is renamed into place, so a folder with a manifest is always whole.

Left out: sharing one index across hosts (each host builds or copies its own folder).
"""
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from data import one_at_a_time
from search import ARRAYS, BUILD_CHUNK, STOPWORDS, WORD, BM25Index, Passages, _build, _write_texts

# On-disk version, part of the cache key: bump it whenever the layout or what a corpus reads as changes
# (2: idf by math.log, as rank-bm25; half surrogate pairs read as U+FFFD).
FORMAT = 2


def load_index(folder) -> BM25Index:
    """Map an index `save_index` or `build_index` wrote to `folder`; nothing is read until a search touches it."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    texts = Passages(np.memmap(folder / "texts.bin", dtype=np.uint8, mode="r"), arrays["text_offsets"])
    shapes = {"indptr": manifest["terms"] + 1, "doc_ids": manifest["postings"], "tf": manifest["postings"],
              "norm": manifest["passages"], "text_offsets": manifest["passages"] + 1}
    if any(len(arrays[name]) != size for name, size in shapes.items()) or texts.offsets[-1] != len(texts.blob):
        raise ValueError(f"{folder}: array sizes disagree with manifest.json (a partial copy?)")
    index = BM25Index.from_arrays(texts, arrays, {name: manifest[name] for name in ("k1", "b", "epsilon")})
    index.manifest = manifest
    return index


def save_index(index: BM25Index, folder, key: dict | None = None) -> None:
    """Write `index` to `folder` (replacing what is there) via a temporary folder renamed into place."""
    folder = Path(folder)
    temp = _temp_folder(folder)
    try:
        arrays = {name: getattr(index, name) for name in ("indptr", "doc_ids", "tf", "idf", "norm")}
        arrays.update(term_bytes=index.vocab.blob, term_offsets=index.vocab.offsets, term_order=index.vocab.order)
        with open(temp / "texts.bin", "wb") as blob:
            if isinstance(index.texts, Passages):  # a loaded index: its bytes are already the blob
                blob.write(memoryview(index.texts.blob))
                arrays["text_offsets"] = index.texts.offsets
            else:
                arrays["text_offsets"] = _write_texts(blob, index.texts, range(0, len(index.texts), BUILD_CHUNK))
        for name, array in arrays.items():
            np.save(temp / f"{name}.npy", array)
        _commit(temp, folder, _manifest(index.params, arrays, key))
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def build_index(passages: Iterable[str], folder, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25,
                key: dict | None = None, progress: bool = True) -> BM25Index:
    """Build the index of `passages` (any iterable of strings, read once) straight into `folder`, replacing
    what is there, and map it. The passages are written to the text blob as they stream past, never kept."""
    folder = Path(folder)
    temp = _temp_folder(folder)
    try:
        arrays = _build(passages, k1, b, epsilon, temp, progress)
        _commit(temp, folder, _manifest(dict(k1=k1, b=b, epsilon=epsilon), arrays, key))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return load_index(folder)


def corpus_key(corpus_path, read_passages: Callable, k1: float, b: float, epsilon: float) -> dict:
    """What an index of `corpus_path` depends on: the file's size and sha256, the reader's name, the BM25
    parameters, the tokeniser and the layout. A cached index is used only if its key equals this one."""
    path = Path(corpus_path)
    try:
        with open(path, "rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as error:
        raise ValueError(f"{path}: cannot read the corpus ({error.strerror})") from None
    tokenizer = hashlib.sha256(" ".join([WORD.pattern, *sorted(STOPWORDS)]).encode()).hexdigest()[:16]
    return {"format": FORMAT, "tokenizer": tokenizer, "corpus_bytes": path.stat().st_size, "corpus_sha256": digest,
            "reader": f"{read_passages.__module__}.{read_passages.__qualname__}", "k1": k1, "b": b, "epsilon": epsilon}


def cached_index(corpus_path, folder, read_passages: Callable[[str], Iterable[str]], k1: float = 1.5,
                 b: float = 0.75, epsilon: float = 0.25, progress: bool = True) -> BM25Index:
    """The index of the passages `read_passages(corpus_path)` yields, mapped from `folder`/index if an index of
    this very corpus and these parameters is there, else built there first. Processes of one host that call
    this at once (torchrun ranks) take turns on a lock file in `folder`: the first builds, the others wait,
    find the fresh index and map it, so the host holds one copy in its page cache."""
    key = corpus_key(corpus_path, read_passages, k1, b, epsilon)  # before the lock: the ranks hash in parallel
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_folder = folder / "index"
    with one_at_a_time(folder / "lock", f"BM25 index: waiting for another process to finish {index_folder}"):
        index = _load_if_fresh(index_folder, key)
        if index is None:
            for leftover in folder.glob(".index.*-*"):  # temp folders of builds that died; none runs now
                shutil.rmtree(leftover, ignore_errors=True)
            index = build_index(read_passages(corpus_path), index_folder, k1, b, epsilon, key, progress)
    return index


def _load_if_fresh(folder: Path, key: dict) -> BM25Index | None:
    """The index in `folder` if it loads and was built for `key`; None if it is stale, partial or absent."""
    try:
        index = load_index(folder)
    except (OSError, ValueError, KeyError):  # no or broken manifest.json, a missing or cut-short array
        return None
    return index if index.manifest.get("key") == key else None


def _manifest(params: dict, arrays: dict, key: dict | None) -> dict:
    return {"format": FORMAT, **params, "passages": len(arrays["norm"]), "terms": len(arrays["idf"]),
            "postings": len(arrays["doc_ids"]), "key": key,
            "built_by": {"pid": os.getpid(), "host": socket.gethostname()}}


def _temp_folder(folder: Path) -> Path:
    temp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    return temp


def _commit(temp: Path, folder: Path, manifest: dict) -> None:
    """Write the manifest last and rename `temp` to `folder`, so a folder with a manifest is always whole."""
    (temp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():  # rename cannot replace a non-empty folder; processes that mapped it keep their maps
        folder.rename(old)
    temp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
