"""One guard for every route, reading the route's ``opt["auth"]``: ``read``, ``admin``, ``metrics`` or none
(public: health, readiness, the spec, the playground's files).

``read`` routes need the read or the admin key, ``admin`` routes the admin key (or the read key when only that
one is configured, so writes are never open while reads are closed). With no keys configured any Bearer header
is ignored (the openai SDK always sends one). Keys compare in constant time and never reach a log.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from embedlift.models.errors import ForbiddenError, UnauthorizedError
from embedlift.service.http.state import ServiceState


async def auth_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """A coroutine, though it awaits nothing: Litestar runs a plain-function guard in a worker thread, a hop
    that cost about 12% of the event loop's time per request under 32 clients (``benchmarks/serving.py``)."""
    scope = handler.opt.get("auth")
    settings = ServiceState.of(connection.app).settings
    if scope is None or (scope == "metrics" and settings.metrics_public):
        return
    if scope != "admin" and settings.api_key is None:
        return  # reads are open unless a read key is set
    allowed = [settings.admin_key or settings.api_key] if scope == "admin" else [settings.api_key, settings.admin_key]
    keys = [k for k in allowed if k]
    if not keys:
        return
    kind, _, token = connection.headers.get("authorization", "").partition(" ")
    if kind.lower() != "bearer" or not token:
        raise UnauthorizedError("send `Authorization: Bearer <key>`")
    if not any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys):
        needed = "the admin key" if scope == "admin" else "the API key"
        raise ForbiddenError(f"this key may not call {connection.url.path}; it needs {needed}")
