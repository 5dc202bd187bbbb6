"""Every error the app answers with, rendered in one handler.

``EmbedliftError`` subclasses carry their status, code and extra headers (``Retry-After``, ``WWW-Authenticate``);
Litestar's own errors (validation 400, unknown route 404, 405, body size 413) keep their status; anything else is
a 500 that is logged and says only "internal error". ``/v1/*`` answers in OpenAI's ``{"error": {...}}`` shape,
every other route in ``{"status_code", "code", "detail"}``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import msgspec

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException

from embedlift.models.errors import EmbedliftError, status_codes
from embedlift.service.schemas import ErrorBody, OpenAIError, OpenAIErrorDetail, TEIError, enum_fields

logger = logging.getLogger(__name__)

#: Codes for Litestar's own errors: the error tree's, and two statuses only the framework produces.
HTTP_CODES = {**status_codes(), 405: "method_not_allowed", 415: "unsupported_media_type"}


#: TEI's ``error_type`` by status (its own are Validation, Overloaded, Unhealthy, Backend, Tokenizer, Empty).
TEI_TYPES = {401: "Unauthorized", 403: "Forbidden", 429: "Overloaded", 502: "Backend", 503: "Unhealthy"}


def error_response(
    request: Request[Any, Any, Any], status: int, code: str, message: str, headers: dict[str, str] | None = None, field: str | None = None,
) -> Response[Any]:
    """An error body in the shape the route's clients read (the field at fault as OpenAI's ``param``, or
    embedlift's ``field``; TEI's body has no place for it)."""
    if request.url.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body: Any = OpenAIError(error=OpenAIErrorDetail(message=message, type=kind, param=field, code=code))
    elif request.url.path == "/tei" or request.url.path.startswith("/tei/"):
        body = TEIError(error=message, error_type=TEI_TYPES.get(status, "Validation" if status < 500 else "Backend"))
    else:
        body = ErrorBody(status_code=status, code=code, detail=message, field=field)
    return Response(body, status_code=status, headers=headers or None, media_type=MediaType.JSON)


def _field_problem(error: dict[str, Any], body: type | None) -> str:
    """A validation error of one field, with the allowed values when it is an enumeration of the route's body."""
    key, message = str(error.get("key", "")), str(error.get("message", ""))
    if message.startswith("Invalid enum value") and body is not None and (allowed := _enums(body).get(key)) is not None:
        message += f"; allowed: {', '.join(map(repr, allowed))}"
    return f"{key} {message}".strip()


def _field_of(extra: Any) -> str | None:
    """The field a validation error is about, when it names exactly one (msgspec's ``$.documents[3].text``
    reported as ``documents[3].text``; a query parameter by its name)."""
    keys = {str(e.get("key")) for e in extra if isinstance(e, dict) and e.get("key")} if isinstance(extra, list) else set()
    if len(keys) != 1:
        return None
    key = keys.pop()
    return key[2:] if key.startswith("$.") else key


@functools.cache
def _enums(body: type) -> dict[str, tuple[Any, ...]]:
    return enum_fields(body) if isinstance(body, type) and issubclass(body, msgspec.Struct) else {}


def _body_type(request: Request[Any, Any, Any]) -> type | None:
    """The msgspec Struct the route parses its body into (``None``: none)."""
    handler = request.scope.get("route_handler")
    field = handler.parsed_fn_signature.parameters.get("data") if handler is not None else None
    body = getattr(field, "annotation", None)
    return body if isinstance(body, type) else None


def handle_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The app's only exception handler."""
    if isinstance(exc, EmbedliftError):
        return error_response(request, exc.status_code, exc.code, exc.message, exc.headers, exc.field)
    if isinstance(exc, HTTPException):
        message, field = exc.detail, None
        if extra := getattr(exc, "extra", None):
            body = _body_type(request)
            message = f"{message}: " + "; ".join(_field_problem(e, body) if isinstance(e, dict) else str(e) for e in extra)
            field = _field_of(extra)
        return error_response(request, exc.status_code, HTTP_CODES.get(exc.status_code, "error"), message, exc.headers, field)
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, 500, "internal_error", "internal error; see the server log")
