"""The adapter registry over HTTP: list, register (a directory name or an uploaded tar), activate (hot swap),
roll back, delete."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.params import Parameter

from embedlift.models.errors import InvalidInputError, TooLargeError
from embedlift.service.engine import LoadedAdapter
from embedlift.service.http.state import EngineDep, SettingsDep
from embedlift.service.http.openapi import ADMIN, READ, SECURITY, NamePath, RegisterAdapterOperation, errors
from embedlift.service.schemas import NAME_PATTERN, ActiveAdapter, AdapterInfo, AdapterList, AdapterRegister

TAR_TYPES = ("application/x-tar", "application/gzip", "application/x-gzip", "application/octet-stream")


def adapter_info(a: LoadedAdapter, active: LoadedAdapter | None) -> AdapterInfo:
    c = a.checkpoint.config
    return AdapterInfo(
        name=a.name, version=a.version, label=a.label, kind=c.kind, apply_to=c.apply_to,
        base_fingerprint=c.base.fingerprint, created=c.created, active=active is not None and active.name == a.name,
        metrics=dict(c.metrics),
    )


async def read_upload(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The body of a checkpoint upload (which may be larger than the JSON limit), read up to ``limit`` bytes:
    one byte more is a 413 before the rest is read."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"the upload is over {limit} bytes (max_upload_bytes); a checkpoint tar is far smaller")
        chunks.append(chunk)
    return b"".join(chunks)


class AdaptersController(Controller):
    """The adapter registry: list, register (hot: validated fully before it can be served), activate,
    roll back, delete."""

    path = "/adapters"
    tags = ["adapters"]
    security = SECURITY

    @get("/", opt=READ, responses=errors(401, 403, 503))
    async def list_adapters(self, engine: EngineDep) -> AdapterList:
        """Registered adapters with version, kind, base fingerprint, training metrics and which is active."""
        active = engine.active
        return AdapterList(active=active.label if active else None, adapters=[adapter_info(a, active) for a in engine.adapters()])

    @post(
        "/", opt=ADMIN, status_code=201, operation_class=RegisterAdapterOperation,
        request_max_body_size=None, responses=errors(400, 401, 403, 404, 409, 413, 503),
    )
    async def register(
        self, request: Request[Any, Any, Any], engine: EngineDep, settings: SettingsDep,
        name: str | None = Parameter(default=None, pattern=NAME_PATTERN, description="name for an uploaded tar (default: the checkpoint's own)"),
    ) -> AdapterInfo:
        """Register a checkpoint (a new name is version 1; a name registered again gets the next version).
        A checkpoint that fails validation (damaged, wrong base or shape) is refused and nothing changes."""
        body = await read_upload(request, settings.max_upload_bytes)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type in ("", "application/json"):
            try:
                spec = msgspec.json.decode(body, type=AdapterRegister)
            except msgspec.ValidationError as exc:
                raise InvalidInputError(f"invalid body: {exc}") from exc
            except msgspec.DecodeError as exc:
                raise InvalidInputError(f"the body is not valid JSON ({exc}); send {{\"name\": \"...\"}} or a tar with Content-Type: application/x-tar") from exc
            loaded = await engine.register_adapter(spec.name)
        elif content_type in TAR_TYPES:
            loaded = await engine.register_upload(body, name)
        else:
            raise InvalidInputError(f"unsupported Content-Type {content_type!r}: send application/json or application/x-tar")
        return adapter_info(loaded, engine.active)

    @post("/{name:str}/activate", opt=ADMIN, status_code=200, responses=errors(401, 403, 404, 503))
    async def activate(self, name: NamePath, engine: EngineDep) -> ActiveAdapter:
        """Hot swap: requests that name no adapter use ``name`` from now on (``base``: no adapter).
        Requests in flight finish on the adapter they started with."""
        loaded = await engine.activate(name)
        return ActiveAdapter(active=loaded.label if loaded else None)

    @post("/rollback", opt=ADMIN, status_code=200, responses=errors(401, 403, 409, 503))
    async def rollback(self, engine: EngineDep) -> ActiveAdapter:
        """Back to the previously active adapter."""
        loaded = await engine.rollback()
        return ActiveAdapter(active=loaded.label if loaded else None)

    @delete("/{name:str}", opt=ADMIN, status_code=204, responses=errors(401, 403, 404, 409, 503))
    async def delete_adapter(self, name: NamePath, engine: EngineDep) -> None:
        """Unregister an adapter and remove its checkpoint directory; the active one cannot be deleted."""
        await engine.delete_adapter(name)
