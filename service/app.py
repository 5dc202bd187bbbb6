"""The Litestar app: thin controllers over the engine.

Where a request goes: ``create_app`` below lists the controllers; each handler validates limits, calls one
``Engine`` method and shapes the msgspec response. Errors are mapped in one place (``_error_response``):
``EmbedliftError`` subclasses carry their status; ``/v1/*`` answers in OpenAI's ``{"error": {...}}`` shape.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from litestar import Controller, Litestar, MediaType, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import JSONBody

from embedlift.models.errors import EmbedliftError, InvalidInputError, TooLargeError, UnavailableError
from embedlift.service.engine import BASE, Engine, EmbedResult
from embedlift.service.schemas import (
    AdapterInfo,
    AdapterList,
    Embedding,
    EmbedRequest,
    EmbedResponse,
    ErrorBody,
    Health,
    ModelCard,
    ModelList,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    OpenAIError,
    OpenAIErrorDetail,
    Usage,
)
from embedlift.service.settings import Settings

logger = logging.getLogger(__name__)

ADAPTER_HEADER = "x-embedlift-adapter"
WINDOWS_HEADER = "x-embedlift-windows"
DOCUMENT_SUFFIX = ":document"


# ----------------------------------------------------------------------------------------------- helpers
def engine_of(state: State) -> Engine:
    """The loaded engine, or a 503 while the model is still loading."""
    engine: Engine | None = state.get("engine")
    if engine is None:
        error = state.get("load_error")
        raise UnavailableError(f"the service failed to load: {error}" if error else "the model is still loading; retry when /ready answers 200")
    return engine


def check_inputs(texts: Sequence[str], settings: Settings) -> None:
    """Limits first, before any work; messages state the limit and the value."""
    if not texts:
        raise InvalidInputError("input is empty; send a string or a non-empty list of strings")
    if len(texts) > settings.max_inputs:
        raise TooLargeError(f"{len(texts)} inputs > maximum allowed {settings.max_inputs} per request; split the batch")
    for i, text in enumerate(texts):
        if len(text) > settings.max_input_chars:
            raise TooLargeError(
                f"input[{i}] has {len(text)} characters > maximum allowed {settings.max_input_chars}; split it"
            )
        if not text.strip():
            raise InvalidInputError(f"input[{i}] is empty; every input must contain text")


def encode_vectors(vectors: np.ndarray, encoding_format: str) -> list[Embedding]:
    """Float lists, or base64 of little-endian float32 (what the openai SDK asks for by default)."""
    if encoding_format == "base64":
        return [
            Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode())
            for i, v in enumerate(vectors)
        ]
    return [Embedding(index=i, embedding=v.tolist()) for i, v in enumerate(vectors)]


def result_headers(result: EmbedResult) -> dict[str, str]:
    return {ADAPTER_HEADER: result.adapter, WINDOWS_HEADER: ",".join(map(str, result.windows))}


# ------------------------------------------------------------------------------------------- controllers
class OpsController(Controller):
    """Liveness and readiness; public."""

    tags = ["ops"]

    @get("/health")
    async def health(self, state: State) -> Health:
        """Alive; answers while the model is still loading."""
        return Health(status="ok" if state.get("engine") is not None else "loading")

    @get("/ready", responses={503: ResponseSpec(data_container=ErrorBody, description="still loading, or failed to load")})
    async def ready(self, state: State) -> Health:
        """200 once the model and adapters are loaded, 503 until then."""
        engine_of(state)
        return Health(status="ok")


class EmbedController(Controller):
    """Embeddings: embedlift's own route and the OpenAI-compatible one."""

    tags = ["embeddings"]

    @post("/embed", status_code=200, sync_to_thread=True)
    def embed(self, data: JSONBody[EmbedRequest], state: State) -> Response[EmbedResponse]:
        """Embed queries (through the adapter) or documents (base space unless the adapter applies to both)."""
        settings: Settings = state.settings
        texts = [data.input] if isinstance(data.input, str) else data.input
        check_inputs(texts, settings)
        engine = engine_of(state)
        result = engine.embed(texts, data.input_type, data.adapter, normalize_output=data.normalize, truncate=data.truncate)
        body = EmbedResponse(
            data=encode_vectors(result.vectors, data.encoding_format),
            model=engine.base.name,
            adapter=result.adapter,
            usage=Usage(prompt_tokens=result.tokens, total_tokens=result.tokens),
        )
        return Response(body, headers=result_headers(result))

    @post("/v1/embeddings", status_code=200, sync_to_thread=True)
    def openai_embeddings(self, data: JSONBody[OpenAIEmbeddingRequest], state: State) -> Response[OpenAIEmbeddingResponse]:
        """OpenAI-compatible. ``model``: ``base``, ``active`` or an adapter name; ``<name>:document`` embeds
        documents (plain names embed queries)."""
        settings: Settings = state.settings
        texts = openai_texts(data.input)
        check_inputs(texts, settings)
        engine = engine_of(state)
        name, role = data.model, "query"
        if name.endswith(DOCUMENT_SUFFIX):
            name, role = name[: -len(DOCUMENT_SUFFIX)], "document"
        if data.dimensions is not None and data.dimensions != engine.base.dim:
            raise InvalidInputError(
                f"dimensions={data.dimensions} is not supported: {engine.base.name} returns {engine.base.dim} dimensions; omit the parameter"
            )
        adapter = None if name == "active" else name
        result = engine.embed(texts, role, adapter)  # type: ignore[arg-type]
        body = OpenAIEmbeddingResponse(
            data=encode_vectors(result.vectors, data.encoding_format),
            model=data.model,
            usage=Usage(prompt_tokens=result.tokens, total_tokens=result.tokens),
        )
        return Response(body, headers=result_headers(result))

    @get("/v1/models")
    async def models(self, state: State) -> ModelList:
        """The names ``/v1/embeddings`` accepts as ``model``."""
        engine = engine_of(state)
        names = ["active", BASE, *(a.name for a in engine.adapters())]
        return ModelList(data=[ModelCard(id=n) for n in names])


