"""Every collection of one home: open at start, create, delete, re-index.

A *home* is where the stores live: ``DirectoryHome`` (the embedded default: ``<data_dir>/collections``, one
directory per collection holding its SQLite store; create and delete are atomic directory renames) or
``PostgresHome`` (one database that several replicas share: create and delete are transactions, and another
replica may make them at any time, so the manager checks the collection's identity on every ``get``).

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
from typing import Any, Protocol

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


class Home(Protocol):
    """Where a manager's collection stores live."""

    #: For messages: a directory or the database (without its password).
    where: str
    #: Other processes create, delete and re-index collections here too.
    shared: bool

    def tidy(self) -> None: ...
    def where_of(self, name: str) -> str: ...
    def names(self) -> list[str]: ...
    def open(self, name: str) -> CollectionStore: ...
    def create(self, config: CollectionConfig, postings: str | None) -> None: ...
    def delete(self, name: str) -> None: ...
    def token(self, name: str) -> Any: ...


class DirectoryHome:
    """``<data_dir>/collections``: a directory per collection, created and deleted by atomic renames."""

    shared = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def tidy(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for path in self.root.iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)  # an interrupted create or delete

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / STORE_FILE).is_file())

    def path(self, name: str) -> Path:
        return self.root / name / STORE_FILE

    def where_of(self, name: str) -> str:
        return str(self.path(name))

    def open(self, name: str) -> CollectionStore:
        return SQLiteStore(self.path(name))

    def create(self, config: CollectionConfig, postings: str | None) -> None:
        """Built in a hidden directory, then renamed into place."""
        tmp = self.root / f".new-{config.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        store = SQLiteStore(tmp / STORE_FILE)
        store.write_config(config)
        if postings is not None:
            store.mark_postings(postings)
        store.close()
        tmp.rename(self.root / config.name)

    def delete(self, name: str) -> None:
        """Rename the directory aside (atomic), then remove it."""
        trash = self.root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
        (self.root / name).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def token(self, name: str) -> Any:
        return None


def _damage_errors() -> tuple[type[Exception], ...]:
    """What opening a store raises when it is damaged (not when the database is merely unreachable)."""
    errors: tuple[type[Exception], ...] = (sqlite3.DatabaseError, msgspec.DecodeError, InvalidInputError, ValueError)
    try:
        import psycopg

        errors += (psycopg.errors.UndefinedTable, psycopg.errors.DataError)
    except ImportError:
        pass
    return errors


