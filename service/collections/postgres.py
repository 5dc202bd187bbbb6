"""Collections in PostgreSQL with pgvector: the store every replica shares (``--store postgresql://...``).

Each collection is a row of ``embedlift.collections`` (its config, counts, lexical statistics and the
generation of its last write) and tables of its own, named by its id (so a name never reaches SQL, and a
deleted then re-created name is new):

- ``c<id>_docs``: ``seq`` (the document key, from one sequence, never reused), id, text, metadata (JSONB, with
  a GIN index: equality and ``$exists`` filters are containment and key tests it serves).
- ``c<id>_windows``: the window key (``seq << 16 | window``), span, length in terms, and the base vector as
  ``vector(d)``. Dense search runs in SQL: exact (a sequential scan) for ``index: flat`` and for ``auto`` below
  ``AUTO_HNSW_WINDOWS``, on pgvector's HNSW index otherwise (built once, from what is there, by the write that
  takes an ``auto`` collection past the threshold); with a filter, ``hnsw.iterative_scan`` keeps scanning the
  graph until ``k`` documents pass it; one hit per document is kept in SQL.
- ``c<id>_postings``: ``(term, window key, tf, length)``, the lexical index's source of truth.

Every write is one transaction that first locks the collection's row (writes to one collection are serialised
across replicas), records itself in ``embedlift.changes`` (the window keys it removed, the documents it added)
and is acknowledged after commit. The lexical index is BM25 in each replica's memory (the embedded store's
``MemoryLexicalIndex``: scoring all of a common term's postings in SQL measured 50x slower at 100k windows),
which follows the write log before every search, so a write through one replica is searched through every
other at once. An ``apply_to: both`` adapter's document view is a table of the collection (``c<id>_v<view>``,
``PostgresView``), built as a job, kept current from the same log, dropped with its adapter.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec
import numpy as np

from embedlift.models.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError
from embedlift.models.lexical import Analyzer
from embedlift.models.spec import BaseSpec
from embedlift.models.windows import Span, WindowedVectors
from embedlift.service.collections.base import (
    WINDOW_BITS,
    Candidates,
    Changes,
    CollectionConfig,
    CollectionIndex,
    CollectionStore,
    Filter,
    LexicalIndex,
    Metadata,
    NewDocument,
    Postings,
    Selection,
    WindowTerms,
    window_keys,
)
from embedlift.service.collections.faiss_index import AUTO_HNSW_WINDOWS, Transform  # the same threshold on both stores
from embedlift.service.collections.lexical_index import MemoryLexicalIndex
from embedlift.service.collections.filters import NUL, nul_in, parse, to_postgres
from embedlift.service.database import SCHEMA, Database
from embedlift.service.schemas import StoredDocument

logger = logging.getLogger(__name__)
MASK = (1 << WINDOW_BITS) - 1
#: pgvector's HNSW needs a longer candidate list than FAISS's for the same recall: at 100k windows of the
#: benchmark's corpus, recall@10 (one hit per document) was 0.905 at ef_search 128, 0.944 at 200, 0.983 at 400
#: (2.6 ms per query), 0.995 at 800 (4.1 ms). A collection's ef_search is raised to this on PostgreSQL.
PGVECTOR_MIN_EF_SEARCH = 400
#: pgvector 0.8's bounds (its ``hnsw`` index options and ``hnsw.ef_search``), narrower than FAISS's and the API's.
PGVECTOR_M = (2, 100)
PGVECTOR_EF_CONSTRUCTION = (4, 1000)
PGVECTOR_MAX_EF_SEARCH = 1000
#: pgvector's HNSW takes ``vector`` up to 2,000 dimensions and ``halfvec`` up to 4,000. A wider base (OpenAI's
#: text-embedding-3-large has 3,072) is indexed by its vectors cast to half precision, which orders the candidates;
#: their scores are still the float32 vectors'. Past 4,000 a collection searches exactly (``flat``).
PGVECTOR_HNSW_DIM = 2000
PGVECTOR_HALFVEC_HNSW_DIM = 4000
#: Writes kept in ``embedlift.changes`` per collection; a replica further behind reloads its indexes.
KEEP_CHANGES = 10_000


def _array(value: Any) -> np.ndarray:
    """A ``vector`` value as float32 (pgvector returns numpy arrays, or ``Vector`` from a binary cursor)."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, np.float32)


def _tables(cid: int) -> dict[str, str]:
    return {t: f"{SCHEMA}.c{cid}_{t}" for t in ("docs", "windows", "postings", "windows_staged", "postings_staged")}


def _view_table(cid: int, view: int) -> str:
    """The table of an ``apply_to: both`` adapter's view (``PostgresView``)."""
    return f"{SCHEMA}.c{cid}_v{int(view)}"


def _no_nul(doc: NewDocument) -> None:
    """PostgreSQL text and JSONB cannot hold U+0000. Requests are refused it at the edge on every store
    (``limits.check_documents``); this guards the other ways in (``store-copy`` from a collection written
    before that rule). So no stored id holds it, and reads by such an id find nothing without asking the
    database, which cannot take it as a parameter either."""
    if (where := nul_in(doc.id, doc.text, doc.metadata)) is not None:
        raise InvalidInputError(f"document {doc.id!r}: its {where} contains the character U+0000, which PostgreSQL cannot store; remove it")


