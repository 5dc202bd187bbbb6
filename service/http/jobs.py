"""Background jobs: large upserts, evaluations and re-indexes answer 202 with a job; this route reports on it."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.params import FromPath

from embedlift.service.http.state import EngineDep
from embedlift.service.http.openapi import READ, SECURITY, errors
from embedlift.service.jobs import Job
from embedlift.service.schemas import JobAccepted, JobInfo


def job_info(job: Job) -> JobInfo:
    return JobInfo(id=job.id, kind=job.kind, status=job.status, done=job.done, total=job.total, result=job.result, error=job.error)


def accepted(job: Job) -> Response[JobAccepted]:
    """``202 Accepted`` with the job and its ``Location``."""
    return Response(JobAccepted(job=job_info(job)), status_code=202, headers={"Location": f"/jobs/{job.id}"})


class JobsController(Controller):
    tags = ["eval"]
    opt = READ
    security = SECURITY

    @get("/jobs/{job_id:str}", responses=errors(401, 403, 404, 503))
    async def job(self, job_id: FromPath[str], engine: EngineDep) -> JobInfo:
        """A background job's status, progress (``done`` of ``total``) and, when it succeeded, its result."""
        return job_info(engine.job(job_id))
