"""The shared store: one PostgreSQL database (with pgvector) that every replica reads and writes.

``--store postgresql://USER[:PASSWORD]@HOST:PORT/DB`` (or ``EMBEDLIFT_STORE``) puts the collections there
instead of under ``--data-dir`` (``service/collections/postgres.py``). This module owns what every user of the
database shares:

- **The connection pool** (psycopg 3 and psycopg_pool, pgvector's type registered on every connection). A
  transaction is ``with db.transaction() as conn:``: committed when the block ends, rolled back on an error.
- **Failure**: a database that cannot be reached within ``timeout`` seconds (connection refused, pool
  exhausted while it is down, a connection lost mid-query) is a ``StoreUnavailableError``: 503 with
  Retry-After, naming the store, never a 500 and never a hang past the timeout. The pool reconnects by itself
  when the database returns.
- **The schema**, created and migrated by embedlift: ``MIGRATIONS`` in order, the version reached kept in
  ``embedlift.schema_version``, applied under an advisory lock so replicas starting together migrate once.
- **The password never leaves**: ``where`` (and every message, repr and log line) names the store as
  ``postgresql://USER@HOST:PORT/DB``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from embedlift.models.errors import InvalidInputError, TooLargeError, UnavailableError

logger = logging.getLogger(__name__)

SCHEMA = "embedlift"
#: Advisory-lock key that serialises migrations across replicas ("embedlif" as an int64).
MIGRATION_LOCK = 0x656D6265646C6966
RETRY_AFTER = 2
#: No statement runs longer (the longest one: an auto collection's HNSW index, built once at 20k windows).
STATEMENT_TIMEOUT_MS = 300_000

#: The schema, version by version (index + 1). Never edit a released step: append one.
MIGRATIONS: list[str] = [
    # 1: collections (each collection's own tables are created with it: c<id>_docs, c<id>_windows, ...)
    f"""
    CREATE EXTENSION IF NOT EXISTS vector;
    CREATE TABLE {SCHEMA}.collections (
        id bigserial PRIMARY KEY,
        name text NOT NULL UNIQUE,
        config jsonb NOT NULL,
        version bigint NOT NULL DEFAULT 1,          -- bumped by every change of config or analyzer state
        postings text,                              -- the analyzer every window's postings were made with
        documents bigint NOT NULL DEFAULT 0,
        windows bigint NOT NULL DEFAULT 0,
        lexical_windows bigint NOT NULL DEFAULT 0,  -- windows with postings, and their total length in terms
        lexical_length bigint NOT NULL DEFAULT 0,
        writes bigint NOT NULL DEFAULT 0            -- the generation of the last committed write
    );
    CREATE SEQUENCE {SCHEMA}.document_keys;
    -- each committed write: the window keys it removed and the documents it added (NULLs: everything changed);
    -- what the indexes a replica keeps in memory follow (service/collections/postgres.py)
    CREATE TABLE {SCHEMA}.changes (
        collection_id bigint NOT NULL REFERENCES {SCHEMA}.collections (id) ON DELETE CASCADE,
        generation bigint NOT NULL,
        removed bigint[],
        added bigint[],
        PRIMARY KEY (collection_id, generation)
    );
    """,
    # 2: the adapter registry replicas share (service/shared_registry.py)
    f"""
    CREATE TABLE {SCHEMA}.adapter_versions (
        name text NOT NULL,
        version integer NOT NULL,
        sha256 text NOT NULL,                       -- of config, then weights
        config bytea NOT NULL,
        weights bytea NOT NULL,
        registered timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (name, version)
    );
    CREATE TABLE {SCHEMA}.adapter_state (
        id integer PRIMARY KEY CHECK (id = 1),
        active text,
        history jsonb NOT NULL DEFAULT '[]',
        generation bigint NOT NULL DEFAULT 0
    );
    INSERT INTO {SCHEMA}.adapter_state (id) VALUES (1);
    """,
    # 3: background jobs any replica reports on (service/shared_jobs.py)
    f"""
    CREATE TABLE {SCHEMA}.jobs (
        id text PRIMARY KEY,
        kind text NOT NULL,
        status text NOT NULL,
        done bigint NOT NULL DEFAULT 0,
        total bigint NOT NULL DEFAULT 0,
        result jsonb,
        error text,
        spec jsonb,                                 -- what another replica needs to resume it (resumable kinds)
        owner text NOT NULL,                        -- the replica running it
        heartbeat timestamptz,                      -- when that replica last vouched for it
        created timestamptz NOT NULL DEFAULT now(),
        finished timestamptz
    );
    CREATE INDEX ON {SCHEMA}.jobs (owner, status);
    """,
    # 4: the base-embedding cache a fleet shares (service/shared_cache.py, --cache-store store)
    f"""
    CREATE TABLE {SCHEMA}.base_vectors (
        fingerprint text NOT NULL,
        key bytea NOT NULL,
        vector bytea NOT NULL,
        PRIMARY KEY (fingerprint, key)
    );
    """,
    # 5: apply_to: both adapters' document views, each a table of its collection (c<id>_v<view id>)
    f"""
    CREATE TABLE {SCHEMA}.views (
        id bigserial PRIMARY KEY,
        collection_id bigint NOT NULL REFERENCES {SCHEMA}.collections (id) ON DELETE CASCADE,
        label text NOT NULL,                        -- the adapter's name@version
        ready boolean NOT NULL DEFAULT false,       -- built: searched from then on
        generation bigint NOT NULL DEFAULT 0,       -- the collection's last write the table reflects
        job text,                                   -- the job building it
        UNIQUE (collection_id, label)
    );
    """,
    # 6: a job's input and result as JSON text: JSONB cannot hold U+0000, which an evaluation's texts and ids may
    f"""
    ALTER TABLE {SCHEMA}.jobs ALTER COLUMN spec TYPE text USING spec::text, ALTER COLUMN result TYPE text USING result::text;
    """,
]


class StoreUnavailableError(UnavailableError):
    """The database cannot be reached now (503 with Retry-After); the service retries by itself."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER) -> None:
        super().__init__(message, retry_after=retry_after)


