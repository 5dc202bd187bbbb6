"""The base-embedding cache: each (base fingerprint, model input) is embedded once, ever.

The base is frozen, so a text's base vector never changes. Training for many epochs, re-training, evaluation,
re-indexing and serving all read the same SQLite file (WAL mode, so readers never block the writer), keyed by
the base's fingerprint and a hash of the exact model input (role prompt + text): a bge-style query and the
same text as a document are different inputs and never share a vector.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from embedlift.models.encoders import Encoder, Role, WrappedEncoder

logger = logging.getLogger(__name__)


def default_cache_path() -> Path:
    """``$EMBEDLIFT_CACHE``, else ``$XDG_CACHE_HOME/embedlift/base-embeddings.sqlite3``."""
    if env := os.environ.get("EMBEDLIFT_CACHE"):
        return Path(env)
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "embedlift" / "base-embeddings.sqlite3"


def input_key(prompt: str, text: str) -> bytes:
    """Cache key of one model input: a hash of the prompt and the text, separated unambiguously."""
    h = hashlib.blake2b(digest_size=20)
    h.update(prompt.encode())
    h.update(b"\x00")
    h.update(text.encode())
    return h.digest()


class VectorCache(Protocol):
    """What ``CachedEncoder`` reads and fills: ``EmbeddingCache`` (a file), ``MemoryCache`` (bounded, in
    memory), or the service's ``DatabaseCache`` (the PostgreSQL store a fleet shares)."""

    def get_many(self, fingerprint: str, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]: ...
    def put_many(self, fingerprint: str, items: Sequence[tuple[bytes, np.ndarray]]) -> None: ...
    def count(self, fingerprint: str | None = None) -> int: ...
    def dim_of(self, fingerprint: str) -> int | None: ...
    def close(self) -> None: ...


