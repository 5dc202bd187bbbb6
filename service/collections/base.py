"""What a collection is made of, as small interfaces: where its documents live and how they are searched.

- ``CollectionStore`` is persistence, the source of truth: documents with their text, metadata, the *base*
  vector of every window and its analysed terms (the lexical index's postings), written in one transaction per
  call; a consistent snapshot read; the staged swap of a re-index onto another base; an integrity check.
  ``SQLiteStore`` (one file per collection) is the embedded one.
- ``CollectionIndex`` is dense search: each document's best window for query vectors, filtered by metadata.
  ``FaissIndex`` is derived from a store (rebuilt from its vectors at start, kept up to date with every committed
  write through ``apply``); an index that searches the store itself in SQL has nothing to apply.
- ``LexicalIndex`` is BM25 search over the windows' terms (``models/lexical.py``'s formula, identical on every
  store); ``MemoryLexicalIndex`` is derived from the store's postings as FAISS is from its vectors.

Both kinds of index return *candidates* (``{document key: (score, best window)}``); the collection fuses them
and resolves only the hits it returns.

Window keys: every window has one ``int64`` key, ``document_key << 16 | window``, where the document key is the
store's row number for the document (never reused, so a re-upserted document gets fresh keys). A hit's document
is ``key >> 16``: no lookup is needed to keep one hit per document.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from embedlift.models.lexical import Analyzer, LexicalSettings
from embedlift.models.spec import BaseSpec
from embedlift.models.windows import Span, WindowedVectors
from embedlift.service.schemas import IndexKind, StoredDocument

WINDOW_BITS = 16
MAX_WINDOWS = 1 << WINDOW_BITS
Metadata = dict[str, Any]
Filter = dict[str, Any]
#: One query's candidates: ``{document key: (score, best window)}``.
Candidates = dict[int, tuple[float, int]]


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
    # A collection written before lexical indexes existed reads as English, and gets its index built at start.
    lexical: LexicalSettings | None = LexicalSettings()
    alpha: float | None = None


@dataclass(frozen=True)
class WindowTerms:
    """A window's analysed text: its length in terms and each term's frequency (``Analyzer.counts``)."""

    length: int
    counts: dict[str, int]


@dataclass(frozen=True)
class NewDocument:
    """A document ready to store: its base window vectors already computed."""

    id: str
    text: str
    metadata: Metadata
    spans: list[Span]
    vectors: np.ndarray  # (n_windows, d) float32, normalised base vectors
    terms: list[WindowTerms] | None = None  # one per window; None: the collection has no lexical index


@dataclass(frozen=True)
class Postings:
    """Windows' terms as flat arrays: window ``i`` (key ``keys[i]``, ``lengths[i]`` terms) holds term
    ``term_ids[j]`` ``tfs[j]`` times for every ``j`` with ``window_of[j] == i``. Term ids are the store's."""

    keys: np.ndarray  # (W,) int64 window keys
    lengths: np.ndarray  # (W,) float32
    window_of: np.ndarray  # (P,) int64, index into keys
    term_ids: np.ndarray  # (P,) int64
    tfs: np.ndarray  # (P,) float32

    @staticmethod
    def empty() -> Postings:
        z = np.zeros(0, np.int64)
        return Postings(keys=z, lengths=np.zeros(0, np.float32), window_of=z, term_ids=z, tfs=np.zeros(0, np.float32))

    @staticmethod
    def concat(parts: list[Postings]) -> Postings:
        if not parts:
            return Postings.empty()
        offsets = np.cumsum([0, *(len(p.keys) for p in parts[:-1])])
        return Postings(
            keys=np.concatenate([p.keys for p in parts]), lengths=np.concatenate([p.lengths for p in parts]),
            window_of=np.concatenate([p.window_of + o for p, o in zip(parts, offsets, strict=True)]),
            term_ids=np.concatenate([p.term_ids for p in parts]), tfs=np.concatenate([p.tfs for p in parts]),
        )