def redact(url: str) -> str:
    """``postgresql://USER@HOST:PORT/DB``: the store's name without its password (or other options)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - psycopg's parse errors carry the text, which may hold the password
        return "postgresql://<unparsable URL>"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{info.get('host', '')}{port}/{info.get('dbname', '')}"


def check_url(url: str) -> str:
    """The URL if psycopg can parse it as a PostgreSQL connection string.

    Raises:
        InvalidInputError: naming the expected form (and never echoing the URL, which may hold a password).
    """
    from psycopg.conninfo import conninfo_to_dict

    if not url.startswith(("postgresql://", "postgres://")):
        raise InvalidInputError("the store must be a postgresql://USER[:PASSWORD]@HOST:PORT/DB URL (or unset for the embedded store)")
    try:
        conninfo_to_dict(url)
    except Exception:  # noqa: BLE001
        raise InvalidInputError("the store URL cannot be parsed; expected postgresql://USER[:PASSWORD]@HOST:PORT/DB") from None
    return url


class Database:
    """A pool of connections to one PostgreSQL database; thread-safe.

    Args:
        url: ``postgresql://...``; kept only to connect (``where`` names it without the password).
        pool_size: Connections at most (searches and writes run on worker threads, one connection each).
        timeout: Seconds a caller waits for a connection (or for the database to answer a connect) before
            the call is a 503.
    """

    def __init__(self, url: str, *, pool_size: int = 10, timeout: float = 5.0) -> None:
        from psycopg_pool import ConnectionPool

        self._url = check_url(url)
        self.where = redact(url)
        self.timeout = timeout
        self._password = _password(url)
        self.pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, timeout=timeout, configure=_configure,
            check=ConnectionPool.check_connection,
            # a database that stops answering without closing the connection (a partition) is noticed by TCP
            # keepalives, and no statement runs past STATEMENT_TIMEOUT: no request hangs on the store
            kwargs={"connect_timeout": max(1, int(timeout)), "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                    "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"},
            reconnect_timeout=float("inf"), name="embedlift",
        )

    def __repr__(self) -> str:
        return f"Database({self.where})"

    def open(self, wait: float = 60.0) -> Database:
        """Migrate the schema (waiting up to ``wait`` seconds for the database), then open the pool."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self.migrate()
                break
            except StoreUnavailableError as exc:
                if time.monotonic() > deadline:
                    raise
                logger.warning("%s; retrying", exc)
                time.sleep(1.0)
        self.pool.open(wait=True, timeout=self.timeout)
        return self

    def close(self) -> None:
        self.pool.close()

    def scrub(self, text: str) -> str:
        """``text`` with the password (should a driver message ever carry it) replaced."""
        return text.replace(self._password, "***") if self._password else text

    def _reason(self, exc: BaseException) -> str:
        """The first line of a driver error, password scrubbed (its type where it says nothing)."""
        return self.scrub(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

    def unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"the store {self.where} cannot be reached ({self._reason(exc)}); retry in {RETRY_AFTER} s")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A pooled connection in a transaction: committed at the end of the block, rolled back on an error.

        Raises:
            StoreUnavailableError: The database cannot be reached (or the connection was lost mid-way).
            TooLargeError: The database refused the statement as past one of its limits (413: retrying cannot help).
        """
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self.pool.connection(timeout=self.timeout) as conn:
                yield conn
        except psycopg.errors.ProgramLimitExceeded as exc:  # an OperationalError, but the same request fails again
            raise TooLargeError(f"the store {self.where} refused this as beyond its limits ({self._reason(exc)})") from None
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self.unavailable(exc) from None

    def connect(self) -> Any:
        """A connection of its own (outside the pool), for migrations and listening."""
        import psycopg

        try:
            return psycopg.connect(self._url, connect_timeout=max(1, int(self.timeout)), autocommit=True)
        except psycopg.OperationalError as exc:
            raise self.unavailable(exc) from None

    def ping(self) -> None:
        """Raise ``StoreUnavailableError`` unless the database answers now."""
        with self.transaction() as conn:
            conn.execute("SELECT 1")

    def migrate(self) -> int:
        """Bring the schema to the last version (creating it on an empty database); the version reached."""
        import psycopg

        conn = self.connect()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())")
                current = conn.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_version").fetchone()[0]
                if current > len(MIGRATIONS):
                    raise InvalidInputError(
                        f"the store {self.where} has schema version {current}, newer than this embedlift's {len(MIGRATIONS)}; upgrade embedlift"
                    )
                for version in range(current + 1, len(MIGRATIONS) + 1):
                    conn.execute(MIGRATIONS[version - 1])
                    conn.execute(f"INSERT INTO {SCHEMA}.schema_version (version) VALUES (%s)", (version,))
                    logger.info("store %s: schema migrated to version %d", self.where, version)
            return len(MIGRATIONS)
        except psycopg.OperationalError as exc:
            raise self.unavailable(exc) from None
        finally:
            conn.close()


def open_store(settings: Any) -> Database | None:
    """The database of ``settings.store`` (migrated, its pool open), or ``None`` for the embedded store."""
    if settings.store is None:
        return None
    return Database(settings.store, pool_size=settings.store_pool, timeout=settings.store_timeout).open()


def _configure(conn: Any) -> None:
    """Every pooled connection gets pgvector's type (numpy arrays in and out of ``vector`` columns)."""
    from pgvector.psycopg import register_vector

    register_vector(conn)
    conn.commit()


def _password(url: str) -> str | None:
    from psycopg.conninfo import conninfo_to_dict

    try:
        password = conninfo_to_dict(url).get("password")
        return str(password) if password else None
    except Exception:  # noqa: BLE001
        return None
