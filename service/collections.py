"""Collections: documents stored in SQLite (the source of truth) and searched through FAISS (derived).

A collection is a directory under ``<data_dir>/collections/<name>/`` holding one SQLite file (WAL journal,
``synchronous=FULL``): its settings, each document's id, text and metadata, and the *base* vector of every
window of every document. A write is one transaction, so an acknowledged upsert or delete survives a crash
and a crash mid-write leaves the last committed state. The FAISS indexes are rebuilt from that file when
the service starts; nothing is lost if they are.

Why base vectors: a query-only adapter (the default) searches the base index as it is, so swapping adapters
never rebuilds anything. An ``apply_to: both`` adapter gets its own *view*: the stored base vectors mapped by
its document transform (no re-embedding), built before it serves.

FAISS ids: ``seq << 16 | window``, where ``seq`` is the document's row number (SQLite ``AUTOINCREMENT``,
never reused, so a re-upserted document gets fresh ids) and ``window`` its window's position. A hit's
document is ``id >> 16``, no lookup needed to keep one hit per document (its best window).

Index kinds: ``flat`` (exact, ``IndexFlatIP``), ``hnsw`` (approximate), or ``auto`` (the default): exact
while the collection is small enough for exact search to stay fast (``AUTO_HNSW_WINDOWS``, from
``make bench-serving``: about 2 ms per query at 20k windows of 384 dimensions on two cores), then converted
to HNSW in the background once it grows past that. FAISS cannot remove ids from an HNSW graph: deleted ids
are filtered at search time (an ``IDSelector``) and the graph is rebuilt in the background once they make up
a quarter of it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import faiss
import msgspec
import numpy as np

from embedlift.models.adapters import Adapter
from embedlift.models.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError
from embedlift.models.windows import Span, WindowedVectors, embed_documents

if TYPE_CHECKING:
    from embedlift.models.encoders import Encoder

logger = logging.getLogger(__name__)

IndexKind = Literal["auto", "flat", "hnsw"]
AUTO_HNSW_WINDOWS = 20_000  # ``auto``: exact search up to this many windows, HNSW beyond
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)
STORE_FILE = "collection.sqlite3"
WINDOW_BITS = 16
MAX_WINDOWS = 1 << WINDOW_BITS
REBUILD_FRACTION = 0.25  # HNSW: rebuild once deleted ids are this share of the graph
REBUILD_MIN = 256
Metadata = dict[str, Any]
Filter = dict[str, str | int | float | bool | None]


def valid_name(name: str) -> bool:
    return _NAME.match(name) is not None


def check_name(name: str, what: str = "collection") -> str:
    """Names become directory names: letters, digits, ``_ . -``, starting with a letter or digit."""
    if not valid_name(name):
        raise InvalidInputError(
            f"invalid {what} name {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


class CollectionConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What a collection was created with; stored in its SQLite file."""

    name: str
    base_fingerprint: str
    dim: int
    index: IndexKind = "auto"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    created: str = ""


@dataclass(frozen=True)
class NewDocument:
    """A document ready to store: its base window vectors already computed."""

    id: str
    text: str
    metadata: Metadata
    spans: list[Span]
    vectors: np.ndarray  # (n_windows, d) float32, normalised base vectors


@dataclass(frozen=True)
class StoredDocument:
    id: str
    text: str
    metadata: Metadata
    windows: int


@dataclass(frozen=True)
class Hit:
    """One document found by a search: its best window's score and span."""

    id: str
    score: float
    text: str
    metadata: Metadata
    span: Span
    window: int


