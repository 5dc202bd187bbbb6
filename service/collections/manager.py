"""Every collection under ``<data_dir>/collections``: open at start, create, delete, re-index; each collection is
a directory holding its store, and create and delete are atomic directory renames.

A collection whose store fails its check at start is *damaged* (503 naming the file) while the others serve; one
built with another base is *mismatched* (409 naming both bases and the fix) until it is re-indexed onto this one.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import msgspec

from embedlift.models.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError
from embedlift.models.lexical import LexicalSettings, analyzer
from embedlift.models.spec import BaseSpec, mismatch
from embedlift.service.collections.base import CollectionConfig, CollectionStore
from embedlift.service.collections.collection import Collection
from embedlift.service.collections.names import check_name
from embedlift.service.collections.sqlite import STORE_FILE, SQLiteStore
from embedlift.service.schemas import IndexKind

logger = logging.getLogger(__name__)


class CollectionManager:
    """The collections of one data directory, for the base with ``fingerprint``; thread-safe.

    Args:
        root: ``<data_dir>/collections``.
        fingerprint: The served base's fingerprint; collections built with another are mismatched.
        dim: The served base's dimension.
        spec: The served base's specification (recorded in new collections, named in mismatch messages).
    """

    def __init__(self, root: Path, fingerprint: str, dim: int, spec: BaseSpec | None = None) -> None:
        self.root = root
        self.fingerprint = fingerprint
        self.dim = dim
        self.spec = spec
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._mismatched: dict[str, CollectionConfig] = {}
        self._damaged: dict[str, str] = {}  # name -> what is wrong, naming the file
        self._reindexing: dict[str, str] = {}  # name -> id of the job re-indexing it onto this base

    def store_path(self, name: str) -> Path:
        return self.root / name / STORE_FILE

    def open_store(self, name: str) -> CollectionStore:
        return SQLiteStore(self.store_path(name))

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
                store = SQLiteStore(path / STORE_FILE)
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
            try:
                collection = Collection(store, config).load()  # the indexes are derived: rebuilt from the store
            except (sqlite3.DatabaseError, ValueError) as exc:
                store.close()
                self._set_damaged(path.name, path / STORE_FILE, exc)
                continue
            self._collections[config.name] = collection

    def _set_damaged(self, name: str, file: Path, exc: Exception) -> None:
        problem = f"its store {file} is damaged ({exc}); restore the file from a backup, or delete the collection"
        logger.error("collection %s: %s", name, problem)
        self._damaged[name] = problem

    def damaged(self) -> dict[str, str]:
        with self._lock:
            return dict(self._damaged)

    def mismatched(self) -> dict[str, CollectionConfig]:
        with self._lock:
            return dict(self._mismatched)

    def reindexing(self) -> dict[str, str]:
        """Collections being re-indexed, with the id of the job doing it."""
        with self._lock:
            return dict(self._reindexing)

    def names(self) -> list[str]:
        with self._lock:
            return sorted([*self._collections, *self._mismatched, *self._damaged])

    def all(self) -> list[Collection]:
        with self._lock:
            return list(self._collections.values())

    def _mismatch_message(self, name: str, config: CollectionConfig) -> str:
        why = ""
        if config.base is not None and self.spec is not None:
            why = f" ({mismatch(config.base, config.base_fingerprint, self.spec, self.fingerprint)}; the collection's value first)"
        return (
            f"collection {name!r} was built with base {config.base_fingerprint} but this server runs {self.fingerprint}{why}; "
            f"re-index it onto this base: POST /collections/{name}/reindex (or, with the server stopped, "
            f"embedlift reindex {name} --data-dir {self.root.parent} [--base B])"
        )

    def get(self, name: str) -> Collection:
        """A collection that can serve.

        Raises:
            NotFoundError, UnavailableError (damaged), ConflictError (another base, or being re-indexed).
        """
        with self._lock:
            if name in self._damaged:
                raise UnavailableError(f"collection {name!r} cannot be served: {self._damaged[name]} (DELETE /collections/{name})")
            if name in self._reindexing:
                job = self._reindexing[name]
                raise ConflictError(f"collection {name!r} is being re-indexed onto this server's base (GET /jobs/{job}); retry when it is done")
            if name in self._mismatched:
                raise ConflictError(self._mismatch_message(name, self._mismatched[name]))
            try:
                return self._collections[name]
            except KeyError:
                raise NotFoundError(
                    f"unknown collection {name!r}; existing: {sorted(self._collections)}; create it with PUT /collections/{name}"
                ) from None

    # re-index ----------------------------------------------------------------------------------------
    def claim_reindex(self, name: str) -> CollectionStore:
        """Mark a collection built with another base as being re-indexed; a store to re-index it through.

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
        return self.open_store(name)

    def note_reindex_job(self, name: str, job_id: str) -> None:
        with self._lock:
            if name in self._reindexing:
                self._reindexing[name] = job_id

    def finish_reindex(self, name: str) -> Collection:
        """Serve a collection whose re-index has committed: build its index, then make it visible in one step."""
        store = self.open_store(name)
        collection = Collection(store, store.read_config()).load()
        with self._lock:
            self._mismatched.pop(name, None)
            self._reindexing.pop(name, None)
            self._collections[name] = collection
        return collection

    def abandon_reindex(self, name: str) -> None:
        """A failed re-index: the collection stays as it was (built with the other base)."""
        with self._lock:
            self._reindexing.pop(name, None)

    # create and delete -------------------------------------------------------------------------------
    def create(
        self, name: str, index: IndexKind = "auto", *, hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 200,
        lexical: LexicalSettings | None = LexicalSettings(), alpha: float | None = None,
    ) -> tuple[Collection, bool]:
        """Create a collection (built in a hidden directory, then renamed into place). Creating one that
        exists with the same settings is a no-op (``False``); with other settings, a conflict."""
        check_name(name)
        config = CollectionConfig(
            name=name, base_fingerprint=self.fingerprint, dim=self.dim, index=index, hnsw_m=hnsw_m,
            ef_construction=ef_construction, ef_search=ef_search, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            base=self.spec, lexical=lexical, alpha=alpha,
        )
        with self._lock:
            if name in self._mismatched:
                raise ConflictError(f"collection {name!r} exists, built with another base; re-index or delete it first")
            if existing := self._collections.get(name):
                def settings(c: CollectionConfig) -> CollectionConfig:
                    return msgspec.structs.replace(c, created="", base=None)

                if settings(existing.config) == settings(config):
                    return existing, False
                raise ConflictError(
                    f"collection {name!r} exists with other settings (index={existing.config.index}, lexical="
                    f"{existing.config.lexical}, alpha={existing.config.alpha}); delete it first to change them"
                )
            tmp = self.root / f".new-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            store = SQLiteStore(tmp / STORE_FILE)
            store.write_config(config)
            if lexical is not None:  # an empty collection's postings are complete: every upsert writes its own
                store.mark_postings(analyzer(lexical.language).version)
            store.close()
            tmp.rename(self.root / name)
            collection = Collection(self.open_store(name), config).load()
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
                collection.close()
            trash = self.root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
            (self.root / name).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            for c in self._collections.values():
                c.close()
