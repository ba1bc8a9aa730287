"""Search: passages -> BM25 index -> top-k hits, formatted for the <information> block.

The search tool the policy learns to call is plain lexical retrieval over passages ("Title\\ntext", the wiki-18
`contents` shape). Each passage d of length |d| is scored for a query q by Okapi BM25:

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = log(N - n(t) + 0.5) - log(n(t) + 0.5)

with N passages, n(t) of them containing t, and avgdl the mean passage length in tokens. The semantics are
exactly those of rank-bm25 0.2.2's `BM25Okapi`, so scores agree with `get_scores` bit for bit: a term in more
than half the passages would get a negative idf and is floored at epsilon * (mean idf over the vocabulary); a
repeated query term counts once per occurrence; an unknown term contributes 0; every passage gets a score, 0
included. A corpus with no indexable word at all is refused: its avgdl and mean idf would be 0 / 0.

Layout, sized for wiki-18 (21M passages) on one host. Postings are grouped by term (CSR: term -> a slice of
passage ids and term frequencies). A posting keeps its tf (one byte) rather than its weight: the weight is
recomputed at query time from tf, the term's idf and the passage's length norm k1 * (1 - b + b * |d| / avgdl),
in rank-bm25's own operation order, so it costs 5 bytes instead of 12 and scores stay exact. The vocabulary is
no dict of strings but the terms' UTF-8 bytes back to back plus the term ids in byte order, so a lookup is a
binary search. A query is a scatter-add of its terms' weights into a score row, then a top-k selection among
the passages it scored when they are few (rare terms), else over the whole row.

The index can also live on disk, memory-mapped, built once per host from a corpus file: index_files.py.

Left out: stemming, phrase and proximity queries, dense retrievers and rerankers, and compressing postings
below 5 bytes.
"""
import bisect
import math
import random
import re
from collections import defaultdict
from itertools import islice
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

# Question words and glue; dropping them keeps "who was the director of X" from matching every passage.
STOPWORDS = frozenset("""
a an the of in on at to for from by with as into about and or but not no is are was were be been being
it its this that these those what which who whom whose where when why how did does do has have had
""".split())
WORD = re.compile(r"\w+")  # unicode-aware on str: letters, digits and underscore of any script

BUILD_CHUNK = 10_000  # passages tokenised at a time, so the token strings of a corpus never all live at once
QUERY_BLOCK = 1 << 16  # postings weighed at a time: the temporaries stay in cache and small at any df
SEPARATOR = " A "  # joins a chunk's lowercased passages: a word of its own that no lowercased text holds
RESERVED = [*sorted(STOPWORDS), SEPARATOR.strip()]  # fixed ids below the terms', never indexed; separator last
# The index's arrays, saved one .npy each; texts.bin (the passages' UTF-8 bytes) is saved raw beside them.
ARRAYS = ("indptr", "doc_ids", "tf", "idf", "norm", "term_bytes", "term_offsets", "term_order", "text_offsets")


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens minus stopwords; the one tokeniser for both passages and queries."""
    return [word for word in WORD.findall(text.lower()) if word not in STOPWORDS]


class Passages:
    """A read-only list of passages kept as UTF-8 bytes back to back (`blob`, bytes offsets[i]:offsets[i + 1]
    are passage i); a passage is decoded when indexed, so a memory-mapped corpus costs nothing until read."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets                            # [bytes] uint8, [N + 1] int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(f"passage {i} of {len(self)}")
        i %= len(self)
        # surrogatepass: JSON may carry lone surrogates, and they must come back as they went in
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogatepass")


