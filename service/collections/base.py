"""What a collection is made of, as two small interfaces: where its documents live and how they are searched.

- ``CollectionStore`` is persistence, the source of truth: documents with their text, metadata and the *base*
  vector of every window, written in one transaction per call; a consistent snapshot read; the staged swap of a
  re-index onto another base; an integrity check. ``SQLiteStore`` (one file per collection) is the embedded one.
- ``CollectionIndex`` is search: the top-``k`` documents for query vectors, each scored by its best window,
  filtered by metadata. ``FaissIndex`` is derived from a store (rebuilt from its vectors at start, kept up to
  date with every committed write through ``apply``); an index that searches the store itself in SQL (the
  PostgreSQL store of a later issue) has nothing to apply.

Window keys: every window has one ``int64`` key, ``document_key << 16 | window``, where the document key is the
store's row number for the document (never reused, so a re-upserted document gets fresh keys). A hit's document
is ``key >> 16``: no lookup is needed to keep one hit per document.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from embedlift.models.spec import BaseSpec
from embedlift.models.windows import Span, WindowedVectors
from embedlift.service.schemas import IndexKind, SearchHit, StoredDocument

WINDOW_BITS = 16
MAX_WINDOWS = 1 << WINDOW_BITS
Metadata = dict[str, Any]
Filter = dict[str, Any]


def window_keys(document_key: int, n_windows: int) -> np.ndarray:
    """The keys of a document's windows."""
    return (np.int64(document_key) << WINDOW_BITS) + np.arange(n_windows, dtype=np.int64)


def split_key(key: int) -> tuple[int, int]:
    """``(document key, window)`` of a window key."""
    return key >> WINDOW_BITS, key & (MAX_WINDOWS - 1)


class CollectionConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What a collection was created with; kept by its store.

    Attributes:
        base: The base specification its vectors were made with (for messages; the fingerprint decides).
    """

    name: str
    base_fingerprint: str
    dim: int
    index: IndexKind = "auto"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    created: str = ""
    base: BaseSpec | None = None


@dataclass(frozen=True)
class NewDocument:
    """A document ready to store: its base window vectors already computed."""

    id: str
    text: str
    metadata: Metadata
    spans: list[Span]
    vectors: np.ndarray  # (n_windows, d) float32, normalised base vectors


@dataclass(frozen=True)
class Changes:
    """What one committed write did to the windows: the keys removed, and per added document its keys and
    base vectors (what a derived index applies)."""

    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    added: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


class CollectionStore(ABC):
    """A collection's documents, windows and base vectors. Every method is one transaction (or one
    consistent snapshot), safe to call from several threads."""

    #: Where the store lives, for messages (a file path, a table).
    where: str

    @abstractmethod
    def read_config(self) -> CollectionConfig: ...

    @abstractmethod
    def write_config(self, config: CollectionConfig) -> None: ...

    @abstractmethod
    def count(self) -> tuple[int, int]:
        """``(documents, windows)``."""

    @abstractmethod
    def upsert(self, docs: Sequence[NewDocument]) -> Changes:
        """Insert or replace documents by id with their windows, in one transaction."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> tuple[Changes, list[str]]:
        """Delete documents by id in one transaction; also the ids that were not there."""

    @abstractmethod
    def get(self, doc_id: str) -> StoredDocument | None: ...

    @abstractmethod
    def documents(self, keys: Sequence[int]) -> dict[int, tuple[str, str, Metadata]]:
        """``{document key: (id, text, metadata)}`` for the keys still present."""

    @abstractmethod
    def spans(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Span]:
        """Character spans of ``(document key, window)`` pairs."""

    @abstractmethod
    def matching(self, where: Filter) -> np.ndarray:
        """Window keys of the documents whose metadata matches ``where``."""

    @abstractmethod
    def iter_windows(self, chunk: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every window as ``(keys, base vectors)``, in chunks, from one consistent snapshot."""

    @abstractmethod
    def all_documents(self) -> tuple[list[str], list[str], WindowedVectors]:
        """Every document's id and text and every window's base vector (exact evaluation)."""

    @abstractmethod
    def texts(self) -> list[tuple[int, str]]:
        """Every document's key and text, in order (re-indexing)."""

    # A re-index onto another base stages the new windows batch by batch (a large collection never sits in
    # memory) and swaps them in with the new fingerprint in one transaction; a crash before the swap leaves
    # the old windows, and the next re-index starts its staging afresh.
    @abstractmethod
    def start_staging(self) -> None: ...

    @abstractmethod
    def stage_windows(self, per_doc: Sequence[tuple[int, list[Span], np.ndarray]]) -> None: ...

    @abstractmethod
    def swap_staged(self, fingerprint: str, dim: int, base: BaseSpec | None = None) -> CollectionConfig: ...

    @abstractmethod
    def check(self) -> None:
        """Raise if the store fails its integrity check (run at start, so damage is found with its name)."""

    @abstractmethod
    def close(self) -> None: ...


class CollectionIndex(ABC):
    """Dense search over a collection's windows: the top ``k`` documents per query vector, one hit per document
    (its best window), scores descending, filtered by metadata."""

    #: ``flat`` (exact) or ``hnsw`` (approximate): what serves now.
    kind: str

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, where: Filter | None = None) -> list[list[SearchHit]]: ...

    def apply(self, changes: Changes) -> None:
        """Follow a write the store has committed (a derived index); an index that reads the store has nothing to do."""

    def close(self) -> None:
        """Release what the index holds."""
