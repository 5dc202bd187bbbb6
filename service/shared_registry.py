"""The adapter registry shared by replicas, in the PostgreSQL store (``--store postgresql://...``).

The database is the source of truth; each replica's ``AdapterRegistry`` is a cache of it:

- ``embedlift.adapter_versions``: every registered checkpoint as its two files (``config.json``,
  ``adapter.safetensors``) in ``bytea``, with the sha256 of both (config, then weights), by name and version.
  The newest version of a name is the one served; registering the same files again adds no version.
- ``embedlift.adapter_state``: one row, the active name, the activation history (for rollback) and a
  generation that every change bumps.

Every change is one transaction that ends with ``NOTIFY embedlift_adapters``; each replica LISTENs on its own
connection and, on a notification (or every ``poll`` seconds, in case one was lost while it was disconnected),
compares the generation and *syncs*: it writes new checkpoint files into its adapters directory (verified
against their sha256, renamed into place whole), loads them strictly, and swaps the active adapter. Two
activations at once are two transactions on the same row: the later commit wins, and every replica serves it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from embedlift.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from embedlift.models.errors import CheckpointError, ConflictError, NotFoundError
from embedlift.service.database import SCHEMA, Database
from embedlift.service.registry import BASE, MAX_HISTORY, RegistryState, RegistryStateStore

logger = logging.getLogger(__name__)
CHANNEL = "embedlift_adapters"


def files_sha256(config: bytes, weights: bytes) -> str:
    """The sha256 a checkpoint is stored with: of its config file, then its weights file."""
    return hashlib.sha256(config + weights).hexdigest()


def read_files(path: Path) -> tuple[bytes, bytes]:
    return (path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes()


@dataclass(frozen=True)
class Snapshot:
    """The registry as the database has it: the generation, the active name, each name's newest version."""

    generation: int
    active: str | None
    adapters: dict[str, tuple[int, str]]  # name -> (version, sha256)


