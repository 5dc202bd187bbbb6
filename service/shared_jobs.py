"""Jobs in the PostgreSQL store, so that ``GET /jobs/{id}`` answers the same on every replica.

A job is a row of ``embedlift.jobs``: kind, status, progress, result (JSON) or error, the replica that runs it
(``owner``) and when that replica last vouched for it (``heartbeat``, refreshed every ``HEARTBEAT`` seconds
while it runs). A job whose replica stopped vouching for ``LEASE`` seconds (it was killed, or lost the
database) is reported as failed with that reason, so nobody waits on it forever.

Not yet: another replica picking such a job up and finishing it (the jobs' inputs are not stored, only
their progress); see the PostgreSQL issue's notes.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import msgspec

from embedlift.service.database import SCHEMA, Database
from embedlift.service.jobs import Job, JobStore

HEARTBEAT = 5.0
LEASE = 30.0


class DatabaseJobStore(JobStore):
    """Jobs as rows; this replica's running jobs get a heartbeat from a daemon thread."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="jobs-heartbeat", daemon=True).start()

    def add(self, job: Job) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                f"INSERT INTO {SCHEMA}.jobs (id, kind, status, done, total, owner, heartbeat) VALUES (%s, %s, %s, %s, %s, %s, now())",
                (job.id, job.kind, job.status, job.done, job.total, self.owner),
            )
        with self._lock:
            self._running[job.id] = job

    def save(self, job: Job) -> None:
        result = None if job.result is None else msgspec.json.encode(job.result).decode()
        with self.db.transaction() as conn:
            conn.execute(
                f"UPDATE {SCHEMA}.jobs SET status = %s, done = %s, total = %s, result = %s, error = %s, "
                "finished = CASE WHEN %s THEN now() END, heartbeat = now() WHERE id = %s",
                (job.status, job.done, job.total, result, job.error, job.finished is not None, job.id),
            )
        if job.finished is not None:
            with self._lock:
                self._running.pop(job.id, None)

    def get(self, job_id: str) -> Job | None:
        with self.db.transaction() as conn:
            row = conn.execute(
                f"SELECT id, kind, status, done, total, result, error, extract(epoch FROM created), extract(epoch FROM finished), "
                f"extract(epoch FROM now() - heartbeat), owner FROM {SCHEMA}.jobs WHERE id = %s",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        job = Job(id=row[0], kind=row[1], status=row[2], done=row[3], total=row[4], result=row[5], error=row[6],
                  created=float(row[7]), finished=None if row[8] is None else float(row[8]))
        if job.status in ("queued", "running") and row[9] is not None and float(row[9]) > LEASE:
            job.status, job.error = "failed", (
                f"the replica running it ({row[10]}) stopped answering {float(row[9]):.0f} s ago; its committed batches stay "
                "committed: submit the job again (re-upserting the same documents replaces them)"
            )
        return job

    def queued(self) -> int:
        """This replica's jobs waiting to run (each replica runs its own queue)."""
        with self.db.transaction() as conn:
            return int(conn.execute(f"SELECT count(*) FROM {SCHEMA}.jobs WHERE status = 'queued' AND owner = %s", (self.owner,)).fetchone()[0])

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
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