class Vocabulary:
    """Term -> term id without a dict: term i is bytes offsets[i]:offsets[i + 1] of `blob` (UTF-8), and
    `order` lists the ids in byte order of their terms, so a lookup is a binary search of log2(V) steps."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, order: np.ndarray):
        self.blob, self.offsets, self.order = blob, offsets, order       # [bytes] uint8, [V + 1], [V]

    def __len__(self) -> int:
        return len(self.order)

    def term(self, term_id: int) -> bytes:
        return self.blob[self.offsets[term_id]:self.offsets[term_id + 1]].tobytes()

    def get(self, word: str) -> int | None:
        """The id of `word`, or None if no passage holds it."""
        key = word.encode()
        at = bisect.bisect_left(self.order, key, key=self.term)
        return int(self.order[at]) if at < len(self.order) and self.term(self.order[at]) == key else None


class BM25Index:
    """A BM25 Okapi index: CSR postings of tf by term, per-term idf, per-passage length norms, the passages."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        """Build in memory from `texts`, which the index keeps as they are (`index.texts is texts`)."""
        self._attach(texts, _build(texts, k1, b, epsilon), dict(k1=k1, b=b, epsilon=epsilon))

    @classmethod
    def from_arrays(cls, texts, arrays: dict, params: dict) -> "BM25Index":
        """An index over `texts` from the arrays of ARRAYS as _build makes them (or index_files maps them)."""
        index = cls.__new__(cls)
        index._attach(texts, arrays, params)
        return index

    def _attach(self, texts, arrays: dict, params: dict) -> None:
        self.texts, self.params, self.k1 = texts, params, params["k1"]
        self.indptr, self.doc_ids, self.tf = arrays["indptr"], arrays["doc_ids"], arrays["tf"]  # [V + 1], [P], [P]
        self.idf, self.norm = arrays["idf"], arrays["norm"]               # [V] floored idf, [N] length norms
        self.vocab = Vocabulary(arrays["term_bytes"], arrays["term_offsets"], arrays["term_order"])

    def __len__(self) -> int:
        return len(self.texts)

    def _score_into(self, row: np.ndarray, query: str, keep_up_to: int = 0) -> list[np.ndarray] | None:
        """Add the BM25 score of every passage for `query` into `row` [N], one query term at a time. Returns
        the passage ids it added to (arrays, a passage in several) if they number at most `keep_up_to`."""
        touched, n_touched = [], 0
        for word in tokenize(query):
            term = self.vocab.get(word)
            if term is None:
                continue
            idf = self.idf[term]
            for lo in range(self.indptr[term], self.indptr[term + 1], QUERY_BLOCK):
                hi = min(lo + QUERY_BLOCK, self.indptr[term + 1])
                docs = self.doc_ids[lo:hi].astype(np.intp)  # indexing converts int32 ids anyway, twice
                tf = self.tf[lo:hi].astype(np.float64)
                # rank-bm25's order: idf * (tf * (k1 + 1) / (tf + norm)), so the weight matches bit for bit
                weight = tf * (self.k1 + 1)
                weight /= tf + self.norm[docs]
                weight *= idf
                # A term's postings name each passage once, so fancy-index += never drops a duplicate.
                row[docs] += weight
                n_touched += len(docs)
                touched = touched if n_touched <= keep_up_to else None
                if touched is not None:
                    touched.append(docs)
        return touched

    def scores(self, query: str) -> np.ndarray:
        """The score of every passage for `query`: [N] float64, as `BM25Okapi.get_scores`."""
        row = np.zeros(len(self))
        self._score_into(row, query)
        return row

    def search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """Top-k (passage index, score) per query, best first, ties to the lower passage index."""
        if k < 0:
            raise ValueError(f"search: k must be >= 0, got {k}")
        k = min(k, len(self))
        row = np.zeros(len(self))  # [N] one score buffer shared by the whole batch, zeroed after each query
        hits = []
        for query in queries:
            # A query of rare terms scores few passages: select among those and zero only those, so its cost
            # is its postings and not the O(N) passes over the row that a query of frequent terms needs.
            touched = self._score_into(row, query, keep_up_to=len(self) // 4)
            scored = _union(touched) if touched is not None else None  # ascending passage ids
            if scored is not None and np.count_nonzero(row[scored] > 0) >= k:
                top = scored[_top_k(row[scored], k)]  # ascending ids, so ties still go to the lower index
            else:  # zero scores make the cut, or most passages are scored
                top = _top_k(row, k)
            hits.append(list(zip(top.tolist(), row[top].tolist())))
            if scored is None:
                row.fill(0.0)
            else:
                row[scored] = 0.0
        return hits


def _build(passages: Iterable[str], k1: float, b: float, epsilon: float, folder: Path | None = None,
           progress: bool = False) -> dict:
    """The arrays of ARRAYS for `passages`, in memory; with `folder`, written there as .npy files, the passages
    as texts.bin, with only the small arrays held. Two passes, so no step holds more than a chunk's tokens:
    each chunk's postings are spilled, then written to their CSR places once every term's df is known."""
    words, df, doc_len, spill, max_tf, text_offsets = _spill_postings(passages, folder, progress)
    n_docs = len(doc_len)

    def new(name, dtype, size):  # an output array, on disk when building to a folder
        if folder:
            return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=(int(size),))
        return np.empty(size, dtype=dtype)

    indptr = np.concatenate([[0], np.cumsum(df)])                          # [V + 1] term -> posting slice
    doc_ids = new("doc_ids", np.int32, indptr[-1])                          # [P]
    tf = new("tf", np.uint8 if max_tf < 2 ** 8 else np.uint16 if max_tf < 2 ** 16 else np.uint32, indptr[-1])
    cursor = indptr[:-1].copy()  # [V] where each term's next posting goes
    # Chunks come in passage order, so each term's passages ascend.
    for chunk_terms, chunk_docs, chunk_tf in tqdm(spill, desc="BM25 index: placing postings", unit=" chunks",
                                                  disable=not progress):
        starts, run_terms, run_lengths = _runs(chunk_terms)
        place = np.arange(len(chunk_terms)) + np.repeat(cursor[run_terms] - starts, run_lengths)
        doc_ids[place], tf[place] = chunk_docs, chunk_tf
        cursor[run_terms] += run_lengths
    assert (cursor == indptr[1:]).all()
    del spill
    for path in folder.glob("spill_*.bin") if folder else []:
        path.unlink()

    # math.log, as rank-bm25 takes it: numpy's vectorised log differs from it by an ulp on some values
    # (first at 54,731.5 on an AVX-512 CPU). Taken once per distinct document frequency, a few thousand.
    counts, term_count = np.unique(df, return_inverse=True)
    log = np.frompyfunc(math.log, 1, 1)
    idf = (log(n_docs - counts + 0.5).astype(np.float64) - log(counts + 0.5).astype(np.float64))[term_count]  # [V]
    # rank-bm25 sums idf one term at a time in first-seen order (our id order); a sequential cumsum
    # reproduces that sum bit for bit, where idf.mean()'s pairwise sum would drift by an ulp.
    idf[idf < 0] = epsilon * (idf.cumsum()[-1] / len(words))
    # Same operation order as rank-bm25 (b * |d| / avgdl is (b * |d|) / avgdl), so norms match bit for bit.
    norm = k1 * (1 - b + b * doc_len / (doc_len.sum() / n_docs))          # [N]
    term_lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    arrays = dict(indptr=indptr, doc_ids=doc_ids, tf=tf, idf=idf, norm=norm,
                  term_bytes=np.frombuffer(b"".join(words), dtype=np.uint8),
                  term_offsets=np.concatenate([[0], np.cumsum(term_lengths)]),
                  term_order=np.array(sorted(range(len(words)), key=words.__getitem__), dtype=np.int32))
    if folder:
        arrays["text_offsets"] = text_offsets
        doc_ids.flush(), tf.flush()
        for name in ARRAYS:
            if name not in ("doc_ids", "tf"):
                np.save(folder / f"{name}.npy", arrays[name])
    return arrays


def _spill_postings(passages: Iterable[str], folder: Path | None, progress: bool):
    """Pass one: tokenise `passages` a chunk at a time and keep each chunk's postings (term, passage, tf),
    sorted by term, in memory or in spill files under `folder` (there the passages go to texts.bin too).
    Returns the terms' UTF-8 bytes in id order, df [V], tokens per passage [N], the spilled chunks, the
    largest tf, and the passages' byte offsets in texts.bin [N + 1] (None in memory)."""
    vocab = defaultdict(None, {word: i for i, word in enumerate(RESERVED)})  # then terms in first-seen order
    vocab.default_factory = vocab.__len__  # a factory that is the dict's own length keeps the lookup in C
    df = np.zeros(256, dtype=np.int64)                                     # [>= V] passages holding a term
    doc_lens, spill, text_ends, max_tf, n_docs = [], [], [], 0, 0
    names, dtypes = ("term", "doc", "tf"), (np.int32, np.int32, np.uint32)
    spill_files = [open(folder / f"spill_{name}.bin", "wb") for name in names] if folder else []
    blob = open(folder / "texts.bin", "wb") if folder else None
    passages = iter(tqdm(passages, desc="BM25 index: tokenising", unit=" passages", disable=not progress))
    while chunk := list(islice(passages, BUILD_CHUNK)):
        term_ids, local, lengths = _chunk_tokens(chunk, vocab)
        keys, tf = np.unique(term_ids * len(chunk) + local, return_counts=True)  # sorted by term, then passage
        terms, docs = np.divmod(keys, len(chunk))
        _, run_terms, run_lengths = _runs(terms)
        if len(vocab) - len(RESERVED) > len(df):  # grow by doubling: counting stays O(postings) a chunk
            df = np.concatenate([df, np.zeros(max(len(df), len(vocab) - len(RESERVED) - len(df)), dtype=np.int64)])
        df[run_terms] += run_lengths
        postings = [array.astype(dtype) for array, dtype in zip((terms, docs + n_docs, tf), dtypes)]
        if folder:
            for file, array in zip(spill_files, postings):
                array.tofile(file)
            spill.append(len(keys))
            text_ends.append(_write_texts(blob, chunk, [0])[1:] + (text_ends[-1][-1] if text_ends else 0))
        else:
            spill.append(postings)
        doc_lens.append(lengths)
        max_tf = max(max_tf, int(tf.max(initial=0)))
        n_docs += len(chunk)
        assert n_docs < 2 ** 31, "passage ids are int32"
    for file in spill_files + ([blob] if blob else []):
        file.close()
    if n_docs == 0:
        raise ValueError("empty corpus: no passages to index")
    if len(vocab) == len(RESERVED):  # BM25 of such a corpus is 0 / 0 (avgdl and mean idf): it can answer nothing
        raise ValueError(f"no indexable words in any of the {n_docs:,} passages (only stopwords, "
                         "punctuation or empty text): check the corpus's text fields")
    words = [word.encode() for word in islice(vocab, len(RESERVED), None)]
    if folder:  # pass two reads the spill back a chunk at a time
        spilled = [np.memmap(folder / f"spill_{name}.bin", dtype=dtype, mode="r") for name, dtype in zip(names, dtypes)]
        bounds = np.cumsum([0] + spill)
        spill = [[array[lo:hi] for array in spilled] for lo, hi in zip(bounds[:-1], bounds[1:])]
    text_offsets = np.concatenate([[0]] + text_ends) if folder else None
    return words, df[:len(words)], np.concatenate(doc_lens), spill, max_tf, text_offsets