class DatabaseAdapters(RegistryStateStore):
    """Checkpoints, versions, the active adapter and its history in the database; thread-safe.

    It is also the registry's ``RegistryStateStore`` (``peek_active`` before the registry loads), though the
    shared registry writes through its own methods rather than ``save``.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    # RegistryStateStore (what the single-process registry uses) --------------------------------------
    def load(self) -> RegistryState:
        snap = self.snapshot()
        return RegistryState(active=snap.active, versions={n: v for n, (v, _) in snap.adapters.items()})

    def save(self, state: RegistryState) -> None:
        """Unused: every change of a shared registry is its own transaction (``put``, ``activate``, ...)."""

    def peek_active(self) -> str | None:
        return self.snapshot().active

    # reads -------------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self.db.transaction() as conn:
            generation, active = conn.execute(f"SELECT generation, active FROM {SCHEMA}.adapter_state WHERE id = 1").fetchone()
            rows = conn.execute(
                f"SELECT DISTINCT ON (name) name, version, sha256 FROM {SCHEMA}.adapter_versions ORDER BY name, version DESC"
            ).fetchall()
        return Snapshot(generation=generation, active=active, adapters={n: (v, h) for n, v, h in rows})

    def generation(self) -> int:
        with self.db.transaction() as conn:
            return int(conn.execute(f"SELECT generation FROM {SCHEMA}.adapter_state WHERE id = 1").fetchone()[0])

    def files(self, name: str, version: int) -> tuple[bytes, bytes]:
        """A version's two files, checked against their sha256.

        Raises:
            CheckpointError: The stored bytes do not hash to the recorded sha256.
        """
        with self.db.transaction() as conn:
            row = conn.execute(
                f"SELECT config, weights, sha256 FROM {SCHEMA}.adapter_versions WHERE name = %s AND version = %s", (name, version)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"adapter {name!r} version {version} is not in the store")
        config, weights, sha = bytes(row[0]), bytes(row[1]), row[2]
        if files_sha256(config, weights) != sha:
            raise CheckpointError(f"adapter {name!r} version {version} in {self.db.where} does not match its sha256; register it again")
        return config, weights

    def materialise(self, adapters_dir: Path, name: str, version: int, sha256: str) -> Path:
        """Write a version's files (``sha256``: as the snapshot lists them) to ``adapters_dir/name`` (whole, by a
        rename), unless the files there already hash to it: then nothing is read from the database."""
        target = adapters_dir / name
        if target.is_dir() and (target / CONFIG_FILE).is_file() and (target / WEIGHTS_FILE).is_file():
            if files_sha256(*read_files(target)) == sha256:
                return target
        config, weights = self.files(name, version)
        adapters_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.sync-", dir=adapters_dir))
        try:
            (tmp / CONFIG_FILE).write_bytes(config)
            (tmp / WEIGHTS_FILE).write_bytes(weights)
            from embedlift.models.checkpoint import replace_dir

            replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def materialise_active(self, adapters_dir: Path) -> None:
        """The active adapter's files in ``adapters_dir`` (read before the base loads, for its base settings)."""
        snap = self.snapshot()
        if snap.active is not None and snap.active in snap.adapters:
            self.materialise(adapters_dir, snap.active, *snap.adapters[snap.active])

    # changes: each one transaction, bumping the generation and notifying every replica ---------------
    def _changed(self, conn: Any) -> None:
        generation = conn.execute(f"UPDATE {SCHEMA}.adapter_state SET generation = generation + 1 WHERE id = 1 RETURNING generation").fetchone()[0]
        conn.execute(f"SELECT pg_notify('{CHANNEL}', %s)", (str(generation),))

    def put(self, name: str, config: bytes, weights: bytes) -> int:
        """Store a checkpoint's files as the newest version of ``name`` (the same files again: no new version);
        its version."""
        sha = files_sha256(config, weights)
        with self.db.transaction() as conn:
            conn.execute(f"SELECT 1 FROM {SCHEMA}.adapter_state WHERE id = 1 FOR UPDATE")  # versions are numbered one at a time
            row = conn.execute(
                f"SELECT version, sha256 FROM {SCHEMA}.adapter_versions WHERE name = %s ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
            if row is not None and row[1] == sha:
                return int(row[0])
            version = 1 if row is None else int(row[0]) + 1
            conn.execute(
                f"INSERT INTO {SCHEMA}.adapter_versions (name, version, sha256, config, weights) VALUES (%s, %s, %s, %s, %s)",
                (name, version, sha, config, weights),
            )
            self._changed(conn)
        return version

    def activate(self, name: str | None) -> None:
        """Make ``name`` (``None``: the base) the active adapter of every replica."""
        with self.db.transaction() as conn:
            active, history = conn.execute(f"SELECT active, history FROM {SCHEMA}.adapter_state WHERE id = 1 FOR UPDATE").fetchone()
            if name is not None and conn.execute(f"SELECT 1 FROM {SCHEMA}.adapter_versions WHERE name = %s LIMIT 1", (name,)).fetchone() is None:
                names = [r[0] for r in conn.execute(f"SELECT DISTINCT name FROM {SCHEMA}.adapter_versions ORDER BY name")]
                raise NotFoundError(f"unknown adapter {name!r}; available: {[BASE, *names]}")
            if name != active:
                history = [*history, active][-MAX_HISTORY:]
            conn.execute(f"UPDATE {SCHEMA}.adapter_state SET active = %s, history = %s WHERE id = 1", (name, msgspec.json.encode(history).decode()))
            self._changed(conn)

    def rollback(self) -> None:
        """Back to the previously active adapter (skipping ones deleted since)."""
        with self.db.transaction() as conn:
            history = conn.execute(f"SELECT history FROM {SCHEMA}.adapter_state WHERE id = 1 FOR UPDATE").fetchone()[0]
            names = {r[0] for r in conn.execute(f"SELECT DISTINCT name FROM {SCHEMA}.adapter_versions")}
            while history:
                previous = history.pop()
                if previous is None or previous in names:
                    conn.execute(
                        f"UPDATE {SCHEMA}.adapter_state SET active = %s, history = %s WHERE id = 1", (previous, msgspec.json.encode(history).decode())
                    )
                    self._changed(conn)
                    return
            raise ConflictError("no previously active adapter to roll back to")

    def delete(self, name: str) -> None:
        """Remove every version of ``name``; the active adapter cannot be deleted."""
        with self.db.transaction() as conn:
            active = conn.execute(f"SELECT active FROM {SCHEMA}.adapter_state WHERE id = 1 FOR UPDATE").fetchone()[0]
            if active == name:
                raise ConflictError(f"adapter {name!r} is active; activate another (or 'base') before deleting it")
            if conn.execute(f"DELETE FROM {SCHEMA}.adapter_versions WHERE name = %s", (name,)).rowcount == 0:
                raise NotFoundError(f"unknown adapter {name!r}")
            self._changed(conn)

    def wait(self, conn: Any, timeout: float) -> None:
        """Block until a notification arrives on ``conn`` (LISTENing) or ``timeout`` passes."""
        for _ in conn.notifies(timeout=timeout, stop_after=1):
            pass
