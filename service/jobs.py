"""Background jobs: evaluations, bulk upserts and re-indexes past a size bound run here, so they never hold an
HTTP request (or the event loop) for minutes. One worker thread runs them in order; ``GET /jobs/{id}`` shows
status and progress, and the result when done.

Where jobs are kept is an interface of its own (``JobStore``): ``MemoryJobStore`` keeps them in this process (a
restart forgets them; a bulk upsert's committed batches stay committed); a store shared by replicas (the
PostgreSQL issue's) lets any replica answer for any job.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
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
    """One background job. ``done`` of ``total`` is its progress in its own unit (texts, documents)."""

    id: str
    kind: str
    status: JobStatus = "queued"
    done: int = 0
    total: int = 0
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    store: JobStore | None = field(default=None, repr=False, compare=False)
    #: JSON that lets another replica resume the job (a resumable kind's input); ``None``: not resumable.
    spec: Any = field(default=None, repr=False, compare=False)

    def report(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self.store is not None:
            self.store.save(self)


class JobStore(ABC):
    """Where jobs are kept: added when submitted, saved on every change of status or progress."""

    @abstractmethod
    def add(self, job: Job) -> None: ...

    @abstractmethod
    def save(self, job: Job) -> None: ...

    @abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def queued(self) -> int:
        """Jobs waiting to run."""

    def close(self) -> None:
        """Stop what the store runs of its own."""


class MemoryJobStore(JobStore):
    """Jobs in this process: the last ``keep`` finished ones and every unfinished one."""

    def __init__(self, keep: int = KEEP_FINISHED) -> None:
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
            finished = [j.id for j in self._jobs.values() if j.finished is not None]
            for job_id in finished[: max(0, len(finished) - self.keep)]:
                del self._jobs[job_id]

    def save(self, job: Job) -> None:
        """Nothing to write: the job object is the record."""

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def queued(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.status == "queued")


class JobRunner:
    """Runs jobs one at a time on a worker thread; at most ``max_queued`` wait (429 beyond)."""

    def __init__(self, store: JobStore | None = None, max_queued: int = 16) -> None:
        self.store = store or MemoryJobStore()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")
        self._lock = threading.Lock()
        self.max_queued = max_queued

    def submit(self, kind: str, work: Callable[[Job], Any], total: int = 0, spec: Any = None, job_id: str | None = None) -> Job:
        """Queue ``work``; ``spec`` (JSON) is what a shared store keeps so another replica can resume the job;
        ``job_id``: an id the caller chose (it named the job before submitting it)."""
        with self._lock:
            waiting = self.store.queued()
            if waiting >= self.max_queued:
                raise OverloadedError(f"{waiting} background jobs are queued (maximum {self.max_queued}); retry later", retry_after=5)
            job = Job(id=job_id or uuid.uuid4().hex, kind=kind, total=total, store=self.store, spec=spec)
            self.store.add(job)
        self._pool.submit(self._run, job, work)
        return job

    def resume(self, job: Job, work: Callable[[Job], Any]) -> None:
        """Run a job another replica left unfinished (claimed from the shared store)."""
        job.store = self.store
        self._pool.submit(self._run, job, work)

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        job.status = "running"
        self.store.save(job)
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
            self.store.save(job)

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            where = f"in memory until restart (the last {KEEP_FINISHED} finished)" if isinstance(self.store, MemoryJobStore) else "in the store"
            raise NotFoundError(f"unknown job {job_id!r}; jobs are kept {where}")
        return job

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()