def faiss_ids(seq: int, n_windows: int) -> np.ndarray:
    return (np.int64(seq) << WINDOW_BITS) + np.arange(n_windows, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ store
class DocumentStore:
    """One collection's SQLite file. Every public method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS docs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                text TEXT NOT NULL,
                metadata TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS windows (
                seq INTEGER NOT NULL REFERENCES docs(seq) ON DELETE CASCADE,
                window INTEGER NOT NULL,
                start INTEGER NOT NULL,
                end INTEGER NOT NULL,
                vector BLOB NOT NULL,
                PRIMARY KEY (seq, window)
            ) WITHOUT ROWID;
            """
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    def check(self) -> None:
        """SQLite's own consistency check (pages, indexes, free lists), run at start: a damaged file is
        found then, with its name, not at the first query that touches the bad page."""
        with self._lock:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems))

    def read_config(self) -> CollectionConfig:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        if row is None:
            raise InvalidInputError(f"{self.path}: not an embedlift collection (no config); delete the directory")
        return msgspec.json.decode(row[0], type=CollectionConfig)

    def write_config(self, config: CollectionConfig) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)", (msgspec.json.encode(config).decode(),))

    def count(self) -> tuple[int, int]:
        """(documents, windows)."""
        with self._lock:
            docs = self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
            windows = self._db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
        return docs, windows

    def upsert(self, docs: Sequence[NewDocument]) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """Replace-or-insert ``docs``. Returns the FAISS ids removed and, per document, (new ids, vectors)."""
        removed: list[np.ndarray] = []
        added: list[tuple[np.ndarray, np.ndarray]] = []
        with self._tx() as db:
            for doc in docs:
                old = db.execute("SELECT seq FROM docs WHERE id = ?", (doc.id,)).fetchone()
                if old is not None:
                    n_old = db.execute("SELECT COUNT(*) FROM windows WHERE seq = ?", old).fetchone()[0]
                    removed.append(faiss_ids(old[0], n_old))
                    db.execute("DELETE FROM docs WHERE seq = ?", old)
                seq = db.execute(
                    "INSERT INTO docs (id, text, metadata) VALUES (?, ?, ?) RETURNING seq",
                    (doc.id, doc.text, json.dumps(doc.metadata, ensure_ascii=False)),
                ).fetchone()[0]
                db.executemany(
                    "INSERT INTO windows VALUES (?, ?, ?, ?, ?)",
                    [
                        (seq, w, a, b, np.asarray(v, np.float32).tobytes())
                        for w, ((a, b), v) in enumerate(zip(doc.spans, doc.vectors, strict=True))
                    ],
                )
                added.append((faiss_ids(seq, len(doc.spans)), doc.vectors))
        return (np.concatenate(removed) if removed else np.zeros(0, np.int64)), added

    def delete(self, ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Delete documents by id. Returns the FAISS ids removed and the ids that were not there."""
        removed, missing = [], []
        with self._tx() as db:
            for doc_id in ids:
                old = db.execute("SELECT seq FROM docs WHERE id = ?", (doc_id,)).fetchone()
                if old is None:
                    missing.append(doc_id)
                    continue
                n_old = db.execute("SELECT COUNT(*) FROM windows WHERE seq = ?", old).fetchone()[0]
                removed.append(faiss_ids(old[0], n_old))
                db.execute("DELETE FROM docs WHERE seq = ?", old)
        return (np.concatenate(removed) if removed else np.zeros(0, np.int64)), missing

    def get(self, doc_id: str) -> StoredDocument | None:
        with self._lock:
            row = self._db.execute(
                "SELECT d.id, d.text, d.metadata, (SELECT COUNT(*) FROM windows w WHERE w.seq = d.seq)"
                " FROM docs d WHERE d.id = ?",
                (doc_id,),
            ).fetchone()
        return None if row is None else StoredDocument(row[0], row[1], json.loads(row[2]), row[3])

    def documents_by_seq(self, seqs: Sequence[int]) -> dict[int, tuple[str, str, Metadata]]:
        out: dict[int, tuple[str, str, Metadata]] = {}
        with self._lock:
            for i in range(0, len(seqs), 500):
                chunk = list(seqs[i : i + 500])
                rows = self._db.execute(
                    f"SELECT seq, id, text, metadata FROM docs WHERE seq IN ({','.join('?' * len(chunk))})", chunk
                )
                out.update((seq, (doc_id, text, json.loads(meta))) for seq, doc_id, text, meta in rows)
        return out

    def spans(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Span]:
        with self._lock:
            return {
                (seq, w): (a, b)
                for seq, w in keys
                for a, b in self._db.execute("SELECT start, end FROM windows WHERE seq = ? AND window = ?", (seq, w))
            }

    def filtered_ids(self, where: Filter) -> np.ndarray:
        """FAISS ids of the windows of documents whose metadata equals every ``key: value`` of ``where``
        (``None`` matches null or absent)."""
        clauses, params = [], []
        for key, value in where.items():
            if '"' in key or not key:
                raise InvalidInputError(f"filter key {key!r} is not allowed: use a non-empty key without '\"'")
            path = f'$."{key}"'
            if value is None:
                clauses.append("json_extract(d.metadata, ?) IS NULL")
                params.append(path)
            elif isinstance(value, bool):
                clauses.append("json_type(d.metadata, ?) = ?")
                params += [path, "true" if value else "false"]
            else:
                clauses.append("json_extract(d.metadata, ?) = ?")
                params += [path, value]
        with self._lock:
            rows = self._db.execute(
                f"SELECT w.seq, w.window FROM windows w JOIN docs d ON d.seq = w.seq WHERE {' AND '.join(clauses)}",
                params,
            ).fetchall()
        return np.array([(s << WINDOW_BITS) + w for s, w in rows], dtype=np.int64)

    def iter_windows(self, chunk: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every window as (FAISS ids, base vectors), in chunks, from one consistent snapshot."""
        with self._lock:
            rows = self._db.execute("SELECT seq, window, vector FROM windows ORDER BY seq, window").fetchall()
        for i in range(0, len(rows), chunk):
            part = rows[i : i + chunk]
            ids = np.array([(s << WINDOW_BITS) + w for s, w, _ in part], dtype=np.int64)
            yield ids, np.stack([np.frombuffer(v, dtype=np.float32) for _, _, v in part])

    def all_documents(self) -> tuple[list[str], list[str], WindowedVectors]:
        """Every document's id and text, and every window's base vector (for exact evaluation and re-indexing)."""
        with self._lock:
            docs = self._db.execute("SELECT seq, id, text FROM docs ORDER BY seq").fetchall()
            rows = self._db.execute("SELECT seq, start, end, vector FROM windows ORDER BY seq, window").fetchall()
        position = {seq: i for i, (seq, _, _) in enumerate(docs)}
        dim = len(rows[0][3]) // 4 if rows else 0
        vectors = np.stack([np.frombuffer(r[3], np.float32) for r in rows]) if rows else np.zeros((0, dim), np.float32)
        windowed = WindowedVectors(
            vectors=vectors,
            owner=np.array([position[r[0]] for r in rows], dtype=np.int64),
            spans=[(r[1], r[2]) for r in rows],
            n_docs=len(docs),
        )
        return [d[1] for d in docs], [d[2] for d in docs], windowed

    # Re-indexing onto another base: the new windows are staged in a table of their own, batch by batch (a
    # large collection never sits in memory), then swapped in with the new fingerprint in one transaction. A
    # crash before the swap leaves the old windows and a staging table that the next re-index drops.
    def texts(self) -> list[tuple[int, str]]:
        """Every document's sequence number and text, in order."""
        with self._lock:
            return self._db.execute("SELECT seq, text FROM docs ORDER BY seq").fetchall()

    def start_staging(self) -> None:
        with self._tx() as db:
            db.execute("DROP TABLE IF EXISTS windows_staged")
            db.execute(
                "CREATE TABLE windows_staged (seq INTEGER NOT NULL, window INTEGER NOT NULL, start INTEGER NOT NULL, "
                "end INTEGER NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (seq, window)) WITHOUT ROWID"
            )

    def stage_windows(self, per_doc: Sequence[tuple[int, list[Span], np.ndarray]]) -> None:
        """Stage the new windows of some documents (by sequence number)."""
        with self._tx() as db:
            for seq, spans, vectors in per_doc:
                db.executemany(
                    "INSERT INTO windows_staged VALUES (?, ?, ?, ?, ?)",
                    [(seq, w, a, b, v.astype(np.float32).tobytes()) for w, ((a, b), v) in enumerate(zip(spans, vectors, strict=True))],
                )

    def swap_staged(self, fingerprint: str, dim: int) -> CollectionConfig:
        """Replace every window with the staged ones and record the new base, in one transaction."""
        with self._tx() as db:
            config = msgspec.json.decode(
                db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0], type=CollectionConfig
            )
            db.execute("DELETE FROM windows")
            db.execute("INSERT INTO windows SELECT * FROM windows_staged")
            db.execute("DROP TABLE windows_staged")
            new = msgspec.structs.replace(config, base_fingerprint=fingerprint, dim=dim)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)", (msgspec.json.encode(new).decode(),))
        return new


