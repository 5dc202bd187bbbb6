"""The embedded collection store: one SQLite file per collection (WAL journal, ``synchronous=FULL``).

Each document's id, text and metadata, and the base vector of every window, written one transaction per call:
an acknowledged upsert or delete survives a crash, and a crash mid-write leaves the last committed state.
Document keys are SQLite ``AUTOINCREMENT`` row numbers (``seq``), never reused.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from embedlift.models.errors import InvalidInputError
from embedlift.models.spec import BaseSpec
from embedlift.models.windows import Span, WindowedVectors
from embedlift.service.collections.base import (
    WINDOW_BITS,
    Changes,
    CollectionConfig,
    CollectionStore,
    Filter,
    Metadata,
    NewDocument,
    window_keys,
)
from embedlift.service.schemas import StoredDocument

STORE_FILE = "collection.sqlite3"


class SQLiteStore(CollectionStore):
    """One collection's SQLite file. Every public method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
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
        """SQLite's own consistency check (pages, indexes, free lists)."""
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
        with self._lock:
            docs = self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
            windows = self._db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
        return docs, windows

    def _remove(self, db: sqlite3.Connection, doc_id: str) -> np.ndarray | None:
        """Delete one document (its windows cascade); the keys its windows had, or ``None`` when absent."""
        old = db.execute("SELECT seq FROM docs WHERE id = ?", (doc_id,)).fetchone()
        if old is None:
            return None
        n_old = db.execute("SELECT COUNT(*) FROM windows WHERE seq = ?", old).fetchone()[0]
        db.execute("DELETE FROM docs WHERE seq = ?", old)
        return window_keys(old[0], n_old)

    def upsert(self, docs: Sequence[NewDocument]) -> Changes:
        removed: list[np.ndarray] = []
        added: list[tuple[np.ndarray, np.ndarray]] = []
        with self._tx() as db:
            for doc in docs:
                if (old := self._remove(db, doc.id)) is not None:
                    removed.append(old)
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
                added.append((window_keys(seq, len(doc.spans)), doc.vectors))
        return Changes(removed=_concat(removed), added=added)

    def delete(self, ids: Sequence[str]) -> tuple[Changes, list[str]]:
        removed, missing = [], []
        with self._tx() as db:
            for doc_id in ids:
                if (old := self._remove(db, doc_id)) is None:
                    missing.append(doc_id)
                else:
                    removed.append(old)
        return Changes(removed=_concat(removed)), missing

    def get(self, doc_id: str) -> StoredDocument | None:
        with self._lock:
            row = self._db.execute(
                "SELECT d.id, d.text, d.metadata, (SELECT COUNT(*) FROM windows w WHERE w.seq = d.seq)"
                " FROM docs d WHERE d.id = ?",
                (doc_id,),
            ).fetchone()
        return None if row is None else StoredDocument(id=row[0], text=row[1], metadata=json.loads(row[2]), windows=row[3])

    def documents(self, keys: Sequence[int]) -> dict[int, tuple[str, str, Metadata]]:
        out: dict[int, tuple[str, str, Metadata]] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
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

    def matching(self, where: Filter) -> np.ndarray:
        """Window keys of documents whose metadata equals every ``key: value`` of ``where`` (``None`` matches
        null or absent)."""
        clauses: list[str] = []
        params: list[Any] = []
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
        with self._lock:
            rows = self._db.execute("SELECT seq, window, vector FROM windows ORDER BY seq, window").fetchall()
        for i in range(0, len(rows), chunk):
            part = rows[i : i + chunk]
            keys = np.array([(s << WINDOW_BITS) + w for s, w, _ in part], dtype=np.int64)
            yield keys, np.stack([np.frombuffer(v, dtype=np.float32) for _, _, v in part])

    def all_documents(self) -> tuple[list[str], list[str], WindowedVectors]:
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

    def texts(self) -> list[tuple[int, str]]:
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
        with self._tx() as db:
            for seq, spans, vectors in per_doc:
                db.executemany(
                    "INSERT INTO windows_staged VALUES (?, ?, ?, ?, ?)",
                    [(seq, w, a, b, v.astype(np.float32).tobytes()) for w, ((a, b), v) in enumerate(zip(spans, vectors, strict=True))],
                )

    def swap_staged(self, fingerprint: str, dim: int, base: BaseSpec | None = None) -> CollectionConfig:
        with self._tx() as db:
            config = msgspec.json.decode(
                db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0], type=CollectionConfig
            )
            db.execute("DELETE FROM windows")
            db.execute("INSERT INTO windows SELECT * FROM windows_staged")
            db.execute("DROP TABLE windows_staged")
            new = msgspec.structs.replace(config, base_fingerprint=fingerprint, dim=dim, base=base)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)", (msgspec.json.encode(new).decode(),))
        return new


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


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
