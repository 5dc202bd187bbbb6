"""Background jobs: evaluations and bulk upserts past a size bound run here, so they never hold an HTTP
request (or the event loop) for minutes. One worker thread runs them in order; ``GET /jobs/{id}`` shows
status and progress, and the result when done. Jobs live in memory: a restart forgets them (a bulk upsert's
committed batches stay committed)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from embedlift.models.errors import EmbedliftError, NotFoundError, OverloadedError

logger = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed"]
KEEP_FINISHED = 100


@dataclass
class Job:
    """One background job. ``progress`` is ``(done, total)`` in the job's own unit (texts, documents)."""

    id: str
    kind: str
    status: JobStatus = "queued"
    done: int = 0
    total: int = 0
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def report(self, done: int, total: int) -> None:
        self.done, self.total = done, total


class JobRunner:
    """Runs jobs one at a time on a worker thread; at most ``max_queued`` wait (429 beyond)."""

    def __init__(self, max_queued: int = 16) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self.max_queued = max_queued

    def submit(self, kind: str, work: Callable[[Job], Any], total: int = 0) -> Job:
        with self._lock:
            waiting = sum(1 for j in self._jobs.values() if j.status == "queued")
            if waiting >= self.max_queued:
                raise OverloadedError(f"{waiting} background jobs are queued (maximum {self.max_queued}); retry later", retry_after=5)
            job = Job(id=uuid.uuid4().hex, kind=kind, total=total)
            self._jobs[job.id] = job
            self._forget_old()
        self._pool.submit(self._run, job, work)
        return job

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        job.status = "running"
        try:
            job.result = work(job)
            job.status = "succeeded"
        except EmbedliftError as exc:
            job.error, job.status = exc.message, "failed"
        except Exception as exc:  # a job's failure is its result; the server goes on
            logger.exception("job %s (%s) failed", job.id, job.kind)
            job.error, job.status = f"internal error: {exc}", "failed"
        finally:
            job.finished = time.time()

    def get(self, job_id: str) -> Job:
        with self._lock:
            try:
                return self._jobs[job_id]
            except KeyError:
                raise NotFoundError(f"unknown job {job_id!r}; jobs are kept in memory until restart (the last {KEEP_FINISHED} finished)") from None

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.finished is not None]
        for job_id in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job_id]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