class CollectionManager:
    """The collections of one home, for the base with ``fingerprint``; thread-safe.

    Args:
        home: ``<data_dir>/collections`` (a path: the embedded store) or a ``Home`` (``PostgresHome``).
        fingerprint: The served base's fingerprint; collections built with another are mismatched.
        dim: The served base's dimension.
        spec: The served base's specification (recorded in new collections, named in mismatch messages).
    """

    def __init__(self, home: Path | Home, fingerprint: str, dim: int, spec: BaseSpec | None = None) -> None:
        self.home: Home = DirectoryHome(home) if isinstance(home, Path) else home
        self.fingerprint = fingerprint
        self.dim = dim
        self.spec = spec
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._tokens: dict[str, Any] = {}  # shared home: the identity each open collection had when opened
        self._mismatched: dict[str, CollectionConfig] = {}
        self._damaged: dict[str, str] = {}  # name -> what is wrong, naming the file
        self._reindexing: dict[str, str] = {}  # name -> id of the job re-indexing it onto this base

    @property
    def root(self) -> Path:
        """The embedded home's directory."""
        assert isinstance(self.home, DirectoryHome)
        return self.home.root

    def open_store(self, name: str) -> CollectionStore:
        return self.home.open(name)

    def load_all(self) -> None:
        """Open every collection and build its indexes; remove leftovers of interrupted creates/deletes."""
        self.home.tidy()
        for name in self.home.names():
            self._open(name)

    def _open(self, name: str) -> None:
        """Open one collection into the serving, mismatched or damaged set (under the caller's lock, or at start)."""
        token = self.home.token(name)
        store = None
        try:
            store = self.home.open(name)
            store.check()
            config = store.read_config()
        except NotFoundError:
            return
        except _damage_errors() as exc:
            if store is not None:
                store.close()
            self._set_damaged(name, self.home.where_of(name), exc)
            return
        if config.base_fingerprint != self.fingerprint:
            logger.warning("collection %s was built with base %s, not %s", config.name, config.base_fingerprint, self.fingerprint)
            self._mismatched[config.name] = config
            self._tokens[name] = token
            store.close()
            return
        try:
            collection = Collection(store, config).load()  # derived indexes are rebuilt from the store
        except _damage_errors() as exc:
            store.close()
            self._set_damaged(name, self.home.where_of(name), exc)
            return
        self._collections[config.name] = collection
        self._tokens[name] = token

    def _set_damaged(self, name: str, where: str, exc: Exception) -> None:
        problem = f"its store {where} is damaged ({exc}); restore it from a backup, or delete the collection"
        logger.error("collection %s: %s", name, problem)
        self._damaged[name] = problem

    def _sync(self, name: str) -> None:
        """A shared home: follow what other replicas did to ``name`` since it was opened here (created, deleted,
        re-created, re-indexed or re-analysed), by its identity in the home. Under the lock."""
        if not self.home.shared or name in self._damaged or name in self._reindexing:
            return
        token = self.home.token(name)
        if token is not None and self._tokens.get(name) == token:
            return
        if (old := self._collections.pop(name, None)) is not None:
            old.close()
        self._mismatched.pop(name, None)
        self._tokens.pop(name, None)
        if token is not None:
            self._open(name)

    def damaged(self) -> dict[str, str]:
        with self._lock:
            return dict(self._damaged)

    def mismatched(self) -> dict[str, CollectionConfig]:
        with self._lock:
            if self.home.shared:
                for name in list(self._mismatched):
                    self._sync(name)
            return dict(self._mismatched)

    def reindexing(self) -> dict[str, str]:
        """Collections being re-indexed, with the id of the job doing it."""
        with self._lock:
            return dict(self._reindexing)

    def names(self) -> list[str]:
        with self._lock:
            if self.home.shared:
                for name in sorted(set(self.home.names()) | set(self._collections) | set(self._mismatched)):
                    self._sync(name)
            return sorted([*self._collections, *self._mismatched, *self._damaged])

    def all(self) -> list[Collection]:
        with self._lock:
            return list(self._collections.values())

    def _mismatch_message(self, name: str, config: CollectionConfig) -> str:
        why = ""
        if config.base is not None and self.spec is not None:
            why = f" ({mismatch(config.base, config.base_fingerprint, self.spec, self.fingerprint)}; the collection's value first)"
        offline = f"embedlift reindex {name} --data-dir {self.root.parent} [--base B]" if isinstance(self.home, DirectoryHome) else None
        return (
            f"collection {name!r} was built with base {config.base_fingerprint} but this server runs {self.fingerprint}{why}; "
            f"re-index it onto this base: POST /collections/{name}/reindex"
            + (f" (or, with the server stopped, {offline})" if offline else "")
        )

    def get(self, name: str) -> Collection:
        """A collection that can serve.

        Raises:
            NotFoundError, UnavailableError (damaged), ConflictError (another base, or being re-indexed).
        """
        with self._lock:
            self._sync(name)
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
            self._sync(name)
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
        token = self.home.token(name)
        store = self.open_store(name)
        collection = Collection(store, store.read_config()).load()
        with self._lock:
            self._mismatched.pop(name, None)
            self._reindexing.pop(name, None)
            self._collections[name] = collection
            self._tokens[name] = token
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
        """Create a collection (atomically, in its home). Creating one that exists with the same settings is a
        no-op (``False``); with other settings, a conflict."""
        check_name(name)
        config = CollectionConfig(
            name=name, base_fingerprint=self.fingerprint, dim=self.dim, index=index, hnsw_m=hnsw_m,
            ef_construction=ef_construction, ef_search=ef_search, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            base=self.spec, lexical=lexical, alpha=alpha,
        )
        with self._lock:
            self._sync(name)
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
            # an empty collection's postings are complete: every upsert writes its own
            self.home.create(config, analyzer(lexical.language).version if lexical is not None else None)
            token = self.home.token(name)
            collection = Collection(self.open_store(name), config).load()
            self._collections[name] = collection
            self._tokens[name] = token
            return collection, True

    def delete(self, name: str) -> None:
        """Delete a collection from its home (atomic)."""
        with self._lock:
            self._sync(name)
            if name in self._reindexing:
                raise ConflictError(f"collection {name!r} is being re-indexed (GET /jobs/{self._reindexing[name]}); delete it when the job is done")
            collection = self._collections.pop(name, None)
            config = self._mismatched.pop(name, None)
            damaged = self._damaged.pop(name, None)
            self._tokens.pop(name, None)
            if collection is None and config is None and damaged is None:
                raise NotFoundError(f"unknown collection {name!r}; existing: {sorted(self._collections)}")
            if collection is not None:
                collection.close()
            self.home.delete(name)

    def close(self) -> None:
        with self._lock:
            for c in self._collections.values():
                c.close()
