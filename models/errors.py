"""One error tree for embedlift.

Every error carries the HTTP status the service answers with (``status_code``, a class attribute as in
Litestar's ``HTTPException``) and a message that says what to fix. The CLI prints the message on one line
and exits 2; the service renders every error in one handler, and its table of statuses (in the OpenAPI spec
and on every route) is derived from this tree: the most general class of each status describes it
(``http_description``).
"""

from __future__ import annotations


class EmbedliftError(Exception):
    """Base of every error embedlift raises on purpose. Subclasses set ``status_code`` and ``code``."""

    status_code: int = 400
    code: str = "invalid_request"
    #: Extra response headers (``Retry-After``, ``WWW-Authenticate``).
    headers: dict[str, str] = {}

    def __init__(self, message: str, field: str | None = None, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The request field at fault (``documents[3].text``, ``k``), where the error is about one: error bodies
        #: carry it as ``field`` (OpenAI's ``param``), so a client can point at it.
        self.field = field
        #: Seconds after which the same request is worth retrying (429, 503): sent as ``Retry-After``.
        self.retry_after = retry_after
        if retry_after is not None:
            self.headers = {**self.headers, "Retry-After": str(retry_after)}


class InvalidInputError(EmbedliftError):
    """The request or file is malformed or violates a rule (400)."""

    http_description = "invalid request: malformed JSON, wrong types, empty input (the message says what to fix)"


class DatasetError(InvalidInputError):
    """A dataset file cannot be read or fails validation (400)."""

    code = "invalid_dataset"


class CheckpointError(InvalidInputError):
    """An adapter checkpoint is missing, damaged or does not fit (400). The message names the file."""

    code = "invalid_checkpoint"


class BaseMismatchError(CheckpointError):
    """Something built for one base model was offered to another (409)."""

    status_code = 409
    code = "base_mismatch"


class UnauthorizedError(EmbedliftError):
    """No usable ``Authorization: Bearer`` header on a route that needs a key (401)."""

    status_code = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}
    http_description = "missing or malformed `Authorization: Bearer <key>`"


class ForbiddenError(EmbedliftError):
    """A key that may not call this route (403)."""

    status_code = 403
    code = "forbidden"
    http_description = "the key is not allowed here (admin routes need the admin key)"


class NotFoundError(EmbedliftError):
    """An unknown collection, adapter, document or job (404)."""

    status_code = 404
    code = "not_found"
    http_description = "unknown collection, adapter, document or job"


class ConflictError(EmbedliftError):
    """The request conflicts with the current state, e.g. deleting the active adapter (409)."""

    status_code = 409
    code = "conflict"
    http_description = "conflicting state (e.g. deleting the active adapter, a collection built with another base)"


class TooLargeError(EmbedliftError):
    """A size limit was exceeded; the message states the limit and the value (413)."""

    status_code = 413
    code = "too_large"
    http_description = "over a size limit (inputs per request, characters per input, body size, k); the message states both numbers"


class OverloadedError(EmbedliftError):
    """The work queue is full; retry after ``retry_after`` seconds (429)."""

    status_code = 429
    code = "overloaded"
    http_description = "overloaded: retry after the `Retry-After` seconds"

    def __init__(self, message: str, retry_after: int = 1, field: str | None = None) -> None:
        super().__init__(message, field, retry_after=retry_after)


class UnavailableError(EmbedliftError):
    """The service is not ready, or a remote base cannot be reached (503), with ``Retry-After`` when it is
    worth retrying (still loading)."""

    status_code = 503
    code = "unavailable"
    http_description = "still loading (or failed to load); see /ready"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message, retry_after=retry_after)


class RemoteError(EmbedliftError):
    """A remote base (an OpenAI-protocol server) refused or failed a request after retries (502)."""

    status_code = 502
    code = "remote_error"
    http_description = "a remote base (an OpenAI-protocol server) refused or failed the request after retries; the message says which and why"


def _most_general() -> dict[int, type[EmbedliftError]]:
    """The most general class of each status the tree produces (breadth first from the root)."""
    found: dict[int, type[EmbedliftError]] = {}
    pending: list[type[EmbedliftError]] = [EmbedliftError]
    while pending:
        cls = pending.pop(0)
        if "http_description" in cls.__dict__:
            found.setdefault(cls.status_code, cls)
        pending += cls.__subclasses__()
    return dict(sorted(found.items()))


def status_table() -> dict[int, str]:
    """``{status: description}`` of every status the tree produces."""
    return {status: cls.__dict__["http_description"] for status, cls in _most_general().items()}


def status_codes() -> dict[int, str]:
    """``{status: code}``: the ``code`` an error body carries for each status."""
    return {status: cls.code for status, cls in _most_general().items()}
