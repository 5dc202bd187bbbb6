"""A collection: its store (the source of truth) and its indexes (derived), kept consistent.

A write commits to the store first (that is the acknowledgement), then every index follows it, with both
steps under one write lock, so two writes to the same document never reach the indexes in the other order.
Why base vectors are stored: a query-only adapter (the default) searches the base index as it is, so swapping
adapters never rebuilds anything; an ``apply_to: both`` adapter gets its own index (a *view*: the stored base
vectors mapped by its document transform), built before it serves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from embedlift.models.adapters import Adapter
from embedlift.models.encoders import Encoder
from embedlift.models.errors import InvalidInputError
from embedlift.models.windows import embed_documents
from embedlift.service.collections.base import MAX_WINDOWS, CollectionConfig, CollectionIndex, CollectionStore, Filter, NewDocument
from embedlift.service.collections.faiss_index import FaissIndex
from embedlift.service.schemas import SearchHit, StoredDocument

BASE_VIEW = "base"


class Collection:
    """One collection's store and its indexes (the base one and one per ``apply_to: both`` adapter); thread-safe."""

    def __init__(self, store: CollectionStore, config: CollectionConfig) -> None:
        self.store = store
        self.config = config
        self._write_lock = threading.Lock()
        self._indexes: dict[str, CollectionIndex] = {}

    @property
    def name(self) -> str:
        return self.config.name

    def load(self) -> Collection:
        """Build the base index from the store (at start-up)."""
        self._indexes = {BASE_VIEW: FaissIndex(self.store, self.config).load()}
        return self

    @property
    def kind(self) -> str:
        """What serves the base searches now: ``flat`` or ``hnsw``."""
        return self._indexes[BASE_VIEW].kind

    @property
    def base_index(self) -> CollectionIndex:
        return self._indexes[BASE_VIEW]

    def counts(self) -> tuple[int, int]:
        """``(documents, windows)``."""
        return self.store.count()

    def index_for(self, key: str, adapter: Adapter | None) -> CollectionIndex:
        """The index an adapter's searches use: its view (``key`` = its label) for an ``apply_to: both`` adapter,
        built from the stored base vectors when missing; else the base index."""
        if adapter is None or adapter.config.apply_to != "both":
            return self._indexes[BASE_VIEW]
        if (index := self._indexes.get(key)) is not None:
            return index
        with self._write_lock:  # no write slips between the view's snapshot and its registration
            if key not in self._indexes:
                self._indexes = {**self._indexes, key: FaissIndex(self.store, self.config, adapter.transform_document, key).load()}
            return self._indexes[key]

    def drop_views(self, keep: set[str]) -> None:
        """Forget adapter views whose adapter is gone."""
        with self._write_lock:
            self._indexes = {k: v for k, v in self._indexes.items() if k == BASE_VIEW or k in keep}

    # writes ------------------------------------------------------------------------------------------
    def upsert(self, docs: Sequence[NewDocument]) -> None:
        for doc in docs:
            if len(doc.spans) >= MAX_WINDOWS:
                raise InvalidInputError(f"document {doc.id!r} needs {len(doc.spans)} windows > {MAX_WINDOWS - 1}; split it")
        with self._write_lock:
            changes = self.store.upsert(docs)
            for index in self._indexes.values():
                index.apply(changes)

    def delete(self, ids: Sequence[str]) -> list[str]:
        """Delete documents; returns the ids that were not in the collection."""
        with self._write_lock:
            changes, missing = self.store.delete(ids)
            for index in self._indexes.values():
                index.apply(changes)
        return missing

    # reads -------------------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, key: str = BASE_VIEW, adapter: Adapter | None = None, where: Filter | None = None
    ) -> list[list[SearchHit]]:
        """Top ``k`` documents per query vector (one hit per document: its best window), scores descending."""
        return self.index_for(key, adapter).search(queries, k, where)

    def get(self, doc_id: str) -> StoredDocument | None:
        return self.store.get(doc_id)

    def close(self) -> None:
        for index in self._indexes.values():
            index.close()
        self.store.close()


def reindex(
    store: CollectionStore, encoder: Encoder, *, batch: int = 256, report: Callable[[int, int], None] | None = None
) -> tuple[CollectionConfig, int]:
    """Re-embed every stored text with ``encoder`` (its windows) and swap the new vectors in atomically.

    Returns:
        The collection's new config and the number of windows written.
    """
    docs = store.texts()
    store.start_staging()
    windows = 0
    if report is not None:
        report(0, len(docs))
    for start in range(0, len(docs), batch):
        part = docs[start : start + batch]
        embedded = embed_documents(encoder, [text for _, text in part])
        store.stage_windows([(seq, spans, vectors) for (seq, _), (spans, vectors) in zip(part, embedded.per_document(), strict=True)])
        windows += len(embedded.spans)
        if report is not None:
            report(start + len(part), len(docs))
    return store.swap_staged(encoder.fingerprint, encoder.dim, encoder.spec), windows
