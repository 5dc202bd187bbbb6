"""BM25 in process memory, derived from a collection store's postings (as FAISS is derived from its vectors).

Every window is a *slot*: its key, its length in terms, whether it is still alive. Each term has its postings
(slots and frequencies) as a few numpy chunks: a write appends one chunk per term it contains, a search reads
a term's chunks (consolidating them into one when there are many). Deleting marks slots dead; corpus
statistics (``N``, ``n(t)``, the average length) count live windows only, so scores are exactly those of
``models/lexical.py`` over the collection as it is. Once dead slots are a quarter of all, they are compacted away.
A search accumulates each query term's contributions over its postings (vectorised), then keeps each document's
best window.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from embedlift.models.lexical import Analyzer, idf, tf_component
from embedlift.service.collections.base import WINDOW_BITS, Candidates, Changes, CollectionStore, LexicalIndex, Postings, Selection

COMPACT_FRACTION = 0.25
COMPACT_MIN = 1024
CONSOLIDATE_CHUNKS = 8
#: Query terms whose weights are kept between writes (a search's terms are a handful; a busy index's, thousands).
CACHED_TERMS = 4096


class MemoryLexicalIndex(LexicalIndex):
    """A store's postings in memory; thread-safe.

    Args:
        store: The store the postings come from (its vocabulary names the terms).
        analyzer: The collection's analyzer (queries are analysed with it by the caller).
    """

    def __init__(self, store: CollectionStore, analyzer: Analyzer) -> None:
        self.store, self.analyzer = store, analyzer
        self.status = "building"
        self._lock = threading.RLock()
        self._clear()

    def _clear(self) -> None:
        """Empty (at start, and before a reload)."""
        self._n = 0  # slots used
        self._keys = np.zeros(0, np.int64)
        self._lengths = np.zeros(0, np.float64)
        self._alive = np.zeros(0, bool)
        self._slot_of: dict[int, int] = {}
        self._live = 0
        self._total_length = 0.0
        self._postings: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        # A term's live slots and BM25 weights, valid for one generation of the index (every write starts a new
        # one: N, n(t) and the average length move); searches between writes reuse them.
        self._generation = 0
        self._weights: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}

    def load(self) -> MemoryLexicalIndex:
        """Fill from the store's postings (at start); ``ready`` when they are complete for this analyzer."""
        with self._lock:
            self._generation += 1
            self._weights.clear()
            for part in self.store.iter_postings():
                self._append(part)
            self.status = "ready" if self.store.postings_state() == self.analyzer.version else "building"
        return self

    @property
    def windows(self) -> int:
        """Live windows indexed."""
        return self._live

    # writes ------------------------------------------------------------------------------------------
    def apply(self, changes: Changes) -> None:
        with self._lock:
            self._generation += 1
            self._weights.clear()
            self._remove(changes.removed)
            if changes.postings is not None:
                self._append(changes.postings)

    def has(self, key: int) -> bool:
        """Whether window ``key`` is indexed (and alive)."""
        return key in self._slot_of

    def _grow(self, need: int) -> None:
        if need <= len(self._keys):
            return
        size = max(need, 2 * len(self._keys), 1024)
        for name, dtype in (("_keys", np.int64), ("_lengths", np.float64), ("_alive", bool)):
            grown = np.zeros(size, dtype)
            grown[: self._n] = getattr(self, name)[: self._n]
            setattr(self, name, grown)

    def _append(self, p: Postings) -> None:
        if len(p.keys) == 0:
            return
        slots = np.arange(self._n, self._n + len(p.keys), dtype=np.int64)
        self._grow(self._n + len(p.keys))
        self._keys[slots], self._lengths[slots], self._alive[slots] = p.keys, p.lengths, True
        self._n += len(p.keys)
        self._slot_of.update(zip(p.keys.tolist(), slots.tolist(), strict=True))
        self._live += len(p.keys)
        self._total_length += float(p.lengths.sum())
        if len(p.term_ids) == 0:  # windows without a term (stopwords, punctuation): counted, nothing to post
            return
        order = np.argsort(p.term_ids, kind="stable")  # the batch's postings grouped by term
        term_ids, posting_slots, tfs = p.term_ids[order], slots[p.window_of[order]].astype(np.int32), p.tfs[order]
        bounds = np.flatnonzero(np.diff(term_ids)) + 1
        starts, ends = np.r_[0, bounds], np.r_[bounds, len(term_ids)]
        for term, a, b in zip(term_ids[starts].tolist(), starts.tolist(), ends.tolist(), strict=True):
            self._postings.setdefault(term, []).append((posting_slots[a:b], tfs[a:b]))

    def _remove(self, keys: np.ndarray) -> None:
        for key in keys.tolist():
            slot = self._slot_of.pop(key, None)
            if slot is not None and self._alive[slot]:
                self._alive[slot] = False
                self._live -= 1
                self._total_length -= float(self._lengths[slot])
        dead = self._n - self._live
        if dead >= max(COMPACT_MIN, COMPACT_FRACTION * self._n):
            self._compact()

    def _compact(self) -> None:
        """Drop dead slots from every posting and renumber the live ones."""
        alive = self._alive[: self._n]
        renumber = np.cumsum(alive) - 1
        for term in list(self._postings):
            slots, tfs = self._chunks(term)
            keep = alive[slots]
            if keep.any():
                self._postings[term] = [(renumber[slots[keep]].astype(np.int32), tfs[keep])]
            else:
                del self._postings[term]
        self._keys = self._keys[: self._n][alive].copy()
        self._lengths = self._lengths[: self._n][alive].copy()
        self._n = len(self._keys)
        self._alive = np.ones(self._n, bool)
        self._slot_of = dict(zip(self._keys.tolist(), range(self._n), strict=True))

    def _chunks(self, term: int) -> tuple[np.ndarray, np.ndarray]:
        """A term's postings as one pair of arrays (consolidated in place once they are many chunks)."""
        chunks = self._postings[term]
        if len(chunks) == 1:
            return chunks[0]
        slots, tfs = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
        if len(chunks) > CONSOLIDATE_CHUNKS:
            self._postings[term] = [(slots, tfs)]
        return slots, tfs

    # search ------------------------------------------------------------------------------------------
    def _term_weights(self, term: int, avg: float) -> tuple[np.ndarray, np.ndarray]:
        """A term's live slots and each one's BM25 contribution ``idf * tf component`` (cached per generation)."""
        cached = self._weights.get(term)
        if cached is not None and cached[0] == self._generation:
            return cached[1], cached[2]
        slots, tfs = self._chunks(term)
        if self._live < self._n:  # some slots are dead: they neither count nor score
            live = self._alive[slots]
            slots, tfs = slots[live], tfs[live]
        weights = idf(self._live, np.float64(len(slots))) * tf_component(tfs.astype(np.float64), self._lengths[slots], avg)
        if len(self._weights) >= CACHED_TERMS:
            self._weights.clear()
        self._weights[term] = (self._generation, slots, weights)
        return slots, weights

    def lexical(self, queries: Sequence[Sequence[str]], n: int, selection: Selection | None = None) -> list[Candidates]:
        vocabulary = self.store.vocabulary()
        with self._lock:
            if self._live == 0:
                return [{} for _ in queries]
            allowed = None
            if selection is not None and selection.where is not None:
                allowed = np.zeros(self._n, bool)
                slots = [s for s in map(self._slot_of.get, selection.keys.tolist()) if s is not None]
                allowed[slots] = True
            avg = self._total_length / self._live
            return [self._one(terms, vocabulary, n, avg, allowed) for terms in queries]

    def _one(self, terms: Sequence[str], vocabulary: dict[str, int], n: int, avg: float, allowed: np.ndarray | None) -> Candidates:
        scores = np.zeros(self._n, np.float64)
        for term in terms:  # a term repeated in the query counts each time
            term_id = vocabulary.get(term)
            if term_id is None or term_id not in self._postings:
                continue
            slots, weights = self._term_weights(term_id, avg)
            scores[slots] += weights
        if allowed is not None:
            scores[~allowed] = 0.0
        return _best_documents(scores, self._keys, n)