@dataclass(frozen=True)
class Changes:
    """What one committed write did to the windows: the keys removed, and per added document its keys and
    base vectors (what a derived index applies)."""

    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    added: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    postings: Postings | None = None  # the added windows' terms (a collection with a lexical index)


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
    def stage_windows(self, per_doc: Sequence[tuple[int, list[Span], np.ndarray, list[WindowTerms] | None]]) -> None: ...

    @abstractmethod
    def swap_staged(self, fingerprint: str, dim: int, base: BaseSpec | None = None) -> CollectionConfig: ...

    # The lexical index's postings: written with each document when the collection has a lexical index; for a
    # collection written before, built in the background (``missing_postings`` / ``add_postings``), and marked
    # complete with the analyzer that made them (another analyzer's are cleared and rebuilt).
    @abstractmethod
    def vocabulary(self) -> dict[str, int]:
        """Term -> id, as the postings name them (the same dict object as the store grows it)."""

    @abstractmethod
    def iter_postings(self, chunk: int = 20_000) -> Iterator[Postings]:
        """Every window's postings, in chunks, from one consistent snapshot."""

    @abstractmethod
    def postings_state(self) -> str | None:
        """The analyzer version every window's postings were made with, or ``None`` while some are missing."""

    @abstractmethod
    def missing_postings(self, limit: int) -> list[tuple[int, str, list[Span]]]:
        """Up to ``limit`` documents without postings: ``(document key, text, window spans)``."""

    @abstractmethod
    def add_postings(self, per_doc: Sequence[tuple[int, list[WindowTerms]]]) -> Postings:
        """Write postings for documents that are still present (in one transaction); what was written."""

    @abstractmethod
    def mark_postings(self, analyzer: str | None) -> None:
        """Record that every window's postings were made with ``analyzer`` (``None``: clear them all)."""

    # The indexes that serve searches: derived in process memory (FAISS, BM25 arrays) from what the store holds,
    # unless the store searches itself (PostgreSQL), where every replica sees every write at once.
    def dense_index(self, config: CollectionConfig) -> CollectionIndex:
        """The base vectors' dense index, loaded."""
        from embedlift.service.collections.faiss_index import FaissIndex

        return FaissIndex(self, config).load()

    def view_index(self, config: CollectionConfig, transform: Any, label: str) -> CollectionIndex:
        """An ``apply_to: both`` adapter's document view: the stored base vectors mapped by ``transform``."""
        from embedlift.service.collections.faiss_index import FaissIndex

        return FaissIndex(self, config, transform, label).load()

    def drop_views(self, keep: set[str]) -> None:
        """Remove what the store keeps of views whose adapter's label is not in ``keep`` (in memory: nothing)."""

    def lexical_index(self, analyzer: Analyzer) -> LexicalIndex:
        """The lexical index for ``analyzer``, loaded (``status`` says whether the postings are complete)."""
        from embedlift.service.collections.lexical_index import MemoryLexicalIndex

        return MemoryLexicalIndex(self, analyzer).load()

    @abstractmethod
    def check(self) -> None:
        """Raise if the store fails its integrity check (run at start, so damage is found with its name)."""

    @abstractmethod
    def close(self) -> None: ...


class Selection:
    """A search's metadata filter, evaluated (once, when an index first asks) into the window keys it allows."""

    def __init__(self, store: CollectionStore, where: Filter | None) -> None:
        self.store, self.where = store, where or None
        self._keys: np.ndarray | None = None

    @property
    def keys(self) -> np.ndarray:
        """Allowed window keys, sorted."""
        if self._keys is None:
            assert self.where is not None
            self._keys = np.sort(self.store.matching(self.where))
        return self._keys


class CollectionIndex(ABC):
    """Dense search over a collection's windows: for each query vector, the documents of its best-scoring
    windows with their best window (inner product on normalised vectors), filtered by metadata."""

    #: ``flat`` (exact) or ``hnsw`` (approximate): what serves now.
    kind: str

    @abstractmethod
    def dense(self, queries: np.ndarray, n: int, selection: Selection | None = None) -> list[Candidates]:
        """The ``n`` best documents per query (fewer when fewer match)."""

    def apply(self, changes: Changes) -> None:
        """Follow a write the store has committed (a derived index); an index that reads the store has nothing to do."""

    @property
    def pending(self) -> bool:
        """Whether it must be built (``build``) before it serves: an adapter's view kept in the store itself.
        An index in memory is built when it is made."""
        return False

    def catch_up(self) -> None:
        """Apply the writes committed since it was last current (an index kept in the store; in memory: nothing,
        writes are applied as they happen)."""

    def claim_build(self, job_id: str) -> bool:
        """Whether this replica builds it, as job ``job_id`` (``False``: built, or a live job already does)."""
        return False

    def build(self, report: Callable[[int, int], None] | None = None) -> None:
        """Fill it from the stored base vectors (``report(done, total)`` in windows); then it serves."""

    def close(self) -> None:
        """Release what the index holds."""


class LexicalIndex(ABC):
    """BM25 over a collection's windows (``models/lexical.py``): each document's best window for the query's terms."""

    #: ``building`` (dense search serves meanwhile) or ``ready``.
    status: str
    @property
    @abstractmethod
    def windows(self) -> int:
        """Windows indexed so far (for messages while building)."""

    @abstractmethod
    def lexical(self, queries: Sequence[Sequence[str]], n: int, selection: Selection | None = None) -> list[Candidates]:
        """The ``n`` best documents per query (its analysed terms); a document with none of them is no candidate."""

    def apply(self, changes: Changes) -> None:
        """Follow a committed write."""

    def close(self) -> None:
        """Release what the index holds."""