class PostgresHome:
    """The collections of one database (``CollectionManager``'s home when ``--store`` is set)."""

    shared = True

    def __init__(self, db: Database) -> None:
        self.db = db
        self.where = db.where

    def tidy(self) -> None:
        """Nothing to tidy: a create or delete is one transaction."""

    def where_of(self, name: str) -> str:
        return f"{self.where} (collection {name!r})"

    def names(self) -> list[str]:
        with self.db.transaction() as conn:
            return [r[0] for r in conn.execute(f"SELECT name FROM {SCHEMA}.collections ORDER BY name")]

    def token(self, name: str) -> tuple[int, int] | None:
        """``(id, version)`` of the collection now (``None``: there is none): what a replica compares to know
        that another one deleted, re-created, re-indexed or re-analysed it."""
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT id, version FROM {SCHEMA}.collections WHERE name = %s", (name,)).fetchone()
        return None if row is None else (row[0], row[1])

    def open(self, name: str) -> PostgresStore:
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT id FROM {SCHEMA}.collections WHERE name = %s", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown collection {name!r}")
        return PostgresStore(self.db, row[0], name)

    def create(self, config: CollectionConfig, postings: str | None) -> None:
        """The collection's row and tables in one transaction (a concurrent create of the same name loses
        with a conflict)."""
        import psycopg

        _check_hnsw_settings(config)
        try:
            with self.db.transaction() as conn:
                cid = conn.execute(
                    f"INSERT INTO {SCHEMA}.collections (name, config, postings) VALUES (%s, %s, %s) RETURNING id",
                    (config.name, msgspec.json.encode(config).decode(), postings),
                ).fetchone()[0]
                t = _tables(cid)
                conn.execute(f"""
                    CREATE TABLE {t['docs']} (
                        seq bigint PRIMARY KEY DEFAULT nextval('{SCHEMA}.document_keys'),
                        id text NOT NULL UNIQUE, text text NOT NULL, metadata jsonb NOT NULL);
                    CREATE INDEX ON {t['docs']} USING gin (metadata);
                    CREATE TABLE {t['windows']} (
                        key bigint PRIMARY KEY, seq bigint NOT NULL REFERENCES {t['docs']} (seq) ON DELETE CASCADE,
                        start integer NOT NULL, "end" integer NOT NULL, terms integer, embedding vector({int(config.dim)}) NOT NULL);
                    CREATE INDEX ON {t['windows']} (seq);
                    CREATE TABLE {t['postings']} (
                        term text NOT NULL, key bigint NOT NULL REFERENCES {t['windows']} (key) ON DELETE CASCADE,
                        tf real NOT NULL, length real NOT NULL, PRIMARY KEY (term, key));
                    CREATE INDEX ON {t['postings']} (key);
                """)
                if config.index == "hnsw":  # ``auto`` gets its index when it outgrows exact search (``upsert``)
                    _create_hnsw(conn, t["windows"], config)
        except psycopg.errors.UniqueViolation:
            raise ConflictError(f"collection {config.name!r} was just created by another replica; GET it") from None

    def delete(self, name: str) -> None:
        with self.db.transaction() as conn:
            views = conn.execute(
                f"SELECT v.id FROM {SCHEMA}.views v JOIN {SCHEMA}.collections c ON c.id = v.collection_id WHERE c.name = %s", (name,)
            ).fetchall()  # before the collection's row goes: its views' rows go with it
            row = conn.execute(f"DELETE FROM {SCHEMA}.collections WHERE name = %s RETURNING id", (name,)).fetchone()
            if row is None:
                return
            t = _tables(row[0])
            views = [_view_table(row[0], v) for (v,) in views]
            conn.execute(f"DROP TABLE IF EXISTS {', '.join([*views, t['postings'], t['windows'], t['docs'], t['postings_staged'], t['windows_staged']])}")


def _check_hnsw_settings(config: CollectionConfig) -> None:
    """Refuse (400, at creation) HNSW settings pgvector would reject when it builds the index (for ``auto``, at
    20,000 windows, inside a write) or searches it; a ``flat`` collection never builds one."""
    if config.index == "flat":
        return
    if config.index == "hnsw" and config.dim > PGVECTOR_HALFVEC_HNSW_DIM:
        raise InvalidInputError(
            f"collection {config.name!r}: pgvector's HNSW indexes at most {PGVECTOR_HALFVEC_HNSW_DIM} dimensions (as halfvec) and this "
            f"base has {config.dim}; create it with index flat (or auto, which stays exact here)", field="index",
        )
    m, ef_c, ef_s = int(config.hnsw_m), int(config.ef_construction), int(config.ef_search)
    if not PGVECTOR_M[0] <= m <= PGVECTOR_M[1]:
        field, why = "hnsw_m", f"hnsw_m {PGVECTOR_M[0]} to {PGVECTOR_M[1]}, got {m}"
    elif not max(PGVECTOR_EF_CONSTRUCTION[0], 2 * m) <= ef_c <= PGVECTOR_EF_CONSTRUCTION[1]:
        field, why = "ef_construction", f"ef_construction from 2 x hnsw_m ({2 * m}) to {PGVECTOR_EF_CONSTRUCTION[1]}, got {ef_c}"
    elif ef_s > PGVECTOR_MAX_EF_SEARCH:
        field, why = "ef_search", f"ef_search up to {PGVECTOR_MAX_EF_SEARCH}, got {ef_s}"
    else:
        return
    raise InvalidInputError(f"collection {config.name!r}: a PostgreSQL store's HNSW is pgvector's, which takes {why}", field=field)


def _hnsw_of(table: str) -> str:
    """The name of ``table``'s HNSW index: ``c<id>_hnsw`` for a collection's windows (as it has always been
    named), ``c<id>_v<view>_hnsw`` for a view."""
    return table.removesuffix("_windows") + "_hnsw"


def _has_hnsw(conn: Any, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (_hnsw_of(table),)).fetchone()[0]


def _hnsw_order(dim: int) -> str:
    """What HNSW search orders by (its query vector the one parameter), as the index was built (``_create_hnsw``):
    inner product of ``vector`` up to ``PGVECTOR_HNSW_DIM`` dimensions, of the ``halfvec`` casts past it."""
    if dim <= PGVECTOR_HNSW_DIM:
        return "w.embedding <#> %s"
    return f"w.embedding::halfvec({dim}) <#> %s::halfvec({dim})"


