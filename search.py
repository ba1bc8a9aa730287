"""Search: passages -> BM25 index -> top-k hits, formatted for the <information> block.

The search tool the policy learns to call is plain lexical retrieval over passages ("Title\\ntext", the wiki-18
`contents` shape). Each passage d of length |d| is scored for a query q by Okapi BM25:

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = log(N - n(t) + 0.5) - log(n(t) + 0.5)

with N passages, n(t) of them containing t, and avgdl the mean passage length in tokens. The semantics are
exactly those of rank-bm25 0.2.2's `BM25Okapi`, so scores agree with `get_scores` to float64 rounding:
a term in more than half the passages would get a negative idf and is floored at epsilon * (mean idf over the
vocabulary); a repeated query term counts once per occurrence; an unknown term contributes 0; every passage
gets a score, 0 included (a passage with no indexable word scores 0). A corpus with no indexable word at
all is refused: its avgdl and mean idf would be 0 / 0.

Everything that does not depend on the query is paid for once at build time: each (term, passage) posting
stores its whole BM25 term weight in a CSR layout (term -> a slice of passage ids and weights), so a query is
a scatter-add of its terms' postings into a score row, followed by an O(N) top-k selection. A batch of queries
shares that row; its cost is the postings it touches plus O(N) a query, with no per-passage Python work.

The index keeps 12 bytes a posting (an int32 passage id and a float64 weight) plus its vocabulary, so
`estimate_index_bytes` can size it from a sample of passages before any of it is built: postings from the
mean number of distinct terms a passage, vocabulary from Heaps' law V = K * T^beta fitted on the sample.

Left out: stemming, phrase and proximity queries, dense retrievers and rerankers, an on-disk index (the whole
index lives in memory), and sharding across processes.
"""
import math
import random
import re
import sys
from collections import defaultdict
from itertools import chain

import numpy as np

# Question words and glue; dropping them keeps "who was the director of X" from matching every passage.
STOPWORDS = frozenset("""
a an the of in on at to for from by with as into about and or but not no is are was were be been being
it its this that these those what which who whom whose where when why how did does do has have had
""".split())
WORD = re.compile(r"\w+")  # unicode-aware on str: letters, digits and underscore of any script

BUILD_CHUNK = 10_000  # passages tokenised at a time, so the token strings of a corpus never all live at once
DICT_SLOT_BYTES = 30  # a dict entry's share of the hash table, measured 21-38 bytes on CPython 3.11


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens minus stopwords; the one tokeniser for both passages and queries."""
    return [word for word in WORD.findall(text.lower()) if word not in STOPWORDS]


class BM25Index:
    """An in-memory BM25 Okapi index over `texts`, with postings grouped by term (CSR)."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        if len(texts) == 0:
            raise ValueError("empty corpus: no passages to index")
        self.texts = texts
        n_docs = len(texts)

        # Term ids in first-seen order; a defaultdict whose factory is its own length keeps the lookup in C.
        vocab = defaultdict()
        vocab.default_factory = vocab.__len__
        doc_len = np.empty(n_docs, dtype=np.int64)                         # [N] tokens per passage
        key_chunks = []  # one key term * N + passage per token
        for start in range(0, n_docs, BUILD_CHUNK):
            tokens = [tokenize(text) for text in texts[start:start + BUILD_CHUNK]]
            lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
            doc_len[start:start + len(tokens)] = lengths
            term_ids = np.fromiter(map(vocab.__getitem__, chain.from_iterable(tokens)), dtype=np.int64,
                                   count=lengths.sum())
            passages = np.repeat(np.arange(start, start + len(tokens), dtype=np.int64), lengths)
            key_chunks.append(term_ids * n_docs + passages)
        vocab.default_factory = None  # from here on an unknown query term is a miss, not a new id
        if not vocab:  # BM25 of such a corpus is 0 / 0 (avgdl and the mean idf): it cannot answer any query
            raise ValueError(f"no indexable words in any of the {n_docs:,} passages (only stopwords, "
                             "punctuation or empty text): check the corpus's text fields")
        self.vocab = vocab

        # One sort of the keys groups postings by term with passages ascending, and counts tf.
        keys, tf = np.unique(np.concatenate(key_chunks), return_counts=True)  # [P] postings
        del key_chunks
        post_term, post_doc = np.divmod(keys, n_docs)
        df = np.bincount(post_term, minlength=len(vocab))                  # [V] passages containing a term
        self.indptr = np.concatenate([[0], np.cumsum(df)])                 # [V + 1] term -> posting slice

        idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)                 # [V]
        # rank-bm25 sums idf one term at a time in first-seen order (our id order); a sequential cumsum
        # reproduces that sum bit for bit, where idf.mean()'s pairwise sum would drift by an ulp.
        floor = epsilon * (idf.cumsum()[-1] / len(vocab))
        idf[idf < 0] = floor
        avgdl = doc_len.sum() / n_docs
        # Same operation order as rank-bm25 (b * |d| / avgdl is (b * |d|) / avgdl), so weights match bit for bit.
        dl = doc_len[post_doc]
        self.weights = idf[post_term] * (tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl)))  # [P] float64
        self.doc_ids = post_doc.astype(np.int32)                          # [P]

    def __len__(self) -> int:
        return len(self.texts)

    def _score_into(self, row: np.ndarray, query: str) -> None:
        """Add the BM25 score of every passage for `query` into `row` [N], one query term at a time."""
        for word in tokenize(query):
            term = self.vocab.get(word)
            if term is None:
                continue
            lo, hi = self.indptr[term], self.indptr[term + 1]
            # A term's postings name each passage once, so fancy-index += never drops a duplicate.
            row[self.doc_ids[lo:hi]] += self.weights[lo:hi]

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
        row = np.empty(len(self))  # [N] one score buffer shared by the whole batch
        hits = []
        for query in queries:
            row.fill(0.0)
            self._score_into(row, query)
            top = _top_k(row, k)
            hits.append(list(zip(top.tolist(), row[top].tolist())))
        return hits