def openai_texts(value: Any) -> list[str]:
    """OpenAI's ``input`` as a list of strings; token-id arrays are refused with the LangChain fix."""
    if isinstance(value, str):
        return [value]
    if any(not isinstance(v, str) for v in value):
        raise InvalidInputError(
            "input must be a string or a list of strings; token-id arrays are not supported. "
            "LangChain's OpenAIEmbeddings sends them unless you set check_embedding_ctx_length=False"
        )
    return list(value)


class AdaptersController(Controller):
    """The adapter registry."""

    path = "/adapters"
    tags = ["adapters"]

    @get("/")
    async def list_adapters(self, state: State) -> AdapterList:
        """Registered adapters with version, kind, base fingerprint, training metrics and which is active."""
        engine = engine_of(state)
        active = engine.active
        return AdapterList(
            active=active.label if active else None,
            adapters=[
                AdapterInfo(
                    name=a.name,
                    version=a.version,
                    kind=a.checkpoint.config.kind,
                    apply_to=a.checkpoint.config.apply_to,
                    base_fingerprint=a.checkpoint.config.base.fingerprint,
                    active=active is not None and active.name == a.name,
                    metrics=dict(a.checkpoint.config.metrics),
                )
                for a in engine.adapters()
            ],
        )


# ---------------------------------------------------------------------------------------------- errors
def _error_response(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    if request.url.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body: Any = OpenAIError(error=OpenAIErrorDetail(message=message, type=kind, code=code))
    else:
        body = ErrorBody(status_code=status, code=code, detail=message)
    return Response(body, status_code=status, headers=headers, media_type=MediaType.JSON)


def handle_embedlift_error(request: Request, exc: EmbedliftError) -> Response:
    headers = {"Retry-After": str(exc.retry_after)} if hasattr(exc, "retry_after") else None
    return _error_response(request, exc.status_code, exc.code, exc.message, headers)


def handle_http_exception(request: Request, exc: HTTPException) -> Response:
    """Litestar's own errors (validation 400, unknown route 404, 405, 413) in our shapes."""
    message = exc.detail
    extra = getattr(exc, "extra", None)
    if extra:
        message = f"{message}: " + "; ".join(
            f"{e.get('key', '')} {e.get('message', '')}".strip() if isinstance(e, dict) else str(e) for e in extra
        )
    code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "error")
    return _error_response(request, exc.status_code, code, message, exc.headers)


def handle_internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_response(request, 500, "internal_error", "internal error; see the server log")


# ------------------------------------------------------------------------------------------------- app
def create_app(settings: Settings | None = None, engine: Engine | None = None) -> Litestar:
    """Build the app. With ``engine`` given it is ready at once; otherwise the engine loads in a thread at
    start-up, so ``/health`` answers (and ``/ready`` says 503) while the model loads."""
    settings = settings or Settings.from_sources()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        task = None
        if app.state.get("engine") is None:

            async def load() -> None:
                try:
                    app.state.engine = await asyncio.to_thread(Engine.from_settings, settings)
                    logger.info("ready: base %s", app.state.engine.base.fingerprint)
                except Exception as exc:  # surfaced by /ready and every route
                    logger.exception("failed to load the engine")
                    app.state.load_error = str(exc)

            task = asyncio.create_task(load())
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()

    return Litestar(
        route_handlers=[OpsController, EmbedController, AdaptersController],
        state=State({"settings": settings, "engine": engine}),
        lifespan=[lifespan],
        exception_handlers={
            EmbedliftError: handle_embedlift_error,
            HTTPException: handle_http_exception,
            Exception: handle_internal_error,
        },
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="embedlift",
            version="0.1.0",
            description="Adapters over frozen embedding models: embed, search and evaluate.",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin(path="/")],
        ),
    )
