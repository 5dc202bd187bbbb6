"""The adapter registry: which checkpoints the service serves, their versions, and which one is active.

Checkpoints live as directories in the adapters directory (one per name). The registry's own state, the
version of each name, the active name and the activation history (for rollback), is kept by a
``RegistryStateStore``: ``RegistryFile`` is one small JSON file in the data directory, rewritten atomically (temp
file, fsync, ``os.replace``) on every change, so the active adapter survives a restart; a store shared by
replicas (the PostgreSQL issue's) keeps it in the database.

A hot swap loads and validates the new checkpoint completely (strict load, same base fingerprint and
dimension) before it replaces one reference under the lock; a request that resolved the old adapter keeps
it to the end. A checkpoint that fails validation raises, and nothing changes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from embedlift.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, BaseInfo, Checkpoint, atomic_write, load_checkpoint, replace_dir
from embedlift.models.errors import CheckpointError, ConflictError, EmbedliftError, InvalidInputError, NotFoundError, TooLargeError
from embedlift.service.collections.names import check_name

if TYPE_CHECKING:
    from embedlift.service.shared_registry import DatabaseAdapters

logger = logging.getLogger(__name__)

BASE = "base"
MAX_HISTORY = 32


@dataclass(frozen=True)
class LoadedAdapter:
    """A registered adapter: its registry name and version, and the loaded checkpoint."""

    name: str
    version: int
    checkpoint: Checkpoint
    signature: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


class RegistryState(msgspec.Struct, kw_only=True):
    """What must survive a restart."""

    active: str | None = None
    history: list[str | None] = []  # previously active names, most recent last (None = the base)
    versions: dict[str, int] = {}
    signatures: dict[str, str] = {}


class RegistryStateStore(ABC):
    """Where the registry's state is kept: read once at start, written on every change."""

    @abstractmethod
    def load(self) -> RegistryState:
        """The saved state (an empty one when there is none, or when it cannot be read: the checkpoints are
        the source of truth and are registered again)."""

    @abstractmethod
    def save(self, state: RegistryState) -> None:
        """Replace the saved state; durable when it returns."""

    @abstractmethod
    def peek_active(self) -> str | None:
        """The remembered active adapter, read without side effects (before the registry loads)."""


class RegistryFile(RegistryStateStore):
    """``registry.json`` in the data directory, replaced atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> RegistryState:
        if not self.path.is_file():
            return RegistryState()
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=RegistryState)
        except msgspec.DecodeError as exc:
            # Written atomically, so only outside hands damage it: keep it aside and start empty.
            aside = self.path.with_name(f"{self.path.name}.damaged")
            os.replace(self.path, aside)
            logger.error("%s is damaged (%s); moved to %s, re-registering the checkpoints with no adapter active", self.path, exc, aside)
            return RegistryState()

    def save(self, state: RegistryState) -> None:
        atomic_write(self.path, msgspec.json.encode(state))

    def peek_active(self) -> str | None:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=RegistryState).active
        except (OSError, msgspec.DecodeError):
            return None


def signature(path: Path) -> str:
    """A hash of a checkpoint's two files: a changed checkpoint in the watched directory is a new version."""
    h = hashlib.blake2b(digest_size=16)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update((path / name).read_bytes())
    return h.hexdigest()


