"""Every error the app answers with, rendered in one handler.

``EmbedliftError`` subclasses carry their status, code and extra headers (``Retry-After``, ``WWW-Authenticate``);
Litestar's own errors (validation 400, unknown route 404, 405, body size 413) keep their status; anything else is
a 500 that is logged and says only "internal error". ``/v1/*`` answers in OpenAI's ``{"error": {...}}`` shape,
every other route in ``{"status_code", "code", "detail"}``.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException

from embedlift.models.errors import EmbedliftError, status_codes
from embedlift.service.schemas import ErrorBody, OpenAIError, OpenAIErrorDetail

logger = logging.getLogger(__name__)

#: Codes for Litestar's own errors: the error tree's, and two statuses only the framework produces.
HTTP_CODES = {**status_codes(), 405: "method_not_allowed", 415: "unsupported_media_type"}


def error_response(request: Request[Any, Any, Any], status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response[Any]:
    """An error body in the shape the route's clients read."""
    if request.url.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body: Any = OpenAIError(error=OpenAIErrorDetail(message=message, type=kind, code=code))
    else:
        body = ErrorBody(status_code=status, code=code, detail=message)
    return Response(body, status_code=status, headers=headers or None, media_type=MediaType.JSON)


def handle_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The app's only exception handler."""
    if isinstance(exc, EmbedliftError):
        return error_response(request, exc.status_code, exc.code, exc.message, exc.headers)
    if isinstance(exc, HTTPException):
        message = exc.detail
        if extra := getattr(exc, "extra", None):
            message = f"{message}: " + "; ".join(
                f"{e.get('key', '')} {e.get('message', '')}".strip() if isinstance(e, dict) else str(e) for e in extra
            )
        return error_response(request, exc.status_code, HTTP_CODES.get(exc.status_code, "error"), message, exc.headers)
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, 500, "internal_error", "internal error; see the server log")
