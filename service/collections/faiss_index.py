"""Dense search in process memory with FAISS, derived from a collection store.

A ``FaissIndex`` holds one FAISS index over a collection's windows: the base vectors, or an adapter's document
view of them (the stored base vectors mapped by its document transform, no re-embedding). It is rebuilt from
the store at start and follows every committed write (``apply``); nothing is lost if it is lost.

Kinds: ``flat`` (exact, ``IndexFlatIP``), ``hnsw`` (approximate), or, for a collection created ``auto``, exact
while the collection is small enough for exact search to stay fast (``AUTO_HNSW_WINDOWS``, from ``make
bench-serving``: about 2 ms per query at 20k windows of 384 dimensions on two cores), then HNSW, built in the
background once it grows past that. FAISS cannot remove ids from an HNSW graph: deleted keys are filtered at
search time (an ``IDSelector``) and the graph is rebuilt in the background once they make up a quarter of it.
A rebuild reads a snapshot off the lock, replays the writes made meanwhile (skipping keys the snapshot
already has), then swaps the new index in at once; searches go on against the old one until then.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Literal

import faiss as _faiss
import numpy as np

from embedlift.service.collections.base import Candidates, Changes, CollectionConfig, CollectionIndex, CollectionStore, Selection, split_key

logger = logging.getLogger(__name__)
# faiss's bundled stubs (faiss/__init__.pyi) lack SearchParametersHNSW, IDSelector attributes and more: untyped.
faiss: Any = _faiss

AUTO_HNSW_WINDOWS = 20_000  # ``auto``: exact search up to this many windows, HNSW beyond
REBUILD_FRACTION = 0.25  # HNSW: rebuild once deleted keys are this share of the graph
REBUILD_MIN = 256
Kind = Literal["flat", "hnsw"]
Transform = Callable[[np.ndarray], np.ndarray]


class FaissIndex(CollectionIndex):
    """One FAISS ``IndexIDMap2`` over a store's windows (window keys as FAISS ids), inner product on normalised
    vectors; thread-safe.

    Args:
        store: The store it is derived from (and resolves hits against).
        config: The collection's settings (dimension, index kind, HNSW parameters).
        transform: Maps base vectors to what this index holds (an adapter's document transform); ``None``:
            the base vectors themselves.
        label: For log lines (``base`` or the adapter's label).
    """

    def __init__(self, store: CollectionStore, config: CollectionConfig, transform: Transform | None = None, label: str = "base") -> None:
        self.store, self.config, self.transform, self.label = store, config, transform, label
        self.kind: Kind = "hnsw" if config.index == "hnsw" else "flat"
        self._lock = threading.RLock()
        self._index = self._empty(self.kind)
        self._deleted: set[int] = set()  # HNSW only: keys still in the graph but deleted
        self._rebuilding = False
        self._log: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None  # writes during a rebuild

    def load(self) -> FaissIndex:
        """Fill from the store (at start, or when an adapter's view is first needed)."""
        if self._outgrew_exact(self.store.count()[1]):
            self.kind = "hnsw"
        index, _ = self._filled(self.kind)
        with self._lock:
            self._index = index
        return self

    def keys(self) -> np.ndarray:
        """The window keys the index holds (deleted ones left out)."""
        with self._lock:
            held = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            return held[~np.isin(held, list(self._deleted))] if self._deleted else held

    @property
    def ntotal(self) -> int:
        """Windows in the index (deleted HNSW keys included until the next rebuild)."""
        return int(self._index.ntotal)

    @property
    def rebuilding(self) -> bool:
        return self._rebuilding

    def _outgrew_exact(self, windows: int) -> bool:
        return self.config.index == "auto" and windows >= AUTO_HNSW_WINDOWS

    def _empty(self, kind: Kind) -> Any:
        d = self.config.dim
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(d, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.config.ef_construction
        else:
            inner = faiss.IndexFlatIP(d)
        return faiss.IndexIDMap2(inner)

    def _add(self, index: Any, keys: np.ndarray, base_vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        vectors = base_vectors if self.transform is None else self.transform(base_vectors)
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.int64))

    def _filled(self, kind: Kind) -> tuple[Any, np.ndarray]:
        """A new index holding every window of one store snapshot, and the (sorted) keys it holds."""
        index, seen = self._empty(kind), []
        for keys, vectors in self.store.iter_windows():
            self._add(index, keys, vectors)
            seen.append(keys)
        return index, np.sort(np.concatenate(seen)) if seen else np.zeros(0, np.int64)

    # writes ------------------------------------------------------------------------------------------
    def apply(self, changes: Changes) -> None:
        with self._lock:
            self._remove(changes.removed)
            for keys, vectors in changes.added:
                self._add(self._index, keys, vectors)
                if self._log is not None:
                    self._log.append(("add", keys, vectors))
            if self.kind == "flat" and self._outgrew_exact(self._index.ntotal):
                self._start_rebuild()  # build HNSW aside, then swap

    def _remove(self, keys: np.ndarray) -> None:
        if len(keys) == 0:
            return
        if self._log is not None:
            self._log.append(("delete", keys, None))
        if self.kind == "hnsw":
            self._deleted.update(keys.tolist())
            if len(self._deleted) >= max(REBUILD_MIN, REBUILD_FRACTION * self._index.ntotal):
                self._start_rebuild()
        else:
            self._index.remove_ids(keys)

    def _start_rebuild(self) -> None:
        """Rebuild as HNSW in a background thread (compacting deleted keys, or converting an ``auto``
        collection from exact search)."""
        if self._rebuilding:
            return
        self._rebuilding = True
        self._log = []
        threading.Thread(target=self._rebuild, name=f"rebuild-{self.config.name}-{self.label}", daemon=True).start()

    def _rebuild(self) -> None:
        try:
            fresh, held = self._filled("hnsw")
            with self._lock:
                deleted: set[int] = set()
                for op, keys, vectors in self._log or []:
                    if op == "add":
                        new = ~np.isin(keys, held)  # the snapshot may already hold a write that was logged
                        self._add(fresh, keys[new], vectors[new])  # type: ignore[index]
                    else:
                        deleted.update(keys.tolist())
                converted = self.kind == "flat"
                self._index, self._deleted, self.kind = fresh, deleted, "hnsw"
            logger.info("collection %s (%s): %s", self.config.name, self.label, "converted to HNSW" if converted else "HNSW rebuilt without deleted keys")
        except Exception:
            logger.exception("collection %s (%s): HNSW rebuild failed; deleted keys stay filtered", self.config.name, self.label)
        finally:
            with self._lock:
                self._rebuilding = False
                self._log = None

    # search ------------------------------------------------------------------------------------------
    def dense(self, queries: np.ndarray, n: int, selection: Selection | None = None) -> list[Candidates]:
        """The ``n`` best documents per query; the FAISS call asks for more windows than ``n`` (a document may
        have several) and widens until every query has ``n`` documents or the index is exhausted."""
        selector = self._selector(selection)
        if selector is False:
            return [{} for _ in range(len(queries))]
        q = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock:
            index, kind = self._index, self.kind
            total = int(index.ntotal)
            params = self._params(kind, selector)
            want = min(total, max(2 * n, n + 16))
            best: list[Candidates] = [{} for _ in range(len(q))]
            while total > 0:
                scores, ids = index.search(q, want, params=params)
                best = [_best_per_document(s, i) for s, i in zip(scores, ids, strict=True)]
                if want >= total or all(len(b) >= n for b in best):
                    break
                want = min(total, want * 4)
        return [dict(list(b.items())[:n]) for b in best]

    def _params(self, kind: Kind, selector: Any | None) -> Any:
        if kind == "hnsw":
            if selector is None:
                return faiss.SearchParametersHNSW(efSearch=self.config.ef_search)
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.config.ef_search)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def _selector(self, selection: Selection | None) -> Any:
        """The FAISS id selector for deleted keys and a metadata filter; ``False`` when nothing can match."""
        deleted = None
        if self._deleted:
            deleted = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._deleted, np.int64)))
        if selection is None or selection.where is None:
            return deleted
        keys = selection.keys
        if len(keys) == 0:
            return False
        allowed = faiss.IDSelectorBatch(keys)
        allowed.referenced_ids = keys  # keep the array alive as long as the selector
        return faiss.IDSelectorAnd(allowed, deleted) if deleted is not None else allowed


def _best_per_document(scores: np.ndarray, ids: np.ndarray) -> Candidates:
    """From one query's window hits (descending), each document's best window: ``{key: (score, window)}``, in
    ranking order."""
    best: Candidates = {}
    for score, fid in zip(scores.tolist(), ids.tolist(), strict=True):
        if fid < 0:
            break
        seq, window = split_key(fid)
        if seq not in best:
            best[seq] = (score, window)
    return best