def estimate_index_bytes(texts: list[str], sample_size: int = 5000, seed: int = 0) -> int:
    """Bytes a `BM25Index(texts)` will keep beyond the passages (CSR arrays and vocabulary), estimated from
    `sample_size` passages drawn at random; exact counts, up to the per-term dict cost, when the sample is
    all of `texts`. The build itself briefly needs several times more (it sorts one int64 key per token)."""
    if not texts:
        return 0
    picks = random.Random(seed).sample(range(len(texts)), min(sample_size, len(texts)))
    tokens = [tokenize(texts[i]) for i in picks]
    # Postings: a passage holds one per distinct term, so the sample's mean scales with the passage count.
    postings = sum(len(set(t)) for t in tokens) / len(tokens) * len(texts)
    # Vocabulary: Heaps' law V = K * T^beta, beta from its growth between half and all of the sample.
    half = len(tokens) // 2
    half_tokens, sample_tokens = sum(map(len, tokens[:half])), sum(map(len, tokens))
    half_vocab, sample_vocab = set(chain.from_iterable(tokens[:half])), set(chain.from_iterable(tokens))
    vocab = len(sample_vocab)
    if len(picks) < len(texts) and 0 < len(half_vocab) < vocab:
        beta = min(1.0, math.log(vocab / len(half_vocab)) / math.log(sample_tokens / half_tokens))
        corpus_tokens = sample_tokens / len(tokens) * len(texts)
        vocab = min(vocab * (corpus_tokens / sample_tokens) ** beta, corpus_tokens)
    # A term costs its str (sample words stand for the unseen ones), its int id and a dict slot.
    term_bytes = (sum(map(sys.getsizeof, sample_vocab)) / max(1, len(sample_vocab)) + sys.getsizeof(2 ** 20)
                  + DICT_SLOT_BYTES)
    # doc_ids int32 + weights float64 per posting, indptr int64 per term, and the vocabulary dict
    return int(postings * (4 + 8) + (vocab + 1) * 8 + vocab * term_bytes)


def _top_k(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of `row`, best first, ties to the lower index."""
    if k == 0:
        return np.empty(0, dtype=np.int64)
    # Usually k passages share a query term, and then the winners are among the positive scores; selecting
    # there also dodges np.partition's slow path on rows that are mostly tied zeros.
    positive = np.flatnonzero(row > 0)                                     # ascending passage ids
    if positive.size < k:  # zero (or negative) scores make the cut: rare, so a full stable sort will do
        return np.argsort(-row, kind="stable")[:k]
    values = row[positive]
    threshold = np.partition(values, values.size - k)[values.size - k]    # the k-th largest score
    above = positive[values > threshold]
    # argpartition would pick arbitrary members of a tie at the threshold; take the lowest indices instead.
    tied = positive[values == threshold][:k - above.size]
    top = np.concatenate([above, tied])
    return top[np.lexsort((top, -row[top]))]


def format_hits(hits: list[tuple[int, float]], texts: list[str]) -> str:
    """Render hits as the lines the policy reads: `Doc i(Title: <title>) <text>`, numbered from 1."""
    lines = []
    for rank, (doc, _) in enumerate(hits, start=1):
        title, _, text = texts[doc].partition("\n")
        lines.append(f"Doc {rank}(Title: {title}) {' '.join(text.splitlines())}")
    return "\n".join(lines)