class AdapterRegistry:
    """Adapters by name; thread-safe.

    Args:
        adapters_dir: Directory of checkpoint directories.
        state: Where the versions, the active adapter and the history are kept.
        base: The base in use; checkpoints trained on another are refused, naming what differs.
        on_change: Called (outside the lock) after an adapter is registered, so derived state (collection
            views of ``apply_to: both`` adapters) can be built before the adapter is activated.
        shared: The registry replicas share (``service/shared_registry.py``): every change is written there
            first and this registry follows it (on a notification, or every ``poll`` seconds).
        poll: Seconds between checks of the shared registry when no notification came.
    """

    def __init__(
        self,
        adapters_dir: Path,
        state: RegistryStateStore,
        base: BaseInfo,
        on_change: Callable[[LoadedAdapter], None] | None = None,
        *,
        shared: DatabaseAdapters | None = None,
        poll: float = 5.0,
    ) -> None:
        self.adapters_dir = adapters_dir
        self.state = state
        self.shared = shared
        self.poll = poll
        self._sync_lock = threading.Lock()
        self._generation = -1
        self._listener: threading.Thread | None = None
        self.base = base
        self.on_change = on_change
        self._lock = threading.RLock()
        self._adapters: dict[str, LoadedAdapter] = {}
        self._active: LoadedAdapter | None = None
        self._state = RegistryState()
        self._failed: dict[str, str] = {}  # watched directories that failed: their signature, or why they are unreadable
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ start-up
    def load(self, override_active: str | None = None) -> None:
        """Read the state, register every valid checkpoint in the adapters directory, restore the active one.

        ``override_active`` (``serve --adapter``) wins over the remembered active adapter. A shared registry
        first follows the database (its versions written over whatever this directory held: the database is
        the truth, and a replica that was down must not push back older files), then puts the directory's
        new checkpoints into it, activates ``override_active`` for every replica, and listens for changes.
        """
        if self.shared is not None:
            self.sync()
            self.scan()
            if override_active is not None:
                self.shared.activate(None if override_active == BASE else override_active)
            self.sync()
            self._listener = threading.Thread(target=self._listen, name="adapters-listen", daemon=True)
            self._listener.start()
            return
        self._state = self.state.load()
        self.scan()
        wanted = override_active if override_active is not None else self._state.active
        if wanted is not None and wanted != BASE:
            if wanted not in self._adapters:
                if override_active is not None:
                    self._get(wanted)  # raises with the names available
                logger.warning("the remembered active adapter %r is gone; serving the base", wanted)
                wanted = None
        with self._lock:
            self._active = self._adapters.get(wanted) if wanted not in (None, BASE) else None
            self._state.active = self._active.name if self._active else None
            self._save()

    def scan(self) -> list[str]:
        """Register checkpoints in the adapters directory that are new or changed; returns their labels.
        A directory that fails to load is logged once per content and skipped."""
        if not self.adapters_dir.is_dir():
            return []
        changed = []
        for path in sorted(self.adapters_dir.iterdir()):
            if path.name.startswith(".") or not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
                continue
            try:
                check_name(path.name, "adapter")
                sig = signature(path)
            except (EmbedliftError, OSError) as exc:
                reason = exc.message if isinstance(exc, EmbedliftError) else str(exc)  # e.g. not readable by this user
                if self._failed.get(path.name) != reason:
                    logger.warning("adapter %s not loaded: %s", path, reason)
                    self._failed[path.name] = reason
                continue
            with self._lock:
                current = self._adapters.get(path.name)
                if (current is not None and current.signature == sig) or self._failed.get(path.name) == sig:
                    continue
                known_same = current is None and self._state.signatures.get(path.name) == sig
            try:
                loaded = self._register(path.name, bump=not known_same)
            except EmbedliftError as exc:
                logger.warning("adapter %s not loaded: %s", path, exc.message)
                self._failed[path.name] = sig
                continue
            changed.append(loaded.label)
        return changed

    def watch(self, interval: float = 2.0) -> None:
        """Poll the adapters directory in a daemon thread: a checkpoint dropped there appears without a call."""

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    for label in self.scan():
                        logger.info("adapter %s registered from the adapters directory", label)
                except Exception:
                    logger.exception("scanning %s failed", self.adapters_dir)

        self._watcher = threading.Thread(target=loop, name="adapters-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    # ----------------------------------------------------------------------------------------- queries
    @property
    def active(self) -> LoadedAdapter | None:
        return self._active

    def all(self) -> list[LoadedAdapter]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda a: a.name)

    def _get(self, name: str) -> LoadedAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise NotFoundError(f"unknown adapter {name!r}; available: {[BASE, *sorted(self._adapters)]}", field="adapter") from None

    def resolve(self, name: str | None) -> LoadedAdapter | None:
        """``None``: the active adapter (or the base when none is active); ``"base"``: no adapter."""
        if name == BASE:
            return None
        with self._lock:
            return self._active if name is None else self._get(name)

    # ---------------------------------------------------------------------------------------- changes
    def _load(self, path: Path) -> Checkpoint:
        return load_checkpoint(path, expected=self.base)

    def _register(self, name: str, *, bump: bool = True) -> LoadedAdapter:
        """Load ``adapters_dir/name`` strictly (off the lock), then swap it in (a shared registry: store it in
        the database, then follow the database, which loads it here and on every replica)."""
        path = self.adapters_dir / name
        checkpoint = self._load(path)
        if self.shared is not None:
            from embedlift.service.shared_registry import read_files

            self.shared.put(name, *read_files(path))
            self.sync()
            return self._get(name)
        sig = signature(path)
        with self._lock:
            version = self._state.versions.get(name, 0) + (1 if bump else 0)
            loaded = LoadedAdapter(name=name, version=max(version, 1), checkpoint=checkpoint, signature=sig)
        if self.on_change is not None:
            self.on_change(loaded)  # e.g. build document views before anyone can be served by it
        with self._lock:
            self._adapters[name] = loaded
            self._state.versions[name] = loaded.version
            self._state.signatures[name] = sig
            self._failed.pop(name, None)
            if self._active is not None and self._active.name == name:
                self._active = loaded  # re-registering the active name swaps it in place
            self._save()
        return loaded

    def register_name(self, name: str) -> LoadedAdapter:
        """Register (or re-register, as a new version) the checkpoint ``adapters_dir/name``.

        Only a plain directory name is accepted and the resolved path must stay inside the adapters directory
        (no ``..``, no absolute paths, no symlink out of it).
        """
        check_name(name, "adapter")
        root = self.adapters_dir.resolve()
        path = (self.adapters_dir / name).resolve()
        if path.parent != root:
            raise InvalidInputError(f"adapter {name!r} resolves outside the adapters directory; refused")
        if not path.is_dir():
            raise NotFoundError(
                f"no checkpoint directory {name!r} in the adapters directory {self.adapters_dir}; "
                f"present: {sorted(p.name for p in self.adapters_dir.iterdir() if p.is_dir()) if self.adapters_dir.is_dir() else []}"
            )
        return self._register(name)

    def register_tar(self, data: bytes, name: str | None = None) -> LoadedAdapter:
        """Register a checkpoint uploaded as a tar (optionally gzipped) of its directory.

        The archive is unpacked with tarfile's ``data`` filter (no absolute paths, no ``..``, no links out,
        no devices) into a hidden temp directory inside the adapters directory, validated by a strict load,
        then renamed into place as ``adapters_dir/<name>`` (``name`` defaults to the checkpoint's own name).
        """
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.adapters_dir))
        try:
            try:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                    check_members(tar.getmembers())
                    tar.extractall(tmp / "x", filter="data")  # and the stdlib's own guard, as a second line
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise InvalidInputError(f"the upload is not a safe, readable tar archive ({exc}); send `tar -c -C DIR .`") from exc
            root = _checkpoint_root(tmp / "x")
            try:
                checkpoint = self._load(root)  # validate before touching anything
            except CheckpointError as exc:  # name the uploaded file, not the server's temporary path
                raise type(exc)(exc.message.replace(f"{root}/", "uploaded ").replace(str(root), "the upload")) from None
            target = check_name(name or checkpoint.config.name, "adapter")
            with self._lock:
                replace_dir(root, self.adapters_dir / target)
            return self._register(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def activate(self, name: str) -> LoadedAdapter | None:
        """Make ``name`` (or ``base``) the adapter served when a request names none."""
        if self.shared is not None:
            self.shared.activate(None if name == BASE else name)
            self.sync()
            return self._active
        with self._lock:
            new = None if name == BASE else self._get(name)
            previous = self._active.name if self._active else None
            if (new.name if new else None) != previous:
                self._state.history = [*self._state.history, previous][-MAX_HISTORY:]
            self._active = new
            self._state.active = new.name if new else None
            self._save()
            return new

    def rollback(self) -> LoadedAdapter | None:
        """Back to the previously active adapter (skipping ones deleted since)."""
        if self.shared is not None:
            self.shared.rollback()
            self.sync()
            return self._active
        with self._lock:
            while self._state.history:
                previous = self._state.history.pop()
                if previous is None or previous in self._adapters:
                    self._active = self._adapters[previous] if previous else None
                    self._state.active = previous
                    self._save()
                    return self._active
            raise ConflictError("no previously active adapter to roll back to")

    def delete(self, name: str) -> None:
        """Unregister ``name`` and remove its directory (else the watcher would register it again).
        The active adapter cannot be deleted: activate another (or ``base``) first."""
        if self.shared is not None:
            self.shared.delete(name)
            self.sync()
            return
        with self._lock:
            loaded = self._get(name)
            if self._active is not None and self._active.name == name:
                raise ConflictError(f"adapter {name!r} is active; activate another (or 'base') before deleting it")
            del self._adapters[name]
            self._state.signatures.pop(name, None)
            self._save()
            self._remove_directory(name)
        logger.info("adapter %s deleted", loaded.label)

    def _remove_directory(self, name: str) -> None:
        """Remove ``adapters_dir/name`` (renamed aside first, then deleted), else the watcher would register it
        again."""
        path = self.adapters_dir / name
        if path.is_dir():
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.deleted-", dir=self.adapters_dir))
            os.replace(path, trash / "ckpt")
            shutil.rmtree(trash, ignore_errors=True)

    def _save(self) -> None:
        if self.shared is None:
            self.state.save(self._state)

    # ------------------------------------------------------------------------------- shared registry
    def sync(self) -> None:
        """Follow the shared registry: load the versions this replica lacks (their files written into the
        adapters directory first), drop the names it no longer has, serve its active adapter."""
        assert self.shared is not None
        with self._sync_lock:
            snap = self.shared.snapshot()
            for name, (version, sha) in sorted(snap.adapters.items()):
                current = self._adapters.get(name)
                if current is not None and current.version == version:
                    continue
                if self._failed.get(name) == sha:
                    continue
                try:
                    path = self.shared.materialise(self.adapters_dir, name, version, sha)
                    loaded = LoadedAdapter(name=name, version=version, checkpoint=self._load(path), signature=signature(path))
                except EmbedliftError as exc:
                    logger.warning("adapter %s@%d from the store not loaded here: %s", name, version, exc.message)
                    self._failed[name] = sha
                    continue
                if self.on_change is not None:
                    self.on_change(loaded)
                with self._lock:
                    self._adapters[name] = loaded
                    self._failed.pop(name, None)
                logger.info("adapter %s loaded from the store", loaded.label)
            for name in sorted(set(self._adapters) - set(snap.adapters)):
                with self._lock:
                    del self._adapters[name]
                self._remove_directory(name)
                logger.info("adapter %s deleted in the store", name)
            with self._lock:
                active = self._adapters.get(snap.active) if snap.active else None
                if snap.active and active is None:
                    logger.error("the store's active adapter %r cannot be served here; serving the base", snap.active)
                if (active.label if active else None) != (self._active.label if self._active else None):
                    logger.info("active adapter: %s", active.label if active else BASE)
                self._active = active
            self._generation = snap.generation

    def _listen(self) -> None:
        """LISTEN for the shared registry's notifications on a connection of its own, syncing on each one and
        every ``poll`` seconds (a notification sent while this replica was disconnected is not replayed)."""
        from embedlift.service.shared_registry import CHANNEL

        assert self.shared is not None
        while not self._stop.is_set():
            conn = None
            try:
                conn = self.shared.db.connect()
                conn.execute(f"LISTEN {CHANNEL}")
                while not self._stop.is_set():
                    if self.shared.generation() != self._generation:
                        self.sync()
                    self.shared.wait(conn, self.poll)
            except Exception as exc:  # noqa: BLE001 - the database may be down: retry, the service keeps serving
                if not self._stop.is_set():
                    logger.warning("following the shared adapter registry: %s; retrying", getattr(exc, "message", exc))
                    self._stop.wait(1.0)
            finally:
                if conn is not None:
                    conn.close()


MAX_UNPACKED = 4 << 30  # bytes a checkpoint upload may unpack to (a gzip bomb is refused before writing)
MAX_MEMBERS = 64


def check_members(members: list[tarfile.TarInfo]) -> None:
    """Only plain files and directories, with relative paths that stay inside, of a bounded total size: the
    refusal names the member, so the sender knows what to fix."""
    if len(members) > MAX_MEMBERS:
        raise InvalidInputError(f"the archive has {len(members)} entries > {MAX_MEMBERS}; a checkpoint is {CONFIG_FILE} + {WEIGHTS_FILE}")
    total = 0
    for m in members:
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts:
            raise InvalidInputError(f"archive entry {m.name!r} points outside the checkpoint; use relative paths (`tar -c -C DIR .`)")
        if not (m.isfile() or m.isdir()):
            kind = "link" if m.issym() or m.islnk() else "device or special file"
            raise InvalidInputError(f"archive entry {m.name!r} is a {kind}; a checkpoint holds only regular files")
        total += m.size
        if total > MAX_UNPACKED:
            raise TooLargeError(f"the archive unpacks to more than {MAX_UNPACKED} bytes; a checkpoint is far smaller")


def _checkpoint_root(folder: Path) -> Path:
    """The directory holding ``config.json`` in an unpacked upload: the root or its single sub-directory."""
    if (folder / CONFIG_FILE).is_file():
        return folder
    entries = [p for p in folder.iterdir()] if folder.is_dir() else []
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / CONFIG_FILE).is_file():
        return entries[0]
    raise InvalidInputError(
        f"the archive holds no {CONFIG_FILE} at its root or in a single top-level directory; "
        f"make it with `tar -c -C adapters/NAME .`"
    )
