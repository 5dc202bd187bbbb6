"""The base-embedding cache in the PostgreSQL store (``--cache-store store``), so a fleet embeds each text once.

The same map as ``models/cache.py``'s ``EmbeddingCache`` (base fingerprint, hash of the exact model input) ->
float32 vector, as rows of ``embedlift.base_vectors``. It is a cache: while the database cannot be reached a
lookup misses and a write is dropped (logged), so work that does not need the database (an evaluation of an
inline dataset) goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from embedlift.models.errors import UnavailableError
from embedlift.service.database import SCHEMA, Database

logger = logging.getLogger(__name__)


class DatabaseCache:
    """``EmbeddingCache``'s interface over the shared database; thread-safe (a pooled connection per call)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.path = db.where  # what messages name

    def get_many(self, fingerprint: str, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        if not keys:
            return {}
        try:
            with self.db.transaction() as conn:
                rows = conn.execute(
                    f"SELECT key, vector FROM {SCHEMA}.base_vectors WHERE fingerprint = %s AND key = ANY(%s)", (fingerprint, list(keys))
                ).fetchall()
        except UnavailableError as exc:
            logger.warning("base-embedding cache unavailable, computing instead: %s", exc.message)
            return {}
        return {bytes(k): np.frombuffer(bytes(v), dtype=np.float32) for k, v in rows}

    def put_many(self, fingerprint: str, items: Sequence[tuple[bytes, np.ndarray]]) -> None:
        if not items:
            return
        try:
            with self.db.transaction() as conn:
                conn.execute(
                    f"INSERT INTO {SCHEMA}.base_vectors (fingerprint, key, vector) SELECT %s, k, v FROM unnest(%s::bytea[], %s::bytea[]) AS t(k, v) "
                    "ON CONFLICT DO NOTHING",
                    (fingerprint, [k for k, _ in items], [np.asarray(v, np.float32).tobytes() for _, v in items]),
                )
        except UnavailableError as exc:
            logger.warning("base-embedding cache unavailable, %d vectors not kept: %s", len(items), exc.message)

    def count(self, fingerprint: str | None = None) -> int:
        with self.db.transaction() as conn:
            if fingerprint is None:
                return int(conn.execute(f"SELECT count(*) FROM {SCHEMA}.base_vectors").fetchone()[0])
            return int(conn.execute(f"SELECT count(*) FROM {SCHEMA}.base_vectors WHERE fingerprint = %s", (fingerprint,)).fetchone()[0])

    def dim_of(self, fingerprint: str) -> int | None:
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT length(vector) FROM {SCHEMA}.base_vectors WHERE fingerprint = %s LIMIT 1", (fingerprint,)).fetchone()
        return None if row is None else int(row[0]) // 4

    def close(self) -> None:
        """The pool is the database's."""