def reindex_store(
    store: DocumentStore, encoder: Encoder, *, batch: int = 256, report: Callable[[int, int], None] | None = None
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
    return store.swap_staged(encoder.fingerprint, encoder.dim), windows


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on any error) under the store's lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


# ------------------------------------------------------------------------------------------------- views
class View:
    """One FAISS index over a collection's windows: the base vectors, or an adapter's document view of them."""

    def __init__(
        self, config: CollectionConfig, transform: Callable[[np.ndarray], np.ndarray] | None, kind: Literal["flat", "hnsw"] = "flat"
    ) -> None:
        self.config = config
        self.transform = transform
        self.kind = kind
        self.index = self._empty()

    def _empty(self) -> faiss.Index:
        d = self.config.dim
        if self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(d, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.config.ef_construction
        else:
            inner = faiss.IndexFlatIP(d)
        return faiss.IndexIDMap2(inner)

    def add(self, ids: np.ndarray, base_vectors: np.ndarray, index: faiss.Index | None = None) -> None:
        if len(ids) == 0:
            return
        vectors = base_vectors if self.transform is None else self.transform(base_vectors)
        (index or self.index).add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)

    def fill(self, store: DocumentStore) -> faiss.Index:
        """A new index holding every window of ``store`` (built aside; the caller swaps it in)."""
        index = self._empty()
        for ids, vectors in store.iter_windows():
            self.add(ids, vectors, index)
        return index

    def search_params(self, selector: Any | None) -> faiss.SearchParameters | None:
        if self.kind == "hnsw":
            if selector is None:
                return faiss.SearchParametersHNSW(efSearch=self.config.ef_search)
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.config.ef_search)
        return faiss.SearchParameters(sel=selector) if selector is not None else None


