"""What the client raises: one exception per HTTP status the service answers with, carrying the status, the
server's ``code`` and message, and the field at fault; a failed or overdue background job.

The classes follow the openai SDK's names (``BadRequestError``, ``RateLimitError``...), so code that handles one
reads the same here.
"""

from __future__ import annotations

from typing import Any

import msgspec

from embedlift.client.schemas import ErrorBody, JobInfo


class EmbedliftClientError(Exception):
    """Base of everything the client raises."""


class APIError(EmbedliftClientError):
    """The service answered with an error status.

    Attributes:
        status_code: The HTTP status.
        code: The server's machine-readable code (``not_found``, ``overloaded``...).
        message: The server's message, which says what to fix.
        field: The request field at fault (``documents[3].text``), where the error is about one.
        retry_after: The ``Retry-After`` seconds the server asked for (429, 503), else ``None``.
    """

    status_code: int = 0

    def __init__(self, status_code: int, code: str, message: str, field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{status_code} {code}: {message}" + (f" (field: {field})" if field else ""))
        self.status_code = status_code
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after


class BadRequestError(APIError):
    """400: the request is malformed or breaks a rule; ``field`` names where."""


class AuthenticationError(APIError):
    """401: no usable ``Authorization: Bearer`` key."""


class PermissionDeniedError(APIError):
    """403: the key may not call this route (admin routes need the admin key)."""


class NotFoundError(APIError):
    """404: unknown collection, adapter, document or job."""


class ConflictError(APIError):
    """409: the request conflicts with the current state (e.g. a collection being re-indexed)."""


class RequestTooLargeError(APIError):
    """413: over a size limit; the message states the limit and the value."""


class RateLimitError(APIError):
    """429: overloaded; raised once the client's retries (which honour ``Retry-After``) are spent."""


class InternalServerError(APIError):
    """500: a server bug; the server log has the details."""


class BadGatewayError(APIError):
    """502: a remote base refused or failed the request."""


class ServiceUnavailableError(APIError):
    """503: still loading, or its database is unreachable; raised once the retries are spent."""


BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: RequestTooLargeError, 429: RateLimitError, 500: InternalServerError,
    502: BadGatewayError, 503: ServiceUnavailableError,
}


def api_error(status_code: int, content: bytes, retry_after: float | None) -> APIError:
    """The exception for an error response: its body parsed as embedlift's native error when it is one."""
    cls = BY_STATUS.get(status_code, APIError)
    try:
        body = msgspec.json.decode(content, type=ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = content.decode("utf-8", "replace").strip()
        return cls(status_code, "error", text[:2000] or f"HTTP {status_code} with no body")
    return cls(status_code, body.code, body.detail, body.field, retry_after)


class JobFailedError(EmbedliftClientError):
    """A background job ended ``failed``; ``job.error`` says why."""

    def __init__(self, job: JobInfo) -> None:
        super().__init__(f"job {job.id} ({job.kind}) failed: {job.error}")
        self.job = job


class JobTimeoutError(EmbedliftClientError, TimeoutError):
    """``wait()`` gave up before the job finished; the job goes on on the server."""

    def __init__(self, job: JobInfo, timeout: float) -> None:
        super().__init__(f"job {job.id} ({job.kind}) still {job.status} after {timeout:g} s ({job.done} of {job.total} done)")
        self.job = job


def result_of(job: JobInfo, type: Any) -> Any:
    """A succeeded job's result as the route's own response type."""
    return msgspec.convert(job.result, type)