class EmbeddingCache:
    """A persistent map (fingerprint, input key) -> float32 vector in one SQLite file.

    Safe to share between threads (one connection behind a lock) and between processes (SQLite locking,
    WAL journal). Writes commit per batch, so an interrupted embedding run keeps what it finished.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            # Only a cache: set the damaged file aside (kept for a post-mortem) and start an empty one.
            aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
            logger.warning("the embedding cache %s is damaged (%s); moved to %s, starting an empty cache", self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    os.replace(src, Path(f"{aside}{suffix}"))
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a cache: losing the last batch on power loss is fine
            if (result := db.execute("PRAGMA quick_check(1)").fetchone()[0]) != "ok":
                raise sqlite3.DatabaseError(result)
            db.execute(
                "CREATE TABLE IF NOT EXISTS base_vectors ("
                " fingerprint TEXT NOT NULL, key BLOB NOT NULL, vector BLOB NOT NULL,"
                " PRIMARY KEY (fingerprint, key)) WITHOUT ROWID"
            )
            db.commit()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def get_many(self, fingerprint: str, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
                chunk = list(keys[i : i + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, vector FROM base_vectors WHERE fingerprint = ? AND key IN ({marks})",
                    [fingerprint, *chunk],
                )
                for key, blob in rows:
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, fingerprint: str, items: Sequence[tuple[bytes, np.ndarray]]) -> None:
        rows = [(fingerprint, key, np.asarray(v, dtype=np.float32).tobytes()) for key, v in items]
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO base_vectors VALUES (?, ?, ?)", rows)
            self._db.commit()

    def count(self, fingerprint: str | None = None) -> int:
        with self._lock:
            if fingerprint is None:
                return self._db.execute("SELECT COUNT(*) FROM base_vectors").fetchone()[0]
            return self._db.execute(
                "SELECT COUNT(*) FROM base_vectors WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()[0]

    def dim_of(self, fingerprint: str) -> int | None:
        """The length of any vector stored for ``fingerprint`` (``None`` when there is none)."""
        with self._lock:
            row = self._db.execute("SELECT length(vector) FROM base_vectors WHERE fingerprint = ? LIMIT 1", (fingerprint,)).fetchone()
        return None if row is None else row[0] // 4

    def close(self) -> None:
        with self._lock:
            self._db.close()


class MemoryCache:
    """A bounded in-memory LRU map with ``EmbeddingCache``'s interface: the serving path's cache.

    User questions repeat (the same FAQ, a retried request, a UI re-running a search), but an unbounded store
    of every question ever asked would grow without end; this one evicts the least recently used vectors
    past ``max_bytes``. Thread-safe.
    """

    ENTRY_OVERHEAD = 160  # bytes of dict, key and array header per entry, roughly

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[str, bytes], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, fingerprint: str, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for key in keys:
                vector = self._items.get((fingerprint, key))
                if vector is not None:
                    self._items.move_to_end((fingerprint, key))
                    found[key] = vector
        return found

    def put_many(self, fingerprint: str, items: Sequence[tuple[bytes, np.ndarray]]) -> None:
        with self._lock:
            for key, vector in items:
                v = np.array(vector, dtype=np.float32)  # a copy: callers may reuse their buffer
                old = self._items.pop((fingerprint, key), None)
                if old is not None:
                    self.bytes -= old.nbytes + self.ENTRY_OVERHEAD
                self._items[(fingerprint, key)] = v
                self.bytes += v.nbytes + self.ENTRY_OVERHEAD
            while self.bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes + self.ENTRY_OVERHEAD

    def count(self, fingerprint: str | None = None) -> int:
        with self._lock:
            return len(self._items) if fingerprint is None else sum(1 for f, _ in self._items if f == fingerprint)

    def dim_of(self, fingerprint: str) -> int | None:
        return None  # a remote base's dimension is learned by one probe call at start

    def close(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


@dataclass
class CacheStats:
    """How many inputs came from the cache and how many ran the model."""

    cached: int = 0
    computed: int = 0

    def __str__(self) -> str:
        return f"{self.cached} cached, {self.computed} computed"


class CachedEncoder(WrappedEncoder):
    """Wraps an encoder so that each distinct input runs the model at most once, across runs.

    Args:
        inner: The base encoder.
        cache: The persistent store (or the service's bounded in-memory one); ``None`` keeps nothing between
            calls (still de-duplicates a call).
        chunk_size: Inputs embedded (and committed to the cache) per step of a long run.
        progress: Show a progress bar on stderr for runs longer than one chunk.
    """

    def __init__(
        self,
        inner: Encoder,
        cache: VectorCache | None,
        *,
        chunk_size: int = 256,
        progress: bool = True,
    ) -> None:
        super().__init__(inner)
        self.cache = cache
        self.chunk_size = chunk_size
        self.progress = progress
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()
        if inner.needs_dim and cache is not None and (known := cache.dim_of(self.fingerprint)):
            inner.set_dim(known)  # a remote base's dimension, without a probe call

    def lookup(self, texts: Sequence[str], role: Role) -> Lookup:
        """What the cache already has for ``texts`` and which distinct inputs it lacks (counted in ``stats``)."""
        prompt = self.inner.prompt(role)
        keys = [input_key(prompt, t) for t in texts]
        unique: dict[bytes, str] = dict(zip(keys, texts, strict=True))
        found = self.cache.get_many(self.fingerprint, list(unique)) if self.cache else {}
        missing = [k for k in unique if k not in found]
        with self._stats_lock:
            self.stats.cached += len(unique) - len(missing)
            self.stats.computed += len(missing)
        return Lookup(keys=keys, found=found, missing=missing, texts=unique)

    def fill(self, lookup: Lookup, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Keep computed vectors of ``keys`` (some of ``lookup.missing``), in the cache and in ``lookup``."""
        if self.cache:
            self.cache.put_many(self.fingerprint, list(zip(keys, vectors, strict=True)))
        lookup.found.update(zip(keys, vectors, strict=True))

    def encode(self, texts: Sequence[str], role: Role) -> np.ndarray:
        lookup = self.lookup(texts, role)
        if not lookup.missing:  # the serving path's common case: no progress bar, no model
            return lookup.stacked(self.dim)
        bar = tqdm(
            total=len(lookup.missing),
            desc=f"embedding ({self.inner.name})",
            unit="text",
            file=sys.stderr,
            disable=not self.progress or len(lookup.missing) <= self.chunk_size,
        )
        with bar:
            for i in range(0, len(lookup.missing), self.chunk_size):
                chunk = lookup.missing[i : i + self.chunk_size]
                self.fill(lookup, chunk, self.inner.encode([lookup.texts[k] for k in chunk], role))
                bar.update(len(chunk))
        return lookup.stacked(self.dim)


@dataclass
class Lookup:
    """One call's inputs against the cache: every input's key, the vectors found, the distinct keys missing."""

    keys: list[bytes]
    found: dict[bytes, np.ndarray]
    missing: list[bytes]
    texts: dict[bytes, str]

    @property
    def missing_texts(self) -> list[str]:
        return [self.texts[k] for k in self.missing]

    def stacked(self, dim: int) -> np.ndarray:
        """``(len(keys), dim)`` float32, in input order (every key must be found by now)."""
        return _stack(self.found, self.keys, dim)


def _stack(found: dict[bytes, np.ndarray], keys: Sequence[bytes], dim: int) -> np.ndarray:
    if not keys:
        return np.zeros((0, dim), np.float32)
    return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
