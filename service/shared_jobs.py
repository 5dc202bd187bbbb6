"""Jobs in the PostgreSQL store, so that ``GET /jobs/{id}`` answers the same on every replica, and a job whose
replica dies is finished by another.

A job is a row of ``embedlift.jobs``: kind, status, progress, result (JSON) or error, the replica that runs it
(``owner``) and when that replica last vouched for it (``heartbeat``, refreshed every ``HEARTBEAT`` seconds, or a
third of the lease when that is shorter, while it is queued or runs: its lease) and its input (``spec``). Once
its lease has run out, another replica claims it (``FOR UPDATE SKIP LOCKED``, so exactly one does) and
finishes it: a bulk upsert goes on from the documents already committed (re-upserting by id replaces, so
nothing is duplicated); an evaluation (no side effects), a re-index (staging replaces what was staged; the swap
is one transaction) and the build of an adapter's document view (it fills its table again) start again. A job
without a ``spec`` whose lease ran out is reported failed, saying why.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

import msgspec

from embedlift.service.database import SCHEMA, Database
from embedlift.service.jobs import Job, JobStore

HEARTBEAT = 5.0
#: Kinds another replica can finish from their ``spec`` (``Engine._resumed_work``).
RESUMABLE = ("upsert", "eval", "reindex", "view")


class DatabaseJobStore(JobStore):
    """Jobs as rows; this replica's running jobs get a heartbeat from a daemon thread."""

    def __init__(self, db: Database, lease: float = 30.0) -> None:
        self.db = db
        self.lease = lease
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="jobs-heartbeat", daemon=True).start()

    def add(self, job: Job) -> None:
        spec = None if job.spec is None else msgspec.json.encode(job.spec).decode()
        with self.db.transaction() as conn:
            conn.execute(
                f"INSERT INTO {SCHEMA}.jobs (id, kind, status, done, total, spec, owner, heartbeat) VALUES (%s, %s, %s, %s, %s, %s, %s, now())",
                (job.id, job.kind, job.status, job.done, job.total, spec, self.owner),
            )
        with self._lock:
            self._running[job.id] = job

    def save(self, job: Job) -> None:
        result = None if job.result is None else msgspec.json.encode(job.result).decode()
        error = None if job.error is None else job.error.replace("\x00", "\\x00")  # a text column cannot hold U+0000
        with self.db.transaction() as conn:
            conn.execute(
                f"UPDATE {SCHEMA}.jobs SET status = %s, done = %s, total = %s, result = %s, error = %s, "
                "finished = CASE WHEN %s THEN now() END, heartbeat = now() WHERE id = %s",
                (job.status, job.done, job.total, result, error, job.finished is not None, job.id),
            )
        if job.finished is not None:
            with self._lock:
                self._running.pop(job.id, None)

    def get(self, job_id: str) -> Job | None:
        if "\x00" in job_id:  # not an id this store gave (nor one PostgreSQL can take as a parameter)
            return None
        with self.db.transaction() as conn:
            row = conn.execute(
                f"SELECT id, kind, status, done, total, result, error, extract(epoch FROM created), extract(epoch FROM finished), "
                f"extract(epoch FROM now() - heartbeat), owner, spec IS NOT NULL AND kind = ANY(%s) FROM {SCHEMA}.jobs WHERE id = %s",
                (list(RESUMABLE), job_id),
            ).fetchone()
        if row is None:
            return None
        job = Job(id=row[0], kind=row[1], status=row[2], done=row[3], total=row[4], result=_json(row[5]), error=row[6],
                  created=float(row[7]), finished=None if row[8] is None else float(row[8]))
        if job.status in ("queued", "running") and not row[11] and row[9] is not None and float(row[9]) > self.lease:
            job.status, job.error = "failed", (
                f"the replica running it ({row[10]}) stopped answering {float(row[9]):.0f} s ago; submit the job again"
            )
        return job

    def claim(self) -> Job | None:
        """A resumable job whose replica's lease ran out, now this replica's (at most one replica gets it)."""
        with self.db.transaction() as conn:
            row = conn.execute(
                f"""UPDATE {SCHEMA}.jobs SET owner = %s, heartbeat = now(), status = 'running'
                    WHERE id = (SELECT id FROM {SCHEMA}.jobs WHERE status IN ('queued', 'running') AND kind = ANY(%s) AND spec IS NOT NULL
                                AND heartbeat < now() - make_interval(secs => %s) ORDER BY created FOR UPDATE SKIP LOCKED LIMIT 1)
                    RETURNING id, kind, done, total, spec, extract(epoch FROM created)""",
                (self.owner, list(RESUMABLE), self.lease),
            ).fetchone()
        if row is None:
            return None
        job = Job(id=row[0], kind=row[1], status="running", done=row[2], total=row[3], spec=_json(row[4]), created=float(row[5]), store=self)
        with self._lock:
            self._running[job.id] = job
        return job

    def queued(self) -> int:
        """This replica's jobs waiting to run (each replica runs its own queue)."""
        with self.db.transaction() as conn:
            return int(conn.execute(f"SELECT count(*) FROM {SCHEMA}.jobs WHERE status = 'queued' AND owner = %s", (self.owner,)).fetchone()[0])

    def _beat(self) -> None:
        # a third of the lease at most: a live replica's queued jobs (they report no progress) are never claimed
        while not self._stop.wait(min(HEARTBEAT, self.lease / 3)):
            with self._lock:
                ids = list(self._running)
            if not ids:
                continue
            try:
                with self.db.transaction() as conn:
                    conn.execute(f"UPDATE {SCHEMA}.jobs SET heartbeat = now() WHERE id = ANY(%s)", (ids,))
            except Exception:  # noqa: BLE001 - the database is down: the lease runs out, as it should
                time.sleep(1)

    def close(self) -> None:
        self._stop.set()


def _json(text: str | None) -> Any:
    """A job's spec or result as stored (JSON text, where ``\\u0000`` is six characters PostgreSQL can hold)."""
    return None if text is None else msgspec.json.decode(text)