def _best_documents(scores: np.ndarray, keys: np.ndarray, n: int) -> Candidates:
    """The ``n`` documents whose best window scores highest (ties by document id), each with that window.

    Sorting every window that matched (most of a large collection for a common term) dominated a search, so
    only the windows at or above the score of the ``m``-th best are sorted, ``m`` doubling until they hold ``n``
    documents: a document left out has every window below that score, so the result is the exact top ``n``."""
    hit = np.flatnonzero(scores > 0)
    if len(hit) == 0:
        return {}
    values = scores[hit]
    m = 4 * n
    while True:
        if m < len(hit):
            cut = np.partition(values, len(values) - m)[len(values) - m]  # the m-th best score
            chosen = np.flatnonzero(values >= cut)  # ties at the cut included
        else:
            chosen = np.arange(len(hit))
        k, v = keys[hit[chosen]], values[chosen]
        docs = k >> WINDOW_BITS
        order = np.lexsort((docs, -v))  # best first; a document's best window comes first among its own
        docs, k, v = docs[order], k[order], v[order]
        _, first = np.unique(docs, return_index=True)
        if len(first) >= n or len(chosen) == len(hit):
            break
        m *= 2
    best = np.sort(first)[:n]  # positions of each document's best window, in ranking order
    mask = (1 << WINDOW_BITS) - 1
    return {int(d): (float(s), int(w & mask)) for d, w, s in zip(docs[best], k[best], v[best], strict=True)}