def _create_hnsw(conn: Any, table: str, config: CollectionConfig) -> None:
    """pgvector's HNSW index over ``table``'s vectors, a collection's windows or a view (built from what is
    there: much faster than row by row); none past ``PGVECTOR_HALFVEC_HNSW_DIM`` dimensions (exact search)."""
    dim = int(conn.execute("SELECT atttypmod FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'embedding'", (table,)).fetchone()[0])
    if dim > PGVECTOR_HALFVEC_HNSW_DIM:
        logger.debug("%s: %d dimensions, more than pgvector's HNSW takes: searched exactly", table, dim)
        return
    indexed = "embedding vector_ip_ops" if dim <= PGVECTOR_HNSW_DIM else f"(embedding::halfvec({dim})) halfvec_ip_ops"
    conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
    conn.execute(
        f"CREATE INDEX {_hnsw_of(table).rpartition('.')[2]} ON {table} USING hnsw ({indexed}) "
        f"WITH (m = {int(config.hnsw_m)}, ef_construction = {int(config.ef_construction)})"
    )


class PostgresStore(CollectionStore):
    """One collection's tables; every public method is one transaction on a pooled connection."""

    def __init__(self, db: Database, cid: int, name: str) -> None:
        self.db, self.cid, self.name = db, cid, name
        self.t = _tables(cid)
        self.where = f"{db.where} (collection {name!r}, tables {SCHEMA}.c{cid}_*)"
        self._vocabulary: dict[str, int] = {}

    # the collection's row ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        """A write transaction holding the collection's row lock (writes to one collection are serialised)."""
        with self.db.transaction() as conn:
            if conn.execute(f"SELECT 1 FROM {SCHEMA}.collections WHERE id = %s FOR UPDATE", (self.cid,)).fetchone() is None:
                raise NotFoundError(f"collection {self.name!r} was deleted")
            yield conn

    def _log(self, conn: Any, removed: np.ndarray | None, added: Sequence[int] | None) -> int:
        """Record a write (in its transaction): its generation, the window keys it removed and the documents
        it added (``None``, ``None``: everything may have changed); older records are pruned."""
        generation = conn.execute(
            f"UPDATE {SCHEMA}.collections SET writes = writes + 1 WHERE id = %s RETURNING writes", (self.cid,)
        ).fetchone()[0]
        conn.execute(
            f"INSERT INTO {SCHEMA}.changes (collection_id, generation, removed, added) VALUES (%s, %s, %s, %s)",
            (self.cid, generation, None if removed is None else [int(k) for k in removed], None if added is None else [int(x) for x in added]),
        )
        if generation % 1000 == 0:
            conn.execute(f"DELETE FROM {SCHEMA}.changes WHERE collection_id = %s AND generation <= %s", (self.cid, generation - KEEP_CHANGES))
        return int(generation)

    def changes_since(self, generation: int) -> tuple[int, list[tuple[np.ndarray, list[int]]] | None]:
        """``(current generation, the writes after ``generation`` in order)``; ``None`` for the writes when one of
        them changed everything or they are no longer all kept (then reload)."""
        with self.db.transaction() as conn:
            current = conn.execute(f"SELECT writes FROM {SCHEMA}.collections WHERE id = %s", (self.cid,)).fetchone()
            if current is None:
                raise NotFoundError(f"collection {self.name!r} was deleted")
            if current[0] == generation:
                return generation, []
            rows = conn.execute(
                f"SELECT generation, removed, added FROM {SCHEMA}.changes WHERE collection_id = %s AND generation > %s AND generation <= %s ORDER BY generation",
                (self.cid, generation, current[0]),
            ).fetchall()
        if len(rows) != current[0] - generation or any(r[1] is None or r[2] is None for r in rows):
            return int(current[0]), None
        return int(current[0]), [(np.array(r[1], np.int64), list(r[2])) for r in rows]

    def generation(self) -> int:
        with self.db.transaction() as conn:
            return int(conn.execute(f"SELECT writes FROM {SCHEMA}.collections WHERE id = %s", (self.cid,)).fetchone()[0])

    def windows_of(self, seqs: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, base vectors)`` of the documents ``seqs`` still present."""
        with self.db.transaction() as conn:
            rows = conn.execute(f"SELECT key, embedding FROM {self.t['windows']} WHERE seq = ANY(%s) ORDER BY key", (list(seqs),)).fetchall()
        dim = self.read_config().dim if not rows else len(_array(rows[0][1]))
        return np.array([r[0] for r in rows], np.int64), (np.stack([_array(r[1]) for r in rows]) if rows else np.zeros((0, dim), np.float32))

    def postings_of(self, seqs: Sequence[int]) -> Postings:
        """The postings of the documents ``seqs`` still present (term ids from ``vocabulary``)."""
        with self.db.transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            windows = conn.execute(
                f"SELECT key, terms FROM {self.t['windows']} WHERE seq = ANY(%s) AND terms IS NOT NULL ORDER BY key", (list(seqs),)
            ).fetchall()
            rows = conn.execute(
                f"SELECT p.key, p.term, p.tf FROM {self.t['postings']} p JOIN {self.t['windows']} w ON w.key = p.key "
                "WHERE w.seq = ANY(%s) AND w.terms IS NOT NULL ORDER BY p.key", (list(seqs),),
            ).fetchall()
        return self._postings(windows, rows)

    def _postings(self, windows: list[Any], rows: list[Any]) -> Postings:
        position = {k: i for i, (k, _) in enumerate(windows)}
        ids = self._vocabulary
        return Postings(
            keys=np.array([k for k, _ in windows], np.int64), lengths=np.array([n for _, n in windows], np.float32),
            window_of=np.array([position[k] for k, _, _ in rows], np.int64),
            term_ids=np.array([ids.setdefault(term, len(ids)) for _, term, _ in rows], np.int64),
            tfs=np.array([tf for _, _, tf in rows], np.float32),
        )

    def read_config(self) -> CollectionConfig:
        with self.db.transaction() as conn:
            return self.read_config_in(conn)

    def read_config_in(self, conn: Any) -> CollectionConfig:
        """The config, read in the caller's transaction."""
        row = conn.execute(f"SELECT config::text FROM {SCHEMA}.collections WHERE id = %s", (self.cid,)).fetchone()
        if row is None:
            raise NotFoundError(f"collection {self.name!r} was deleted")
        return msgspec.json.decode(row[0], type=CollectionConfig)

    def write_config(self, config: CollectionConfig) -> None:
        with self._write() as conn:
            conn.execute(
                f"UPDATE {SCHEMA}.collections SET config = %s, version = version + 1 WHERE id = %s",
                (msgspec.json.encode(config).decode(), self.cid),
            )

    def count(self) -> tuple[int, int]:
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT documents, windows FROM {SCHEMA}.collections WHERE id = %s", (self.cid,)).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def check(self) -> None:
        with self.db.transaction() as conn:
            conn.execute(f"SELECT 1 FROM {self.t['docs']} LIMIT 1")
            conn.execute(f"SELECT 1 FROM {self.t['windows']} LIMIT 1")

    def close(self) -> None:
        """Nothing of its own to close: the pool is the database's."""

    # writes --------------------------------------------------------------------------------------------
    def _remove(self, conn: Any, ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Delete documents by id (windows and postings cascade), updating the counts; the removed window keys
        and the ids that were not there."""
        t = self.t
        rows = conn.execute(f"SELECT seq, id FROM {t['docs']} WHERE id = ANY(%s)", ([i for i in ids if NUL not in i],)).fetchall()
        present = {r[1] for r in rows}
        if not rows:
            return np.zeros(0, np.int64), [i for i in ids if i not in present]
        seqs = [r[0] for r in rows]
        windows = conn.execute(f"SELECT key, terms FROM {t['windows']} WHERE seq = ANY(%s) ORDER BY key", (seqs,)).fetchall()
        lengths = [n for _, n in windows if n is not None]  # the windows with postings leave the lexical statistics
        conn.execute(f"DELETE FROM {t['docs']} WHERE seq = ANY(%s)", (seqs,))
        conn.execute(
            f"UPDATE {SCHEMA}.collections SET documents = documents - %s, windows = windows - %s, "
            "lexical_windows = lexical_windows - %s, lexical_length = lexical_length - %s WHERE id = %s",
            (len(seqs), len(windows), len(lengths), sum(lengths), self.cid),
        )
        return np.array([k for k, _ in windows], dtype=np.int64), [i for i in ids if i not in present]

    def upsert(self, docs: Sequence[NewDocument]) -> Changes:
        for doc in docs:
            _no_nul(doc)
        latest = list({d.id: d for d in docs}.values())  # an id given twice: the last one wins, as one by one
        t = self.t
        with self._write() as conn:
            removed, _ = self._remove(conn, [d.id for d in latest])
            rows = conn.execute(
                f"INSERT INTO {t['docs']} (id, text, metadata) SELECT * FROM unnest(%s::text[], %s::text[], %s::jsonb[]) RETURNING id, seq",
                ([d.id for d in latest], [d.text for d in latest], [json.dumps(d.metadata, ensure_ascii=False) for d in latest]),
            ).fetchall()
            seq_of = dict(rows)
            added = [(window_keys(seq_of[d.id], len(d.spans)), d.vectors) for d in latest]
            lexical = [0, 0]
            self._copy_windows(conn, t["windows"], [(seq_of[d.id], d.spans, d.vectors, d.terms) for d in latest])
            postings = [self._postings_of(keys, doc.terms) for doc, (keys, _) in zip(latest, added, strict=True) if doc.terms is not None]
            if postings:
                lexical = self._copy_postings(conn, t["postings"], postings)
            self._log(conn, removed, [seq_of[d.id] for d in latest])
            windows = conn.execute(
                f"UPDATE {SCHEMA}.collections SET documents = documents + %s, windows = windows + %s, "
                "lexical_windows = lexical_windows + %s, lexical_length = lexical_length + %s WHERE id = %s RETURNING windows, config->>'index'",
                (len(latest), sum(len(d.spans) for d in latest), lexical[0], lexical[1], self.cid),
            ).fetchone()
            if windows[1] == "auto" and windows[0] >= AUTO_HNSW_WINDOWS and not _has_hnsw(conn, t["windows"]):
                # past exact search's size: the index is built here, once, in this write's transaction (readers
                # go on meanwhile; writers to this collection wait, as they wait for any write)
                logger.info("collection %s: %d windows, building its HNSW index", self.name, windows[0])
                _create_hnsw(conn, t["windows"], self.read_config_in(conn))
        return Changes(removed=removed, added=added, postings=None)

    def _copy_windows(self, conn: Any, table: str, per_doc: Sequence[tuple[int, Sequence[Span], np.ndarray, Sequence[WindowTerms] | None]]) -> None:
        """COPY every document's windows (key, span, length in terms, base vector) into ``table``."""
        with conn.cursor().copy(f'COPY {table} (key, seq, start, "end", terms, embedding) FROM STDIN (FORMAT BINARY)') as copy:
            copy.set_types(["int8", "int8", "int4", "int4", "int4", "vector"])
            for seq, spans, vectors, terms in per_doc:
                for w, ((a, b), v) in enumerate(zip(spans, vectors, strict=True)):
                    copy.write_row(((seq << WINDOW_BITS) + w, seq, a, b, terms[w].length if terms is not None else None, np.asarray(v, np.float32)))

    def _postings_of(self, keys: np.ndarray, windows: Sequence[WindowTerms]) -> list[tuple[int, WindowTerms]]:
        return [(int(k), w) for k, w in zip(keys, windows, strict=True)]

    def _copy_postings(self, conn: Any, table: str, per_doc: list[list[tuple[int, WindowTerms]]]) -> list[int]:
        """COPY every window's postings into ``table``; ``[windows, total length]`` written."""
        windows = length = 0
        with conn.cursor().copy(f"COPY {table} (term, key, tf, length) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text", "int8", "float4", "float4"])
            for doc in per_doc:
                for key, terms in doc:
                    windows += 1
                    length += terms.length
                    for term, tf in terms.counts.items():
                        copy.write_row((term, key, float(tf), float(terms.length)))
        return [windows, length]

    def delete(self, ids: Sequence[str]) -> tuple[Changes, list[str]]:
        with self._write() as conn:
            removed, missing = self._remove(conn, ids)
            if len(removed):
                self._log(conn, removed, [])
        return Changes(removed=removed), missing

    # reads ---------------------------------------------------------------------------------------------
    def get(self, doc_id: str) -> StoredDocument | None:
        if NUL in doc_id:
            return None
        with self.db.transaction() as conn:
            row = conn.execute(
                f"SELECT d.id, d.text, d.metadata, (SELECT count(*) FROM {self.t['windows']} w WHERE w.seq = d.seq) "
                f"FROM {self.t['docs']} d WHERE d.id = %s",
                (doc_id,),
            ).fetchone()
        return None if row is None else StoredDocument(id=row[0], text=row[1], metadata=row[2], windows=row[3])

    def documents(self, keys: Sequence[int]) -> dict[int, tuple[str, str, Metadata]]:
        if not len(keys):
            return {}
        with self.db.transaction() as conn:
            rows = conn.execute(f"SELECT seq, id, text, metadata FROM {self.t['docs']} WHERE seq = ANY(%s)", ([int(k) for k in keys],))
            return {seq: (doc_id, text, meta) for seq, doc_id, text, meta in rows}

    def spans(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Span]:
        if not keys:
            return {}
        with self.db.transaction() as conn:
            rows = conn.execute(
                f'SELECT key, start, "end" FROM {self.t["windows"]} WHERE key = ANY(%s)', ([(s << WINDOW_BITS) + w for s, w in keys],)
            )
            return {(k >> WINDOW_BITS, k & MASK): (a, b) for k, a, b in rows}

    def matching(self, where: Filter) -> np.ndarray:
        clause, params = to_postgres(parse(where))
        with self.db.transaction() as conn:
            rows = conn.execute(f"SELECT w.key FROM {self.t['windows']} w JOIN {self.t['docs']} d ON d.seq = w.seq WHERE {clause}", params)
            return np.array([k for (k,) in rows], dtype=np.int64)

    def iter_windows(self, chunk: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with self.db.transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            with conn.cursor(name="windows") as cur:
                cur.itersize = chunk
                cur.execute(f"SELECT key, embedding FROM {self.t['windows']} ORDER BY key")
                while rows := cur.fetchmany(chunk):
                    yield np.array([r[0] for r in rows], np.int64), np.stack([_array(r[1]) for r in rows])

    def all_documents(self) -> tuple[list[str], list[str], WindowedVectors]:
        with self.db.transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            docs = conn.execute(f"SELECT seq, id, text FROM {self.t['docs']} ORDER BY seq").fetchall()
            rows = conn.execute(f'SELECT seq, start, "end", embedding FROM {self.t["windows"]} ORDER BY key').fetchall()
        position = {seq: i for i, (seq, _, _) in enumerate(docs)}
        dim = self.read_config().dim
        vectors = np.stack([_array(r[3]) for r in rows]) if rows else np.zeros((0, dim), np.float32)
        windowed = WindowedVectors(
            vectors=vectors, owner=np.array([position[r[0]] for r in rows], dtype=np.int64), spans=[(r[1], r[2]) for r in rows], n_docs=len(docs)
        )
        return [d[1] for d in docs], [d[2] for d in docs], windowed

    def texts(self) -> list[tuple[int, str]]:
        with self.db.transaction() as conn:
            return [(s, x) for s, x in conn.execute(f"SELECT seq, text FROM {self.t['docs']} ORDER BY seq")]

    # re-index ------------------------------------------------------------------------------------------
    def start_staging(self) -> None:
        t = self.t
        with self._write() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {t['windows_staged']}, {t['postings_staged']}")
            conn.execute(
                f'CREATE TABLE {t["windows_staged"]} (key bigint PRIMARY KEY, seq bigint NOT NULL, start integer NOT NULL, '
                f'"end" integer NOT NULL, terms integer, embedding vector NOT NULL)'
            )
            conn.execute(f"CREATE TABLE {t['postings_staged']} (term text NOT NULL, key bigint NOT NULL, tf real NOT NULL, length real NOT NULL)")

    def stage_windows(self, per_doc: Sequence[tuple[int, list[Span], np.ndarray, list[WindowTerms] | None]]) -> None:
        t = self.t
        with self.db.transaction() as conn:
            self._copy_windows(conn, t["windows_staged"], per_doc)
            postings = [self._postings_of(window_keys(seq, len(spans)), terms) for seq, spans, _, terms in per_doc if terms is not None]
            if postings:
                self._copy_postings(conn, t["postings_staged"], postings)

    def swap_staged(self, fingerprint: str, dim: int, base: BaseSpec | None = None) -> CollectionConfig:
        t = self.t
        with self._write() as conn:
            config = self.read_config_in(conn)
            conn.execute(f"DELETE FROM {t['windows']}")  # postings cascade
            if dim != config.dim:
                conn.execute(f"ALTER TABLE {t['windows']} ALTER COLUMN embedding TYPE vector({int(dim)})")
            conn.execute(f'INSERT INTO {t["windows"]} (key, seq, start, "end", terms, embedding) SELECT key, seq, start, "end", terms, embedding FROM {t["windows_staged"]} WHERE seq IN (SELECT seq FROM {t["docs"]})')
            conn.execute(f"INSERT INTO {t['postings']} SELECT p.* FROM {t['postings_staged']} p JOIN {t['windows']} w ON w.key = p.key")
            conn.execute(f"DROP TABLE {t['windows_staged']}, {t['postings_staged']}")
            self._log(conn, None, None)
            new = msgspec.structs.replace(config, base_fingerprint=fingerprint, dim=dim, base=base)
            conn.execute(
                f"UPDATE {SCHEMA}.collections c SET config = %s, version = version + 1, windows = s.n, lexical_windows = s.lexical, "
                f"lexical_length = s.length FROM (SELECT count(*) AS n, count(terms) AS lexical, coalesce(sum(terms), 0) AS length "
                f"FROM {t['windows']}) s WHERE c.id = %s",
                (msgspec.json.encode(new).decode(), self.cid),
            )
        return new

    # postings ------------------------------------------------------------------------------------------
    def vocabulary(self) -> dict[str, int]:
        """Term ids as ``iter_postings`` numbered them (this store keeps terms as text)."""
        return self._vocabulary

    def iter_postings(self, chunk: int = 20_000) -> Iterator[Postings]:
        with self.db.transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            windows = conn.execute(f"SELECT key, terms FROM {self.t['windows']} WHERE terms IS NOT NULL ORDER BY key").fetchall()
            rows = conn.execute(f"SELECT key, term, tf FROM {self.t['postings']} ORDER BY key").fetchall()
        row_keys = [r[0] for r in rows]  # both ordered by key: each chunk of windows owns one run of rows
        start = 0
        for i in range(0, len(windows), chunk):
            part = windows[i : i + chunk]
            end = bisect.bisect_right(row_keys, part[-1][0], lo=start)
            yield self._postings(part, rows[start:end])
            start = end

    def postings_state(self) -> str | None:
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT postings FROM {SCHEMA}.collections WHERE id = %s", (self.cid,)).fetchone()
        return None if row is None else row[0]

    def mark_postings(self, analyzer: str | None) -> None:
        with self._write() as conn:
            if analyzer is None:
                conn.execute(f"DELETE FROM {self.t['postings']}")
                conn.execute(f"UPDATE {self.t['windows']} SET terms = NULL WHERE terms IS NOT NULL")
                self._log(conn, None, None)
                conn.execute(f"UPDATE {SCHEMA}.collections SET lexical_windows = 0, lexical_length = 0 WHERE id = %s", (self.cid,))
            conn.execute(f"UPDATE {SCHEMA}.collections SET postings = %s, version = version + 1 WHERE id = %s", (analyzer, self.cid))

    def missing_postings(self, limit: int) -> list[tuple[int, str, list[Span]]]:
        t = self.t
        with self.db.transaction() as conn:
            docs = conn.execute(
                f"SELECT d.seq, d.text FROM {t['docs']} d WHERE EXISTS (SELECT 1 FROM {t['windows']} w WHERE w.seq = d.seq AND w.terms IS NULL) "
                "ORDER BY d.seq LIMIT %s", (min(limit, 500),),
            ).fetchall()
            rows = conn.execute(f'SELECT seq, start, "end" FROM {t["windows"]} WHERE seq = ANY(%s) ORDER BY key', ([s for s, _ in docs],)).fetchall()
        spans: dict[int, list[Span]] = {seq: [] for seq, _ in docs}
        for seq, a, b in rows:
            spans[seq].append((a, b))
        return [(seq, text, spans[seq]) for seq, text in docs]

    def add_postings(self, per_doc: Sequence[tuple[int, list[WindowTerms]]]) -> Postings:
        t = self.t
        with self._write() as conn:  # another replica building the same postings waits, then skips what it finds
            todo = {r[0] for r in conn.execute(
                f"SELECT DISTINCT seq FROM {t['windows']} WHERE seq = ANY(%s) AND terms IS NULL", ([s for s, _ in per_doc],)
            )}
            chosen = [(seq, windows) for seq, windows in per_doc if seq in todo]
            if chosen:
                conn.execute(
                    f"UPDATE {t['windows']} w SET terms = v.terms FROM unnest(%s::bigint[], %s::int[]) AS v(key, terms) WHERE w.key = v.key",
                    ([int(k) for seq, ws in chosen for k in window_keys(seq, len(ws))], [w.length for _, ws in chosen for w in ws]),
                )
                written = self._copy_postings(conn, t["postings"], [self._postings_of(window_keys(seq, len(ws)), ws) for seq, ws in chosen])
                conn.execute(
                    f"UPDATE {SCHEMA}.collections SET lexical_windows = lexical_windows + %s, lexical_length = lexical_length + %s WHERE id = %s",
                    (written[0], written[1], self.cid),
                )
                self._log(conn, np.zeros(0, np.int64), [seq for seq, _ in chosen])
        return Postings.empty()

    # the indexes that search this store ---------------------------------------------------------------
    def dense_index(self, config: CollectionConfig) -> CollectionIndex:
        return PostgresIndex(self, config)

    def lexical_index(self, analyzer: Analyzer) -> LexicalIndex:
        return FollowingLexicalIndex(self, analyzer).load()

    def view_index(self, config: CollectionConfig, transform: Transform, label: str) -> CollectionIndex:
        return PostgresView(self, config, transform, label)

    def drop_views(self, keep: set[str]) -> None:
        with self.db.transaction() as conn:
            gone = conn.execute(
                f"DELETE FROM {SCHEMA}.views WHERE collection_id = %s AND NOT label = ANY(%s) RETURNING id, label", (self.cid, sorted(keep))
            ).fetchall()
            for view, label in gone:
                conn.execute(f"DROP TABLE IF EXISTS {_view_table(self.cid, view)}")
                logger.info("collection %s: view of adapter %s dropped", self.name, label)


def _filter_sql(selection: Selection | None) -> tuple[str, list[Any]]:
    """The filter as a condition on the documents (aliased ``d``) and its parameters; ``""`` for none."""
    if selection is None or selection.where is None:
        return "", []
    clause, params = to_postgres(parse(selection.where))
    return clause, params


class PostgresIndex(CollectionIndex):
    """Dense search in SQL: pgvector's HNSW index (or an exact scan) over the windows, the best window per
    document kept in SQL. Nothing to apply: every replica reads the same table."""

    def __init__(self, store: PostgresStore, config: CollectionConfig) -> None:
        self.store, self.config = store, config
        self._indexed = config.index == "hnsw"

    @property
    def kind(self) -> str:  # type: ignore[override]  # the base class's attribute, computed here
        """``flat`` (an exact scan) or ``hnsw``: by the collection's setting; for ``auto``, whether the upsert
        that took it past ``AUTO_HNSW_WINDOWS`` has built its index (any replica's)."""
        if self.config.index == "flat":
            return "flat"
        if not self._indexed:
            with self.store.db.transaction() as conn:
                self._indexed = _has_hnsw(conn, self.store.t["windows"])
        return "hnsw" if self._indexed else "flat"

    def dense(self, queries: np.ndarray, n: int, selection: Selection | None = None) -> list[Candidates]:
        return _nearest(self.store, self.store.t["windows"], self.kind, self.config, queries, n, selection)


def _nearest(store: PostgresStore, table: str, kind: str, config: CollectionConfig, queries: np.ndarray, n: int,
             selection: Selection | None) -> list[Candidates]:
    """Dense search in SQL over ``table`` (window key, ``seq``, vector): the ``n`` best documents per query, each
    with its best window; exact (a scan) when ``kind`` is ``flat``, else on the table's HNSW index."""
    clause, params = _filter_sql(selection)
    join = f"JOIN {store.t['docs']} d ON d.seq = w.seq WHERE {clause}" if clause else ""
    out: list[Candidates] = []
    with store.db.transaction() as conn:
        # within pgvector's range: a collection created before creation checked it may ask for more
        ef_search = min(max(int(config.ef_search), PGVECTOR_MIN_EF_SEARCH), PGVECTOR_MAX_EF_SEARCH)
        conn.execute(f"SET LOCAL hnsw.ef_search = {ef_search}")
        if kind == "flat":
            conn.execute("SET LOCAL enable_indexscan = off")  # exact: a scan of every window
        elif clause:
            conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")  # keep scanning until enough pass
        queries = np.asarray(queries, np.float32)
        # the candidates in the index's order, each scored by its float32 vector (the same order below 2,000 dims)
        order = "w.embedding <#> %s" if kind == "flat" else _hnsw_order(queries.shape[1])
        for q in queries:
            m = max(4 * n, 16)
            while True:
                rows = conn.execute(
                    f"""WITH nn AS MATERIALIZED (
                            SELECT w.key, w.embedding <#> %s AS distance FROM {table} w {join}
                            ORDER BY {order} LIMIT %s),
                        best AS (SELECT DISTINCT ON (key >> {WINDOW_BITS}) key, distance FROM nn ORDER BY key >> {WINDOW_BITS}, distance, key)
                        SELECT key, distance, (SELECT count(*) FROM nn) FROM best ORDER BY distance, key LIMIT %s""",
                    [q, *params, q, m, n],
                ).fetchall()
                if len(rows) >= n or not rows or rows[0][2] < m:  # enough documents, or every window seen
                    break
                m *= 4
            out.append({int(k) >> WINDOW_BITS: (-float(d), int(k) & MASK) for k, d, _ in rows})
    return out


class LogFollower:
    """An index in this replica's memory that follows a collection's write log (``embedlift.changes``):
    ``catch_up`` applies the writes committed after generation ``_seen`` (idempotent by window key: keys are
    never reused), or reloads when one of them changed everything or the log no longer holds them all."""

    store: PostgresStore
    _seen: int
    _lock: Any

    def _reload(self) -> None:
        raise NotImplementedError

    def _apply_write(self, removed: np.ndarray, added: list[int]) -> None:
        raise NotImplementedError

    def _caught_up(self) -> None:
        """After the writes were applied."""

    def catch_up(self) -> None:
        generation, writes = self.store.changes_since(self._seen)
        if generation == self._seen:
            return
        with self._lock:
            if writes is None:
                self._reload()
                return
            for removed, added in writes:
                self._apply_write(removed, added)
            self._seen = generation
            self._caught_up()


class FollowingLexicalIndex(LogFollower, MemoryLexicalIndex):
    """The collection's postings in this replica's memory (``MemoryLexicalIndex``: the embedded store's BM25,
    its speed and its exact scores), following the write log before each search (removed windows leave it, added
    documents' postings are read back), so it scores exactly what the database holds."""

    store: PostgresStore

    def __init__(self, store: PostgresStore, analyzer: Analyzer) -> None:
        super().__init__(store, analyzer)
        self._seen = -1

    def load(self) -> FollowingLexicalIndex:
        with self._lock:
            self._clear()
            self._seen = self.store.generation()  # read first: a write after it is applied again, harmlessly
            super().load()
        return self

    def apply(self, changes: Changes) -> None:
        """Nothing: this replica's writes are in the log like every other's, and followed at the next search."""

    def _reload(self) -> None:
        self.load()

    def _apply_write(self, removed: np.ndarray, added: list[int]) -> None:
        self._generation += 1
        self._weights.clear()
        self._remove(removed)
        if added:
            postings = self.store.postings_of(added)
            fresh = np.array([not self.has(int(k)) for k in postings.keys], bool)
            if fresh.any():
                self._append(_select(postings, fresh))

    def _caught_up(self) -> None:
        if self.status != "ready" and self.store.postings_state() == self.analyzer.version:
            self.status = "ready"  # another replica finished building the postings

    def lexical(self, queries: Sequence[Sequence[str]], n: int, selection: Selection | None = None) -> list[Candidates]:
        self.catch_up()
        return super().lexical(queries, n, selection)


def _select(p: Postings, keep: np.ndarray) -> Postings:
    """The postings of the windows ``keep`` marks."""
    renumber = np.cumsum(keep) - 1
    mine = keep[p.window_of]
    return Postings(keys=p.keys[keep], lengths=p.lengths[keep], window_of=renumber[p.window_of[mine]], term_ids=p.term_ids[mine], tfs=p.tfs[mine])


class PostgresView(CollectionIndex):
    """An ``apply_to: both`` adapter's document view as a table of its collection (``c<id>_v<view id>``: window
    key, ``seq``, the base vector mapped by the adapter's document transform), with its own HNSW index where the
    collection has one, searched in SQL like the base windows. Nothing of it is in a replica's memory.

    It is built as a job (``build``, from the stored base vectors) and serves once built (``pending`` until
    then). It follows the collection's write log (``embedlift.changes``): after each write through this replica,
    and before each search (in case a writer died between its commit and the view's), the writes it has not seen
    are applied in one transaction that holds the view's row lock, so two replicas never apply one twice; a
    write that changed everything (a re-index) fills it again. Dropped (table and row) with its adapter."""

    def __init__(self, store: PostgresStore, config: CollectionConfig, transform: Transform, label: str) -> None:
        self.store, self.config, self.transform, self.label = store, config, transform, label
        with store.db.transaction() as conn:
            conn.execute(f"INSERT INTO {SCHEMA}.views (collection_id, label) VALUES (%s, %s) ON CONFLICT DO NOTHING", (store.cid, label))
            self.id = int(conn.execute(f"SELECT id FROM {SCHEMA}.views WHERE collection_id = %s AND label = %s", (store.cid, label)).fetchone()[0])
        self.table = _view_table(store.cid, self.id)
        self._ready = False
        self._kind = "flat"

    def _row(self, conn: Any, lock: bool = False) -> tuple[bool, int, str | None]:
        row = conn.execute(f"SELECT ready, generation, job FROM {SCHEMA}.views WHERE id = %s{' FOR UPDATE' if lock else ''}", (self.id,)).fetchone()
        if row is None:
            raise NotFoundError(f"the view of adapter {self.label} on collection {self.store.name!r} was dropped (the adapter was deleted)")
        return bool(row[0]), int(row[1]), row[2]

    @property
    def pending(self) -> bool:
        if not self._ready:
            with self.store.db.transaction() as conn:
                self._ready = self._row(conn)[0]
        return not self._ready

    @property
    def kind(self) -> str:  # type: ignore[override]
        """``hnsw`` once the table has its index (built with it where the collection searches by HNSW)."""
        if self._kind != "hnsw":
            with self.store.db.transaction() as conn:
                self._kind = "hnsw" if _has_hnsw(conn, self.table) else "flat"
        return self._kind

    def claim_build(self, job_id: str) -> bool:
        with self.store.db.transaction() as conn:
            return conn.execute(
                f"""UPDATE {SCHEMA}.views v SET job = %s WHERE v.id = %s AND NOT v.ready AND (v.job IS NULL OR NOT EXISTS (
                        SELECT 1 FROM {SCHEMA}.jobs j WHERE j.id = v.job AND j.status IN ('queued', 'running'))) RETURNING id""",
                (job_id, self.id),
            ).fetchone() is not None

    def build(self, report: Callable[[int, int], None] | None = None) -> None:
        with self.store.db.transaction() as conn:
            ready, _, _ = self._row(conn, lock=True)  # builders of one view take turns; the second finds it built
            if ready:
                return
            generation = self._fill(conn, report)
            conn.execute(f"UPDATE {SCHEMA}.views SET ready = true, generation = %s WHERE id = %s", (generation, self.id))
        self._ready = True
        logger.info("collection %s: view of adapter %s built (%s)", self.store.name, self.label, self.table)

    def _fill(self, conn: Any, report: Callable[[int, int], None] | None = None) -> int:
        """(Re)create the table from the stored base vectors, in the caller's transaction; the generation it
        reflects at least (read first: a write after it is applied again by the next catch-up, harmlessly)."""
        generation = self.store.generation()
        total = self.store.count()[1]
        dim = int(self.transform(np.zeros((1, self.config.dim), np.float32)).shape[1])
        conn.execute(f"DROP TABLE IF EXISTS {self.table}")
        conn.execute(f"CREATE TABLE {self.table} (key bigint PRIMARY KEY, seq bigint NOT NULL, embedding vector({dim}) NOT NULL)")
        done = 0
        for keys, vectors in self.store.iter_windows():
            self._copy(conn, keys, vectors)
            done += len(keys)
            if report is not None:
                report(done, total)
        if PostgresIndex(self.store, self.config).kind == "hnsw":
            _create_hnsw(conn, self.table, self.config)
        return generation

    def _copy(self, conn: Any, keys: np.ndarray, vectors: np.ndarray) -> None:
        if not len(keys):
            return
        mapped = np.asarray(self.transform(vectors), np.float32)
        with conn.cursor().copy(f"COPY {self.table} (key, seq, embedding) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int8", "vector"])
            for key, v in zip(keys.tolist(), mapped, strict=True):
                copy.write_row((key, key >> WINDOW_BITS, v))

    def catch_up(self) -> None:
        """Apply the collection's writes the table has not seen (nothing when it is current: one query)."""
        with self.store.db.transaction() as conn:
            row = conn.execute(
                f"SELECT v.generation, c.writes FROM {SCHEMA}.views v JOIN {SCHEMA}.collections c ON c.id = v.collection_id WHERE v.id = %s",
                (self.id,),
            ).fetchone()
            if row is None:
                self._row(conn)  # raises: the view was dropped
        if row[0] >= row[1]:
            return
        with self.store.db.transaction() as conn:
            _, seen, _ = self._row(conn, lock=True)
            generation, writes = self.store.changes_since(seen)
            if generation == seen:
                return  # another replica caught it up meanwhile
            if writes is None:
                generation = self._fill(conn)
            else:
                for removed, added in writes:
                    if len(removed):
                        conn.execute(f"DELETE FROM {self.table} WHERE key = ANY(%s)", ([int(k) for k in removed],))
                    if added:
                        keys, vectors = self.store.windows_of(added)
                        conn.execute(f"DELETE FROM {self.table} WHERE key = ANY(%s)", (keys.tolist(),))  # applied again: replaced
                        self._copy(conn, keys, vectors)
            conn.execute(f"UPDATE {SCHEMA}.views SET generation = %s WHERE id = %s", (generation, self.id))

    def apply(self, changes: Changes) -> None:
        """After a write through this replica: bring the view up to date now (a failure here leaves it to the
        next search, which catches up first)."""
        if not self.pending:
            try:
                self.catch_up()
            except Exception as exc:  # noqa: BLE001 - the write has committed; the next search catches up
                logger.warning("collection %s: view of adapter %s not caught up after a write: %s", self.store.name, self.label, exc)

    def dense(self, queries: np.ndarray, n: int, selection: Selection | None = None) -> list[Candidates]:
        if self.pending:
            with self.store.db.transaction() as conn:
                job = self._row(conn)[2]
            raise UnavailableError(
                f"the document view of adapter {self.label} on collection {self.store.name!r} is being built"
                + (f" (GET /jobs/{job})" if job else "") + "; retry when it is done", retry_after=2,
            )
        self.catch_up()
        return _nearest(self.store, self.table, self.kind, self.config, queries, n, selection)