# ------------------------------------------------------------------------------------------- collection
class Collection:
    """A collection's store and its FAISS views; thread-safe.

    Writes commit to SQLite first (that is the acknowledgement), then update every view under the lock.
    Searches hold the lock only for the FAISS call.
    """

    def __init__(self, directory: Path, store: DocumentStore, config: CollectionConfig) -> None:
        self.directory = directory
        self.store = store
        self.config = config
        self._lock = threading.RLock()
        self._views: dict[str, View] = {}
        self._deleted: set[int] = set()  # HNSW only: ids still in the graph but deleted
        self.kind: Literal["flat", "hnsw"] = "hnsw" if config.index == "hnsw" else "flat"
        self._rebuilding = False
        self._rebuild_log: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def load(self) -> None:
        """Build the base view from the store (at start-up)."""
        if self._outgrew_exact(self.store.count()[1]):
            self.kind = "hnsw"
        base = View(self.config, None, self.kind)
        base.index = base.fill(self.store)
        with self._lock:
            self._views = {"base": base}

    def counts(self) -> tuple[int, int]:
        return self.store.count()

    def _outgrew_exact(self, windows: int) -> bool:
        """``auto``: past ``AUTO_HNSW_WINDOWS`` windows exact search is too slow; HNSW serves instead."""
        return self.config.index == "auto" and windows >= AUTO_HNSW_WINDOWS

    def ensure_view(self, key: str, adapter: Adapter | None) -> View:
        """The view for an adapter's document transform (``key`` = its label), built from stored base vectors
        if missing. ``adapter=None`` or a query-only adapter: the base view."""
        if adapter is None or adapter.config.apply_to != "both":
            return self._views["base"]
        with self._lock:
            view = self._views.get(key)
        if view is not None:
            return view
        with self._lock:  # build under the lock so no write slips between the snapshot and the swap
            view = View(self.config, adapter.transform_document, self.kind)
            if key not in self._views:
                view.index = view.fill(self.store)
                self._views[key] = view
            return self._views[key]

    def drop_views(self, keep: set[str]) -> None:
        """Forget adapter views whose adapter is gone."""
        with self._lock:
            for key in [k for k in self._views if k != "base" and k not in keep]:
                del self._views[key]

    # writes ------------------------------------------------------------------------------------------
    def upsert(self, docs: Sequence[NewDocument]) -> None:
        for doc in docs:
            if len(doc.spans) >= MAX_WINDOWS:
                raise InvalidInputError(f"document {doc.id!r} needs {len(doc.spans)} windows > {MAX_WINDOWS - 1}; split it")
        removed, added = self.store.upsert(docs)
        with self._lock:
            self._remove(removed)
            for ids, vectors in added:
                for view in self._views.values():
                    view.add(ids, vectors)
                if self._rebuild_log is not None:
                    self._rebuild_log.append(("add", ids, vectors))
            if self.kind == "flat" and self._outgrew_exact(self._views["base"].index.ntotal):
                self._start_rebuild()  # build HNSW aside, then swap

    def delete(self, ids: Sequence[str]) -> list[str]:
        """Delete documents; returns the ids that were not in the collection."""
        removed, missing = self.store.delete(ids)
        with self._lock:
            self._remove(removed)
        return missing

    def _remove(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if self._rebuild_log is not None:
            self._rebuild_log.append(("delete", ids, None))
        if self.kind == "hnsw":
            self._deleted.update(ids.tolist())
            total = self._views["base"].index.ntotal
            if len(self._deleted) >= max(REBUILD_MIN, REBUILD_FRACTION * total):
                self._start_rebuild()
        else:
            for view in self._views.values():
                view.index.remove_ids(ids)

    def _start_rebuild(self) -> None:
        """Rebuild every view as HNSW in a background thread (compacting deleted ids, or converting an
        ``auto`` collection from exact search); searches go on against the current views meanwhile."""
        if self._rebuilding:
            return
        self._rebuilding = True
        self._rebuild_log = []
        threading.Thread(target=self._rebuild, name=f"rebuild-{self.name}", daemon=True).start()

    def _rebuild(self) -> None:
        """Build fresh HNSW views off the lock; replay writes made meanwhile, then swap them all at once."""
        try:
            with self._lock:
                views = dict(self._views)
            fresh = {key: View(self.config, view.transform, "hnsw") for key, view in views.items()}
            for view in fresh.values():
                view.index = view.fill(self.store)
            with self._lock:
                deleted: set[int] = set()
                for op, ids, vectors in self._rebuild_log or []:
                    if op == "add":
                        for view in fresh.values():
                            view.add(ids, vectors)  # type: ignore[arg-type]
                    else:
                        deleted.update(ids.tolist())
                # A view added during the rebuild (a new adapter) is dropped and rebuilt on first use.
                self._views = fresh
                self._deleted = deleted
                converted, self.kind = self.kind == "flat", "hnsw"
            logger.info("collection %s: %s", self.name, "converted to HNSW" if converted else "HNSW rebuilt without deleted ids")
        except Exception:
            logger.exception("collection %s: HNSW rebuild failed; deleted ids stay filtered", self.name)
        finally:
            with self._lock:
                self._rebuilding = False
                self._rebuild_log = None

    # search ------------------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, key: str = "base", adapter: Adapter | None = None, where: Filter | None = None
    ) -> list[list[Hit]]:
        """Top ``k`` documents per query (one hit per document: its best window), scores descending.

        ``key``/``adapter`` name the view (see ``ensure_view``); it is looked up under the lock, so a search
        never runs against a view a background rebuild has just replaced.
        """
        selector = self._selector(where)
        if selector is False:
            return [[] for _ in range(len(queries))]
        q = np.ascontiguousarray(queries, dtype=np.float32)
        best: list[dict[int, tuple[float, int]]] = []
        with self._lock:
            view = self.ensure_view(key, adapter)
            total = view.index.ntotal
            want = min(total, max(2 * k, k + 16))
            params = view.search_params(selector)
            while True:
                if total == 0:
                    best = [{} for _ in range(len(q))]
                    break
                scores, ids = view.index.search(q, want, params=params)
                best = [_best_per_document(s, i, k) for s, i in zip(scores, ids, strict=True)]
                if want >= total or all(len(b) >= k for b in best):
                    break
                want = min(total, want * 4)
        return self._hits(best, k)

    def _selector(self, where: Filter | None) -> Any:
        deleted = None
        if self._deleted:
            deleted = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._deleted, np.int64)))
        if not where:
            return deleted
        ids = self.store.filtered_ids(where)
        if len(ids) == 0:
            return False
        allowed = faiss.IDSelectorBatch(ids)
        allowed.referenced_ids = ids  # keep the array alive as long as the selector
        return faiss.IDSelectorAnd(allowed, deleted) if deleted is not None else allowed

    def _hits(self, best: list[dict[int, tuple[float, int]]], k: int) -> list[list[Hit]]:
        seqs = sorted({seq for b in best for seq in b})
        docs = self.store.documents_by_seq(seqs)
        spans = self.store.spans([(seq, w) for b in best for seq, (_, w) in b.items()])
        out = []
        for b in best:
            ranked = sorted(b.items(), key=lambda item: (-item[1][0], docs[item[0]][0]))[:k]
            out.append(
                [
                    Hit(id=docs[seq][0], score=score, text=docs[seq][1], metadata=docs[seq][2], span=spans[(seq, w)], window=w)
                    for seq, (score, w) in ranked
                    if seq in docs  # deleted between the FAISS call and this lookup
                ]
            )
        return out


