"""The embedded collection store: one SQLite file per collection (WAL journal, ``synchronous=FULL``).

Each document's id, text and metadata, the base vector of every window and its lexical postings (length, term
ids and frequencies, as little-endian arrays: the in-memory index loads them without a Python loop per
posting), written one transaction per call: an acknowledged upsert or delete survives a crash, and a crash
mid-write leaves the last committed state. Document keys are SQLite ``AUTOINCREMENT`` row numbers (``seq``),
never reused. Term ids come from the ``terms`` table; ids assigned in a transaction that rolls back are
forgotten with it.
"""

from __future__ import annotations

import contextlib
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
    Postings,
    WindowTerms,
    window_keys,
)
from embedlift.service.collections.filters import parse, to_sql
from embedlift.service.schemas import StoredDocument

STORE_FILE = "collection.sqlite3"
MAX_FILTER_PARAMETERS = 30_000  # SQLite binds at most 32766 parameters per statement


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
            CREATE TABLE IF NOT EXISTS terms (id INTEGER PRIMARY KEY, term TEXT NOT NULL UNIQUE);
            CREATE TABLE IF NOT EXISTS postings (
                seq INTEGER NOT NULL REFERENCES docs(seq) ON DELETE CASCADE,
                window INTEGER NOT NULL,
                length INTEGER NOT NULL,
                term_ids BLOB NOT NULL,
                tfs BLOB NOT NULL,
                PRIMARY KEY (seq, window)
            ) WITHOUT ROWID;
            """
        )
        self._vocabulary: dict[str, int] = dict(self._db.execute("SELECT term, id FROM terms"))

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
        postings: list[Postings] = []
        with self._tx() as db, self._new_terms() as new_terms:
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
                if doc.terms is not None:
                    postings.append(self._write_postings(db, "postings", seq, doc.terms, new_terms))
        return Changes(removed=_concat(removed), added=added, postings=Postings.concat(postings) if postings else None)

    # postings ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _new_terms(self) -> Iterator[dict[str, int]]:
        """Terms given ids in the enclosing transaction: known to the vocabulary once it committed."""
        new: dict[str, int] = {}
        yield new
        self._vocabulary.update(new)

    def _term_ids(self, db: sqlite3.Connection, terms: Sequence[str], new: dict[str, int]) -> np.ndarray:
        known = self._vocabulary.get
        ids = [known(term, -1) for term in terms]  # the common case: every term known
        if -1 in ids:
            for i, term in enumerate(terms):
                if ids[i] == -1:
                    if (found := new.get(term)) is None:
                        found = new[term] = db.execute("INSERT INTO terms (term) VALUES (?) RETURNING id", (term,)).fetchone()[0]
                    ids[i] = found
        return np.asarray(ids, dtype=np.int64)

    def _write_postings(self, db: sqlite3.Connection, table: str, seq: int, windows: Sequence[WindowTerms], new: dict[str, int]) -> Postings:
        keys = window_keys(seq, len(windows))
        rows, window_of, term_ids, tfs = [], [], [], []
        for w, terms in enumerate(windows):
            ids = self._term_ids(db, list(terms.counts), new)
            counts = np.fromiter(terms.counts.values(), dtype=np.uint16, count=len(terms.counts))
            rows.append((seq, w, terms.length, ids.astype("<i4").tobytes(), counts.astype("<u2").tobytes()))
            window_of.append(np.full(len(ids), w, dtype=np.int64))
            term_ids.append(ids)
            tfs.append(counts.astype(np.float32))
        db.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?)", rows)
        return Postings(
            keys=keys, lengths=np.asarray([t.length for t in windows], dtype=np.float32),
            window_of=np.concatenate(window_of) if window_of else np.zeros(0, np.int64),
            term_ids=np.concatenate(term_ids) if term_ids else np.zeros(0, np.int64),
            tfs=np.concatenate(tfs) if tfs else np.zeros(0, np.float32),
        )

    def vocabulary(self) -> dict[str, int]:
        return self._vocabulary

    def iter_postings(self, chunk: int = 20_000) -> Iterator[Postings]:
        with self._lock:
            rows = self._db.execute("SELECT seq, window, length, term_ids, tfs FROM postings ORDER BY seq, window").fetchall()
        for i in range(0, len(rows), chunk):
            part = rows[i : i + chunk]
            ids = [np.frombuffer(r[3], dtype="<i4") for r in part]
            yield Postings(
                keys=np.array([(r[0] << WINDOW_BITS) + r[1] for r in part], dtype=np.int64),
                lengths=np.array([r[2] for r in part], dtype=np.float32),
                window_of=np.repeat(np.arange(len(part), dtype=np.int64), [len(x) for x in ids]),
                term_ids=np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64),
                tfs=np.concatenate([np.frombuffer(r[4], dtype="<u2") for r in part]).astype(np.float32) if part else np.zeros(0, np.float32),
            )

    def postings_state(self) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'postings'").fetchone()
        return None if row is None else str(row[0])

    def mark_postings(self, analyzer: str | None) -> None:
        with self._tx() as db:
            if analyzer is None:
                db.execute("DELETE FROM postings")
                db.execute("DELETE FROM meta WHERE key = 'postings'")
            else:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('postings', ?)", (analyzer,))

    def missing_postings(self, limit: int) -> list[tuple[int, str, list[Span]]]:
        with self._lock:
            docs = self._db.execute(
                "SELECT seq, text FROM docs d WHERE NOT EXISTS (SELECT 1 FROM postings p WHERE p.seq = d.seq) ORDER BY seq LIMIT ?",
                (min(limit, 500),),
            ).fetchall()
            marks = ",".join("?" * len(docs))
            rows = self._db.execute(
                f"SELECT seq, start, end FROM windows WHERE seq IN ({marks}) ORDER BY seq, window", [seq for seq, _ in docs]
            ).fetchall() if docs else []
        spans: dict[int, list[Span]] = {seq: [] for seq, _ in docs}
        for seq, a, b in rows:
            spans[seq].append((a, b))
        return [(seq, text, spans[seq]) for seq, text in docs]

    def add_postings(self, per_doc: Sequence[tuple[int, list[WindowTerms]]]) -> Postings:
        written: list[Postings] = []
        with self._tx() as db, self._new_terms() as new_terms:
            present = {r[0] for r in db.execute(
                f"SELECT seq FROM docs WHERE seq IN ({','.join('?' * len(per_doc))})", [seq for seq, _ in per_doc]
            )} if per_doc else set()
            for seq, windows in per_doc:
                if seq in present:  # a document deleted or replaced since it was read gets no postings
                    written.append(self._write_postings(db, "postings", seq, windows, new_terms))
        return Postings.concat(written)

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
        """Window keys of documents whose metadata passes ``where`` (``filters.py``'s operators)."""
        clause, params = to_sql(parse(where))
        if len(params) > MAX_FILTER_PARAMETERS:
            raise InvalidInputError(f"the filter is too large ({len(params)} values > {MAX_FILTER_PARAMETERS} after compiling); split it")
        with self._lock:
            rows = self._db.execute(f"SELECT w.seq, w.window FROM windows w JOIN docs d ON d.seq = w.seq WHERE {clause}", params).fetchall()
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

    def export(self, chunk: int = 500) -> Iterator[list[NewDocument]]:
        """Every document as it is stored (text, metadata, window spans, base vectors and, where it has them,
        its windows' terms), in chunks, from one consistent snapshot: what ``embedlift store copy`` moves to
        another store without re-embedding anything."""
        names = {i: t for t, i in self._vocabulary.items()}
        with self._lock:
            self._db.execute("BEGIN")
            try:
                docs = self._db.execute("SELECT seq, id, text, metadata FROM docs ORDER BY seq").fetchall()
                windows = self._db.execute("SELECT seq, start, end, vector FROM windows ORDER BY seq, window").fetchall()
                postings = self._db.execute("SELECT seq, window, length, term_ids, tfs FROM postings ORDER BY seq, window").fetchall()
                names.update({i: t for i, t in self._db.execute("SELECT id, term FROM terms")})
            finally:
                self._db.execute("COMMIT")
        spans: dict[int, list[Span]] = {}
        vectors: dict[int, list[np.ndarray]] = {}
        for seq, a, b, v in windows:
            spans.setdefault(seq, []).append((a, b))
            vectors.setdefault(seq, []).append(np.frombuffer(v, dtype=np.float32))
        terms: dict[int, list[WindowTerms]] = {}
        for seq, _, length, ids, tfs in postings:
            counts = dict(zip((names[int(i)] for i in np.frombuffer(ids, dtype="<i4")), np.frombuffer(tfs, dtype="<u2").tolist(), strict=True))
            terms.setdefault(seq, []).append(WindowTerms(length=length, counts=counts))
        for i in range(0, len(docs), chunk):
            yield [
                NewDocument(
                    id=doc_id, text=text, metadata=json.loads(meta), spans=spans.get(seq, []),
                    vectors=np.stack(vectors[seq]) if seq in vectors else np.zeros((0, 0), np.float32),
                    terms=_complete(terms.get(seq), len(spans.get(seq, []))),
                )
                for seq, doc_id, text, meta in docs[i : i + chunk]
            ]

    def start_staging(self) -> None:
        with self._tx() as db:
            db.execute("DROP TABLE IF EXISTS windows_staged")
            db.execute("DROP TABLE IF EXISTS postings_staged")
            db.execute(
                "CREATE TABLE windows_staged (seq INTEGER NOT NULL, window INTEGER NOT NULL, start INTEGER NOT NULL, "
                "end INTEGER NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (seq, window)) WITHOUT ROWID"
            )
            db.execute(
                "CREATE TABLE postings_staged (seq INTEGER NOT NULL, window INTEGER NOT NULL, length INTEGER NOT NULL, "
                "term_ids BLOB NOT NULL, tfs BLOB NOT NULL, PRIMARY KEY (seq, window)) WITHOUT ROWID"
            )

    def stage_windows(self, per_doc: Sequence[tuple[int, list[Span], np.ndarray, list[WindowTerms] | None]]) -> None:
        with self._tx() as db, self._new_terms() as new_terms:
            for seq, spans, vectors, terms in per_doc:
                db.executemany(
                    "INSERT INTO windows_staged VALUES (?, ?, ?, ?, ?)",
                    [(seq, w, a, b, v.astype(np.float32).tobytes()) for w, ((a, b), v) in enumerate(zip(spans, vectors, strict=True))],
                )
                if terms is not None:
                    self._write_postings(db, "postings_staged", seq, terms, new_terms)

    def swap_staged(self, fingerprint: str, dim: int, base: BaseSpec | None = None) -> CollectionConfig:
        with self._tx() as db:
            config = msgspec.json.decode(
                db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0], type=CollectionConfig
            )
            db.execute("DELETE FROM windows")
            db.execute("INSERT INTO windows SELECT * FROM windows_staged")
            db.execute("DROP TABLE windows_staged")
            db.execute("DELETE FROM postings")  # the new base's windows have their own spans, so their own postings
            db.execute("INSERT INTO postings SELECT * FROM postings_staged")
            db.execute("DROP TABLE postings_staged")
            new = msgspec.structs.replace(config, base_fingerprint=fingerprint, dim=dim, base=base)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)", (msgspec.json.encode(new).decode(),))
        return new


def _complete(terms: list[WindowTerms] | None, windows: int) -> list[WindowTerms] | None:
    """A document's postings when every window has them (else none: the target builds them)."""
    return terms if terms is not None and len(terms) == windows else None


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
