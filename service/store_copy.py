"""``embedlift store copy --from DATA_DIR --to postgresql://...``: move an embedded deployment into the shared
store, without re-embedding anything.

Copied: every collection (its settings, documents, window spans, base vectors and lexical postings, with the
record of the analyzer that made them), the adapter checkpoints with their version numbers, and the active
adapter with its rollback history. Each collection is checked after its copy (documents, windows and windows
with postings, on both sides); a collection that already exists in the target is refused, naming it, so a copy
never merges into live data. The source is only read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from embedlift.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from embedlift.models.errors import ConflictError, InvalidInputError
from embedlift.service.collections.manager import DirectoryHome
from embedlift.service.collections.postgres import PostgresHome
from embedlift.service.collections.sqlite import SQLiteStore
from embedlift.service.database import SCHEMA, Database
from embedlift.service.registry import RegistryFile
from embedlift.service.shared_registry import files_sha256, read_files

logger = logging.getLogger(__name__)


@dataclass
class CopyReport:
    """What was copied: per collection ``(documents, windows)``, per adapter its version, the active one."""

    collections: dict[str, tuple[int, int]] = field(default_factory=dict)
    adapters: dict[str, int] = field(default_factory=dict)
    active: str | None = None


def copy_collections(data_dir: Path, db: Database, report: CopyReport) -> None:
    source = DirectoryHome(data_dir / "collections")
    if not source.root.is_dir():
        return
    target = PostgresHome(db)
    existing = set(target.names())
    names = source.names()
    if clash := sorted(set(names) & existing):
        raise ConflictError(f"collections {clash} already exist in {db.where}; delete them there first (a copy never merges)")
    for name in names:
        src = SQLiteStore(source.path(name))
        try:
            config = src.read_config()
            target.create(config, None)  # postings marked complete only once they are all there
            dst = target.open(name)
            for batch in src.export():
                dst.upsert(batch)
            if (state := src.postings_state()) is not None:
                dst.mark_postings(state)
            want, got = src.count(), dst.count()
            want_lexical = sum(1 for p in src.iter_postings() for _ in p.keys)
            got_lexical = _lexical_windows(db, dst.cid)
            if want != got or want_lexical != got_lexical:
                target.delete(name)
                raise InvalidInputError(
                    f"collection {name!r}: copied {got} (documents, windows) and {got_lexical} indexed windows, expected {want} and "
                    f"{want_lexical}; the copy was removed from the target"
                )
            report.collections[name] = got
            logger.info("collection %s copied: %d documents, %d windows", name, *got)
        finally:
            src.close()


def _lexical_windows(db: Database, cid: int) -> int:
    with db.transaction() as conn:
        return int(conn.execute(f"SELECT lexical_windows FROM {SCHEMA}.collections WHERE id = %s", (cid,)).fetchone()[0])


def copy_registry(data_dir: Path, adapters_dir: Path, db: Database, report: CopyReport) -> None:
    """The checkpoints (with the version numbers the embedded registry gave them), the active adapter and
    its history."""
    state = RegistryFile(data_dir / "registry.json").load()
    with db.transaction() as conn:
        if conn.execute(f"SELECT 1 FROM {SCHEMA}.adapter_versions LIMIT 1").fetchone() is not None:
            raise ConflictError(f"{db.where} already has adapters; copy into a store without any")
        names = sorted(p.name for p in adapters_dir.iterdir() if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()) if adapters_dir.is_dir() else []
        for name in names:
            config, weights = read_files(adapters_dir / name)
            version = max(state.versions.get(name, 1), 1)
            conn.execute(
                f"INSERT INTO {SCHEMA}.adapter_versions (name, version, sha256, config, weights) VALUES (%s, %s, %s, %s, %s)",
                (name, version, files_sha256(config, weights), config, weights),
            )
            report.adapters[name] = version
        active = state.active if state.active in report.adapters else None
        history = [h for h in state.history if h is None or h in report.adapters]
        conn.execute(
            f"UPDATE {SCHEMA}.adapter_state SET active = %s, history = %s, generation = generation + 1 WHERE id = 1",
            (active, msgspec.json.encode(history).decode()),
        )
        report.active = active


def copy_store(data_dir: Path, adapters_dir: Path, url: str) -> CopyReport:
    """Copy the embedded state under ``data_dir`` (and the checkpoints in ``adapters_dir``) into ``url``."""
    db = Database(url).open()
    report = CopyReport()
    try:
        copy_registry(data_dir, adapters_dir, db, report)
        copy_collections(data_dir, db, report)
    finally:
        db.close()
    return report