def _best_per_document(scores: np.ndarray, ids: np.ndarray, k: int) -> dict[int, tuple[float, int]]:
    """From one query's window hits (descending), each document's best window: ``{seq: (score, window)}``."""
    best: dict[int, tuple[float, int]] = {}
    for score, fid in zip(scores.tolist(), ids.tolist(), strict=True):
        if fid < 0:
            break
        seq, window = fid >> WINDOW_BITS, fid & (MAX_WINDOWS - 1)
        if seq not in best:
            best[seq] = (score, window)
    return best


# ---------------------------------------------------------------------------------------------- manager
class CollectionManager:
    """Every collection under ``<data_dir>/collections``; create and delete are atomic directory renames."""

    def __init__(self, root: Path, fingerprint: str, dim: int) -> None:
        self.root = root
        self.fingerprint = fingerprint
        self.dim = dim
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._mismatched: dict[str, CollectionConfig] = {}
        self._damaged: dict[str, str] = {}  # name -> what is wrong, naming the file
        self._reindexing: dict[str, str] = {}  # name -> id of the job re-indexing it onto this base

    def load_all(self) -> None:
        """Open every collection and build its base index; remove leftovers of interrupted creates/deletes."""
        self.root.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.root.iterdir()):
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)  # an interrupted create or delete
                continue
            if not (path / STORE_FILE).is_file():
                continue
            try:
                store = DocumentStore(path / STORE_FILE)
                store.check()
                config = store.read_config()
            except (sqlite3.DatabaseError, msgspec.DecodeError, InvalidInputError) as exc:
                self._set_damaged(path.name, path / STORE_FILE, exc)
                continue
            if config.base_fingerprint != self.fingerprint:
                logger.warning("collection %s was built with base %s, not %s", config.name, config.base_fingerprint, self.fingerprint)
                self._mismatched[config.name] = config
                store.close()
                continue
            collection = Collection(path, store, config)
            try:
                collection.load()  # the FAISS views are derived: rebuilt from the store's base vectors
            except (sqlite3.DatabaseError, ValueError) as exc:
                store.close()
                self._set_damaged(path.name, path / STORE_FILE, exc)
                continue
            self._collections[config.name] = collection

    def _set_damaged(self, name: str, file: Path, exc: Exception) -> None:
        """A store that fails SQLite's check or cannot be read: the other collections still serve; this one
        answers 503 naming the file until it is restored from a backup or deleted."""
        problem = f"its store {file} is damaged ({exc}); restore the file from a backup, or delete the collection"
        logger.error("collection %s: %s", name, problem)
        self._damaged[name] = problem

    def damaged(self) -> dict[str, str]:
        with self._lock:
            return dict(self._damaged)

    def names(self) -> list[str]:
        with self._lock:
            return sorted([*self._collections, *self._mismatched, *self._damaged])

    def get(self, name: str) -> Collection:
        with self._lock:
            if name in self._damaged:
                raise UnavailableError(f"collection {name!r} cannot be served: {self._damaged[name]} (DELETE /collections/{name})")
            if name in self._reindexing:
                job = self._reindexing[name]
                raise ConflictError(f"collection {name!r} is being re-indexed onto this server's base (GET /jobs/{job}); retry when it is done")
            if name in self._mismatched:
                config = self._mismatched[name]
                raise ConflictError(
                    f"collection {name!r} was built with base {config.base_fingerprint} but this server runs "
                    f"{self.fingerprint}; re-index it onto this base: POST /collections/{name}/reindex (or, with the "
                    f"server stopped, embedlift reindex {name} --data-dir {self.root.parent} [--base B])"
                )
            try:
                return self._collections[name]
            except KeyError:
                raise NotFoundError(
                    f"unknown collection {name!r}; existing: {sorted(self._collections)}; create it with PUT /collections/{name}"
                ) from None

    def mismatched(self) -> dict[str, CollectionConfig]:
        with self._lock:
            return dict(self._mismatched)

    def reindexing(self) -> dict[str, str]:
        """Collections being re-indexed, with the id of the job doing it."""
        with self._lock:
            return dict(self._reindexing)

    def claim_reindex(self, name: str) -> Path:
        """Mark a collection built with another base as being re-indexed; its store's path.

        Raises:
            NotFoundError, UnavailableError (damaged), ConflictError (already on this base, or already being
            re-indexed).
        """
        with self._lock:
            if name in self._damaged:
                raise UnavailableError(f"collection {name!r} cannot be re-indexed: {self._damaged[name]}")
            if name in self._reindexing:
                raise ConflictError(f"collection {name!r} is already being re-indexed (GET /jobs/{self._reindexing[name]})")
            if name in self._collections:
                raise ConflictError(f"collection {name!r} is already on this server's base ({self.fingerprint}); nothing to re-index")
            if name not in self._mismatched:
                raise NotFoundError(f"unknown collection {name!r}; existing: {sorted([*self._collections, *self._mismatched])}")
            self._reindexing[name] = ""
            return self.root / name / STORE_FILE

    def note_reindex_job(self, name: str, job_id: str) -> None:
        with self._lock:
            if name in self._reindexing:
                self._reindexing[name] = job_id

    def finish_reindex(self, name: str) -> Collection:
        """Serve a collection whose re-index has committed: build its index, then make it visible in one step."""
        path = self.root / name
        store = DocumentStore(path / STORE_FILE)
        collection = Collection(path, store, store.read_config())
        collection.load()
        with self._lock:
            self._mismatched.pop(name, None)
            self._reindexing.pop(name, None)
            self._collections[name] = collection
        return collection

    def abandon_reindex(self, name: str) -> None:
        """A failed re-index: the collection stays as it was (built with the other base)."""
        with self._lock:
            self._reindexing.pop(name, None)

    def create(self, name: str, index: IndexKind = "auto", *, hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 200) -> tuple[Collection, bool]:
        """Create a collection (built in a hidden directory, then renamed into place). Creating one that
        exists with the same settings is a no-op (``False``); with other settings, a conflict."""
        check_name(name)
        config = CollectionConfig(
            name=name, base_fingerprint=self.fingerprint, dim=self.dim, index=index, hnsw_m=hnsw_m,
            ef_construction=ef_construction, ef_search=ef_search, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        with self._lock:
            if name in self._mismatched:
                raise ConflictError(f"collection {name!r} exists, built with another base; re-index or delete it first")
            if existing := self._collections.get(name):
                same = msgspec.structs.replace(existing.config, created="") == msgspec.structs.replace(config, created="")
                if same:
                    return existing, False
                raise ConflictError(
                    f"collection {name!r} exists with other settings (index={existing.config.index}); delete it first to change them"
                )
            tmp = self.root / f".new-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            store = DocumentStore(tmp / STORE_FILE)
            store.write_config(config)
            store.close()
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(self.root / name)
            store = DocumentStore(self.root / name / STORE_FILE)
            collection = Collection(self.root / name, store, config)
            collection.load()
            self._collections[name] = collection
            return collection, True

    def delete(self, name: str) -> None:
        """Rename the directory aside (atomic), then remove it."""
        with self._lock:
            if name in self._reindexing:
                raise ConflictError(f"collection {name!r} is being re-indexed (GET /jobs/{self._reindexing[name]}); delete it when the job is done")
            collection = self._collections.pop(name, None)
            config = self._mismatched.pop(name, None)
            damaged = self._damaged.pop(name, None)
            if collection is None and config is None and damaged is None:
                raise NotFoundError(f"unknown collection {name!r}; existing: {sorted(self._collections)}")
            if collection is not None:
                collection.store.close()
            trash = self.root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
            (self.root / name).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def all(self) -> list[Collection]:
        with self._lock:
            return list(self._collections.values())

    def close(self) -> None:
        with self._lock:
            for c in self._collections.values():
                c.store.close()