def _chunk_tokens(chunk: list[str], vocab: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`tokenize` of every passage of `chunk`, as term ids (new terms join `vocab`), the chunk-local passage of
    each, and each passage's token count. One regex pass over the chunk joined by SEPARATOR, and stopwords
    dropped by their reserved ids, cost a fraction of a `tokenize` call a passage; the tokens are the same,
    since the separator's spaces end any word and its capital letter is in no lowercased text."""
    tokens = WORD.findall(SEPARATOR.join([text.lower() for text in chunk]))
    ids = np.fromiter(map(vocab.__getitem__, tokens), dtype=np.int64, count=len(tokens))
    passage = np.cumsum(ids == len(RESERVED) - 1)                        # [tokens] local passage of each
    keep = ids >= len(RESERVED)
    local = passage[keep]
    return ids[keep] - len(RESERVED), local, np.bincount(local, minlength=len(chunk))


def _union(id_arrays: list[np.ndarray]) -> np.ndarray:
    """The distinct ids of some ascending arrays, ascending (a stable sort merges such runs in linear time)."""
    ids = np.concatenate(id_arrays) if id_arrays else np.empty(0, dtype=np.intp)
    ids.sort(kind="stable")
    return ids[np.concatenate([[True], ids[1:] != ids[:-1]])] if ids.size else ids


def _runs(sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, value, length) of each run of equal values in `sorted_ids`."""
    starts = np.flatnonzero(np.diff(sorted_ids, prepend=-1))
    return starts, sorted_ids[starts], np.diff(starts, append=len(sorted_ids))


def _write_texts(file, texts, chunk_starts) -> np.ndarray:
    """Append `texts` to `file` as UTF-8 bytes, a chunk of BUILD_CHUNK at a time; their offsets [len + 1]."""
    ends = []
    for start in chunk_starts:
        encoded = [text.encode("utf-8", "surrogatepass") for text in texts[start:start + BUILD_CHUNK]]
        file.write(b"".join(encoded))
        ends.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
    return np.concatenate([[0], np.cumsum(np.concatenate(ends))])


def _top_k(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of `row`, best first, ties to the lower index."""
    if k == 0:
        return np.empty(0, dtype=np.int64)
    positive = row > 0
    n_positive = np.count_nonzero(positive)
    if n_positive < k:  # zero (or negative) scores make the cut: rare, so a full stable sort will do
        return np.argsort(-row, kind="stable")[:k]
    # The k-th largest score is positive. Select it among the positive scores unless they are most of the row:
    # np.partition takes a slow path on rows that are mostly tied zeros.
    values = row if n_positive > len(row) // 2 else row[positive]
    threshold = np.partition(values, values.size - k)[values.size - k]
    # argpartition would pick arbitrary members of a tie at the threshold; sorting all of them by (score,
    # index) keeps the lowest indices.
    top = np.flatnonzero(row >= threshold)
    return top[np.lexsort((top, -row[top]))][:k]


def format_hits(hits: list[tuple[int, float]], texts, rng: random.Random | None = None) -> str:
    """Render hits as the lines the policy reads: `Doc i(Title: <title>) <text>`, numbered from 1, a passage's
    lines joined by spaces. With `rng` they are joined in an order it shuffles, anew for every passage
    (the synthetic world writes one fact a line: --fact-order shuffled)."""
    lines = []
    for rank, (doc, _) in enumerate(hits, start=1):
        title, _, text = texts[doc].partition("\n")
        sentences = text.splitlines()
        if rng is not None:
            rng.shuffle(sentences)
        lines.append(f"Doc {rank}(Title: {title}) {' '.join(sentences)}")
    return "\n".join(lines)
