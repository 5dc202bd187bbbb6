"""One error tree for embedlift.

Every error carries the HTTP status the service answers with (``status_code``, a class attribute as in
Litestar's ``HTTPException``) and a message that says what to fix. The CLI prints the message on one line
and exits 2; the service maps the class to its status in one handler.
"""

from __future__ import annotations


class EmbedliftError(Exception):
    """Base of every error embedlift raises on purpose. Subclasses set ``status_code`` and ``code``."""

    status_code: int = 400
    code: str = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(EmbedliftError):
    """The request or file is malformed or violates a rule (400)."""


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


class NotFoundError(EmbedliftError):
    """An unknown collection, adapter, document or job (404)."""

    status_code = 404
    code = "not_found"


class ConflictError(EmbedliftError):
    """The request conflicts with the current state, e.g. deleting the active adapter (409)."""

    status_code = 409
    code = "conflict"


class TooLargeError(EmbedliftError):
    """A size limit was exceeded; the message states the limit and the value (413)."""

    status_code = 413
    code = "too_large"


class OverloadedError(EmbedliftError):
    """The work queue is full; retry after ``retry_after`` seconds (429)."""

    status_code = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(EmbedliftError):
    """The service is not ready, or a remote base cannot be reached (503)."""

    status_code = 503
    code = "unavailable"


class RemoteError(EmbedliftError):
    """A remote base (an OpenAI-protocol server) refused or failed a request after retries (502)."""

    status_code = 502
    code = "remote_error"
