"""The Litestar app: thin controllers over the engine.

Where a request goes: ``create_app`` below lists the controllers; each handler checks limits, calls one
``Engine`` method off the event loop (``run_model_work``: admitted or 429 at once) and shapes the msgspec
response. Errors are mapped in one place (``_error_response``): ``EmbedliftError`` subclasses carry their
status; ``/v1/*`` answers in OpenAI's ``{"error": {...}}`` shape. Auth is one guard reading each route's
``opt["auth"]`` (``read`` or ``admin``); routes without it are public.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import numpy as np
from litestar import Controller, Litestar, MediaType, Request, Response, delete, get, post, put
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema, SecurityScheme
from litestar.params import FromPath, JSONBody, Parameter
from litestar.plugins.prometheus import PrometheusConfig
from litestar.response import Redirect
from litestar.static_files import create_static_files_router
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from embedlift.models.errors import (
    EmbedliftError,
    InvalidInputError,
    NotFoundError,
    TooLargeError,
    UnavailableError,
)
from embedlift.service.collections import NAME_PATTERN, Hit, check_name, valid_name
from embedlift.service.engine import BASE, EmbedResult, Engine, LoadedAdapter
from embedlift.service.jobs import Job
from embedlift.service.schemas import (
    ActiveAdapter,
    AdapterInfo,
    AdapterList,
    AdapterRegister,
    CollectionCreate,
    CollectionInfo,
    CollectionList,
    DatasetList,
    DeleteRequest,
    DeleteResponse,
    Embedding,
    EmbedRequest,
    EmbedResponse,
    ErrorBody,
    EvalRequest,
    EvalResponse,
    Health,
    JobAccepted,
    JobInfo,
    ModelCard,
    ModelList,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    OpenAIError,
    OpenAIErrorDetail,
    SearchHit,
    SearchRequest,
    SearchResponse,
    SearchResult,
    StoredDataset,
    StoredDocument,
    UpsertRequest,
    UpsertResponse,
    Usage,
    WindowEmbedding,
    BODY_RULES,
    closed_bodies,
    is_blank,
)
from embedlift.service.settings import Settings
from embedlift.training.dataset import QADataset, load_dataset, validate

logger = logging.getLogger(__name__)

ADAPTER_HEADER = "x-embedlift-adapter"
WINDOWS_HEADER = "x-embedlift-windows"
DOCUMENT_SUFFIX = ":document"
# Collection and adapter names in paths: the pattern is in the spec, and a name outside it is a 400 that shows it.
NamePath = Annotated[str, Parameter(pattern=NAME_PATTERN, description="a collection or adapter name")]
READ = {"auth": "read"}
ADMIN = {"auth": "admin"}
SECURITY = [{"bearer": []}]
T = TypeVar("T")

# One table of status codes, used by every route and declared in the spec.
STATUS_TABLE = {
    400: "invalid request: malformed JSON, wrong types, empty input (the message says what to fix)",
    401: "missing or malformed `Authorization: Bearer <key>`",
    403: "the key is not allowed here (admin routes need the admin key)",
    404: "unknown collection, adapter, document or job",
    409: "conflicting state (e.g. deleting the active adapter, a collection built with another base)",
    413: "over a size limit (inputs per request, characters per input, body size, k); the message states both numbers",
    429: "overloaded: retry after the `Retry-After` seconds",
    503: "still loading (or failed to load); see /ready",
}


def documented(container: type, description: str) -> ResponseSpec:
    """A response in the spec, without Litestar's generated examples (random values: the spec must be
    the same bytes every time it is built, for the drift test and for clients that diff it)."""
    return ResponseSpec(data_container=container, description=description, generate_examples=False)


def errors(*codes: int, openai: bool = False) -> dict[int, ResponseSpec]:
    body = OpenAIError if openai else ErrorBody
    return {c: documented(body, STATUS_TABLE[c]) for c in codes}


# ----------------------------------------------------------------------------------------------- helpers
@dataclass
class OptionalBodyOperation(Operation):
    """A route whose JSON body may be left out (Litestar declares every body required)."""

    def __post_init__(self) -> None:
        if self.request_body is not None:
            self.request_body.required = False


def engine_of(state: State) -> Engine:
    """The loaded engine, or a 503 while the model is still loading."""
    engine: Engine | None = state.get("engine")
    if engine is None:
        error = state.get("load_error")
        raise UnavailableError(f"the service failed to load: {error}" if error else "the model is still loading; retry when /ready answers 200")
    return engine


async def run_model_work(engine: Engine, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run engine work on a worker thread, so the event loop keeps answering; refused with 429 at once when
    ``max_concurrent`` requests are already in progress (a bounded queue, never an unbounded backlog)."""
    with engine.admission:
        return await asyncio.to_thread(fn, *args, **kwargs)


def check_inputs(texts: Sequence[str], settings: Settings, what: str = "input") -> None:
    """Limits first, before any work; messages state the limit and the value."""
    if not texts:
        raise InvalidInputError(f"{what} is empty; send a string or a non-empty list of strings")
    if len(texts) > settings.max_inputs:
        raise TooLargeError(f"{len(texts)} inputs > maximum allowed {settings.max_inputs} per request; split the batch")
    for i, text in enumerate(texts):
        if len(text) > settings.max_input_chars:
            raise TooLargeError(f"{what}[{i}] has {len(text)} characters > maximum allowed {settings.max_input_chars}; split it")
        if is_blank(text):
            raise InvalidInputError(f"{what}[{i}] is empty; every input must contain text")


def encode_vector(v: np.ndarray, encoding_format: str) -> list[float] | str:
    """A float list, or base64 of little-endian float32 (what the openai SDK asks for by default)."""
    if encoding_format == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode()
    return v.tolist()


def encode_result(result: EmbedResult, encoding_format: str) -> list[Embedding]:
    windows = result.window_vectors
    return [
        Embedding(
            index=i,
            embedding=encode_vector(v, encoding_format),
            windows=None
            if windows is None
            else [WindowEmbedding(span=span, embedding=encode_vector(w, encoding_format)) for span, w in zip(*windows[i], strict=True)],
        )
        for i, v in enumerate(result.vectors)
    ]


def result_headers(result: EmbedResult) -> dict[str, str]:
    return {ADAPTER_HEADER: result.adapter, WINDOWS_HEADER: ",".join(map(str, result.windows))}


def job_info(job: Job) -> JobInfo:
    return JobInfo(id=job.id, kind=job.kind, status=job.status, done=job.done, total=job.total, result=job.result, error=job.error)


def accepted(job: Job) -> Response[JobAccepted]:
    return Response(JobAccepted(job=job_info(job)), status_code=202, headers={"Location": f"/jobs/{job.id}"})


# ------------------------------------------------------------------------------------------------- auth
def auth_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """``read`` routes need the read or the admin key, ``admin`` routes the admin key (or the read key when
    only that one is configured, so writes are never open while reads are closed). With no keys configured
    any Bearer header is ignored (the openai SDK always sends one). Keys compare in constant time."""
    scope = handler.opt.get("auth")
    settings: Settings = connection.app.state.settings
    if scope is None or (scope == "metrics" and settings.metrics_public):
        return
    allowed = [settings.admin_key or settings.api_key] if scope == "admin" else [settings.api_key, settings.admin_key]
    if scope != "admin" and settings.api_key is None:
        return  # reads are open unless a read key is set
    keys = [k for k in allowed if k]
    if not keys:
        return
    header = connection.headers.get("authorization", "")
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token:
        raise HTTPException(status_code=401, detail="send `Authorization: Bearer <key>`", headers={"WWW-Authenticate": "Bearer"})
    if not any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys):
        needed = "the admin key" if scope == "admin" else "the API key"
        raise HTTPException(status_code=403, detail=f"this key may not call {connection.url.path}; it needs {needed}")


# ------------------------------------------------------------------------------------------- controllers
UI_DIR = Path(__file__).parent / "static" / "ui"


class OpsController(Controller):
    """Liveness and readiness; public."""

    tags = ["ops"]

    @get("/", include_in_schema=False)
    async def home(self) -> Redirect:
        """The playground page (the API reference is at /schema)."""
        return Redirect(path="/ui/")

    @get("/health")
    async def health(self, state: State) -> Health:
        """Alive; answers while the model is still loading."""
        return Health(status="ok" if state.get("engine") is not None else "loading")

    @get("/ready", responses=errors(503))
    async def ready(self, state: State) -> Health:
        """200 once the model, adapters and collections are loaded, 503 until then."""
        engine_of(state)
        return Health(status="ok")


class MetricsController(Controller):
    """Prometheus metrics: requests and latency per route, request sizes, cache hit ratio, active adapter.
    Public unless ``metrics_public`` is off (then the read key)."""

    tags = ["ops"]

    @get("/metrics", opt={"auth": "metrics"}, media_type=CONTENT_TYPE_LATEST, security=[{}, *SECURITY], responses=errors(401, 403))
    async def metrics(self) -> Response[bytes]:
        """Prometheus' text exposition format."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


class EmbedController(Controller):
    """Embeddings: embedlift's own route and the OpenAI-compatible one."""

    tags = ["embeddings"]
    opt = READ
    security = SECURITY

    @post("/embed", status_code=200, responses=errors(400, 401, 403, 404, 413, 429, 503))
    async def embed(self, data: JSONBody[EmbedRequest], state: State) -> Response[EmbedResponse]:
        """Embed queries (through the adapter) or documents (base space unless the adapter applies to both).

        An input longer than the model's window is the normalised mean of its windows (``x-embedlift-windows``
        says how many each input had); ``truncate`` embeds only the first window; ``return_windows`` adds every
        window's vector and span."""
        settings: Settings = state.settings
        texts = [data.input] if isinstance(data.input, str) else data.input
        check_inputs(texts, settings)
        engine = engine_of(state)
        result = await run_model_work(
            engine, engine.embed, texts, data.input_type, data.adapter,
            normalize_output=data.normalize, truncate=data.truncate, return_windows=data.return_windows,
        )
        body = EmbedResponse(
            data=encode_result(result, data.encoding_format),
            model=engine.base.name,
            adapter=result.adapter,
            usage=Usage(prompt_tokens=result.tokens, total_tokens=result.tokens),
        )
        return Response(body, headers=result_headers(result))

    @post("/v1/embeddings", status_code=200, responses=errors(400, 401, 403, 404, 413, 429, 503, openai=True))
    async def openai_embeddings(self, data: JSONBody[OpenAIEmbeddingRequest], state: State) -> Response[OpenAIEmbeddingResponse]:
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
        result = await run_model_work(engine, engine.embed, texts, role, adapter)
        body = OpenAIEmbeddingResponse(
            data=encode_result(result, data.encoding_format),
            model=data.model,
            usage=Usage(prompt_tokens=result.tokens, total_tokens=result.tokens),
        )
        return Response(body, headers=result_headers(result))

    @get("/v1/models", responses=errors(401, 403, 503, openai=True))
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


class CollectionsController(Controller):
    """FAISS collections of documents: create, upsert, delete, get, search."""

    path = "/collections"
    tags = ["collections"]
    security = SECURITY

    @put("/{name:str}", opt=ADMIN, status_code=200, operation_class=OptionalBodyOperation, responses={201: documented(CollectionInfo, "created"), **errors(400, 401, 403, 409, 503)})
    async def create(self, name: NamePath, state: State, data: JSONBody[CollectionCreate | None] = None) -> Response[CollectionInfo]:
        """Create a collection (idempotent: the same settings again answer 200; other settings, 409)."""
        engine = engine_of(state)
        spec = data or CollectionCreate()
        collection, created = engine.collections.create(
            name, spec.index, hnsw_m=spec.hnsw_m, ef_search=spec.ef_search, ef_construction=spec.ef_construction
        )
        return Response(collection_info(engine, name), status_code=201 if created else 200)

    @get("/", opt=READ, responses=errors(401, 403, 503))
    async def list_collections(self, state: State) -> CollectionList:
        """Every collection with its counts; one built with another base shows ``status: base_mismatch``."""
        engine = engine_of(state)
        return CollectionList(collections=[collection_info(engine, n) for n in engine.collections.names()])

    @get("/{name:str}", opt=READ, responses=errors(401, 403, 404, 503))
    async def get_collection(self, name: NamePath, state: State) -> CollectionInfo:
        return collection_info(engine_of(state), name)

    @delete("/{name:str}", opt=ADMIN, status_code=204, responses=errors(401, 403, 404, 503))
    async def delete_collection(self, name: NamePath, state: State) -> None:
        """Delete a collection and its documents (the directory is renamed aside first, then removed)."""
        engine_of(state).collections.delete(name)

    @post("/{name:str}/reindex", opt=ADMIN, status_code=202, responses=errors(401, 403, 404, 409, 429, 503))
    async def reindex(self, name: NamePath, state: State) -> Response[JobAccepted]:
        """Re-embed a collection built with another base (``status: base_mismatch``, e.g. after serving a
        fine-tuned base) from its stored texts onto this server's base, in the background: ``GET /jobs/{id}``
        shows documents done of total. The new vectors replace the old in one transaction when all are done;
        until then the collection answers 409 naming the job (its old vectors belong to the other base)."""
        return accepted(engine_of(state).start_reindex(name))

    @post("/{name:str}/documents", opt=ADMIN, status_code=200, responses={202: documented(JobAccepted, "a background job (large upserts)"), **errors(400, 401, 403, 404, 409, 413, 429, 503)})
    async def upsert(self, name: NamePath, data: JSONBody[UpsertRequest], state: State) -> Response[UpsertResponse]:
        """Insert or replace documents by id. Long documents are stored as their windows. Past
        ``sync_upsert_documents`` documents the upsert runs as a background job (202, ``GET /jobs/{id}``)."""
        settings: Settings = state.settings
        engine = engine_of(state)
        docs = data.documents
        if len(docs) > settings.max_documents:
            raise TooLargeError(f"{len(docs)} documents > maximum allowed {settings.max_documents} per request; split the upsert")
        for i, d in enumerate(docs):
            if len(d.text) > settings.max_input_chars:
                raise TooLargeError(f"documents[{i}] ({d.id!r}) has {len(d.text)} characters > maximum allowed {settings.max_input_chars}; split it")
            if is_blank(d.text):
                raise InvalidInputError(f"documents[{i}] ({d.id!r}) has empty text; every document must contain text")
        engine.collection(name)  # 404/409 before any work
        items = [(d.id, d.text, d.metadata) for d in docs]
        if len(docs) > settings.sync_upsert_documents:
            job = engine.jobs.submit("upsert", lambda job: _upsert_result(engine.upsert(name, items, job)), total=len(docs))
            return accepted(job)  # type: ignore[return-value]
        result = await run_model_work(engine, engine.upsert, name, items)
        return Response(_upsert_result(result))

    @post("/{name:str}/documents/delete", opt=ADMIN, status_code=200, responses=errors(400, 401, 403, 404, 409, 503))
    async def delete_documents(self, name: NamePath, data: JSONBody[DeleteRequest], state: State) -> DeleteResponse:
        """Delete documents by id; ids not in the collection are listed in ``missing``."""
        engine = engine_of(state)
        collection = engine.collection(name)
        missing = await asyncio.to_thread(collection.delete, data.ids)
        return DeleteResponse(deleted=len(set(data.ids)) - len(set(missing)), missing=missing)

    @get("/{name:str}/documents/{doc_id:str}", opt=READ, responses=errors(401, 403, 404, 409, 503))
    async def get_document(self, name: NamePath, doc_id: FromPath[str], state: State) -> StoredDocument:
        found = engine_of(state).collection(name).store.get(doc_id)
        if found is None:
            raise NotFoundError(f"no document {doc_id!r} in collection {name!r}")
        return StoredDocument(id=found.id, text=found.text, metadata=found.metadata, windows=found.windows)

    @post("/{name:str}/search", opt=READ, status_code=200, responses=errors(400, 401, 403, 404, 409, 413, 429, 503))
    async def search(self, name: NamePath, data: JSONBody[SearchRequest], state: State) -> Response[SearchResponse]:
        """Top-``k`` documents for ``query`` (``{"hits"}``) or for each of ``queries`` (``{"results"}``), one hit
        per document (its best window, whose span is reported), optionally filtered by metadata equality."""
        settings: Settings = state.settings
        single = isinstance(data.query, str)
        if single == isinstance(data.queries, list):
            raise InvalidInputError("send exactly one of `query` (a string) or `queries` (a list of strings)")
        texts = [data.query] if single else data.queries
        check_inputs(texts, settings, "query" if single else "queries")
        if data.k > settings.max_k:
            raise TooLargeError(f"k={data.k} > maximum allowed {settings.max_k}")
        engine = engine_of(state)
        result = await run_model_work(engine, engine.search, name, texts, data.k, data.adapter, data.filter)
        hits = [[search_hit(h) for h in per_query] for per_query in result.hits]
        body = SearchResponse(adapter=result.adapter, hits=hits[0]) if single else SearchResponse(
            adapter=result.adapter, results=[SearchResult(hits=h) for h in hits]
        )
        return Response(body, headers={ADAPTER_HEADER: result.adapter})


def search_hit(h: Hit) -> SearchHit:
    return SearchHit(id=h.id, score=h.score, text=h.text, metadata=h.metadata, span=h.span, window=h.window)


def _upsert_result(r: Any) -> UpsertResponse:
    return UpsertResponse(upserted=r.upserted, windows=r.windows, windowed=r.windowed)


def collection_info(engine: Engine, name: str) -> CollectionInfo:
    if (problem := engine.collections.damaged().get(name)) is not None:
        return CollectionInfo(name=name, status="damaged", problem=problem)
    mismatched = engine.collections.mismatched()
    if name in mismatched:
        c = mismatched[name]
        job = engine.collections.reindexing().get(name)
        return CollectionInfo(
            name=name, status="base_mismatch" if job is None else "reindexing", index=c.index,
            base_fingerprint=c.base_fingerprint, dim=c.dim, created=c.created, job=job or None,
        )
    collection = engine.collection(name)
    docs, windows = collection.counts()
    c = collection.config
    return CollectionInfo(
        name=name, status="ready", index=c.index, base_fingerprint=c.base_fingerprint, dim=c.dim, created=c.created,
        documents=docs, windows=windows, searching_with=collection.kind,
    )


class EvalController(Controller):
    """Retrieval evaluation over HTTP, and the background jobs that run the large ones."""

    tags = ["eval"]
    opt = READ
    security = SECURITY

    @post("/eval", status_code=200, responses={202: documented(JobAccepted, "a background job (large evaluations)"), **errors(400, 401, 403, 404, 409, 413, 429, 503)})
    async def evaluate(self, data: JSONBody[EvalRequest], state: State) -> Response[EvalResponse]:
        """Base vs adapters on a dataset (inline) or on a collection with queries and relevant ids: the same
        metrics and names as ``embedlift eval --json``; ``per_query`` adds each query's rank per model."""
        settings: Settings = state.settings
        engine = engine_of(state)
        adapters = engine.models_for_eval(data.adapters)  # unknown names: 404 before any work
        if sum(x is not None for x in (data.dataset, data.dataset_name, data.collection)) != 1:
            raise InvalidInputError(
                "send exactly one of `dataset` (EmbeddingQAFinetuneDataset JSON), `dataset_name` (a stored dataset, "
                "see GET /datasets) or `collection` (with `queries` and `relevant_docs`)"
            )
        if data.dataset is not None or data.dataset_name is not None:
            if data.queries is not None or data.relevant_docs is not None:
                raise InvalidInputError("`queries` and `relevant_docs` go inside the dataset (or use `collection`)")
            if data.dataset_name is not None:
                ds = await asyncio.to_thread(load_dataset, stored_dataset(settings, data.dataset_name))
            else:
                ds = validate(QADataset(queries=data.dataset.queries, corpus=data.dataset.corpus, relevant_docs=data.dataset.relevant_docs), "dataset")
            size = len(ds.queries) + len(ds.corpus)

            def work(job: Job | None = None) -> EvalResponse:
                return eval_response(engine.evaluate_dataset(ds, adapters, data.k), adapters, data.per_query)
        else:
            if not data.queries or not data.relevant_docs:
                raise InvalidInputError("with `collection`, send `queries` ({id: text}) and `relevant_docs` ({id: [document ids]})")
            collection = engine.collection(data.collection)  # type: ignore[arg-type]
            queries, relevant = data.queries, data.relevant_docs
            size = len(queries) + collection.counts()[0]

            def work(job: Job | None = None) -> EvalResponse:
                return eval_response(engine.evaluate_collection(collection.name, queries, relevant, adapters, data.k), adapters, data.per_query)

        if data.background or size > settings.sync_eval_texts:
            return accepted(engine.jobs.submit("eval", work, total=size))  # type: ignore[return-value]
        return Response(await run_model_work(engine, work))

    @get("/datasets", responses=errors(401, 403))
    async def datasets(self, state: State) -> DatasetList:
        """Stored evaluation datasets (``NAME.json`` in the server's datasets directory), for ``dataset_name``."""
        folder = state.settings.datasets_path
        files = [f for f in sorted(folder.glob("*.json")) if valid_name(f.stem)] if folder.is_dir() else []
        stats = [(f.stem, f.stat()) for f in files]
        return DatasetList(datasets=[
            StoredDataset(name=name, bytes=st.st_size, modified=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)))
            for name, st in stats
        ])

    @get("/jobs/{job_id:str}", responses=errors(401, 403, 404, 503))
    async def job(self, job_id: FromPath[str], state: State) -> JobInfo:
        """A background job's status, progress (``done`` of ``total``) and, when it succeeded, its result."""
        return job_info(engine_of(state).jobs.get(job_id))


def stored_dataset(settings: Settings, name: str) -> Path:
    """``NAME.json`` inside the datasets directory, never a path outside it (the name pattern has no ``/``)."""
    path = settings.datasets_path / f"{check_name(name, 'dataset')}.json"
    if not path.is_file():
        raise NotFoundError(f"no stored dataset {name!r} in {settings.datasets_path}; see GET /datasets, or send `dataset` inline")
    return path


def eval_response(comparison: Any, adapters: Sequence[LoadedAdapter], per_query: bool) -> EvalResponse:
    return EvalResponse(
        metrics=comparison.to_json(),
        models={BASE: BASE, **{a.name: a.label for a in adapters}},
        queries=len(comparison.query_ids),
        documents=comparison.n_docs,
        windowed=comparison.n_windowed,
        ranks=comparison.ranks() if per_query else None,
    )


@dataclass
class RegisterAdapterOperation(Operation):
    """``POST /adapters`` takes JSON ``{"name"}`` or a tar of the checkpoint directory; declare both."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            description="JSON `{\"name\": ...}` (a directory of the adapters directory), or a tar (optionally "
            "gzipped) of a checkpoint directory: `tar -c -C adapters/NAME . | curl --data-binary @- -H 'Content-Type: application/x-tar'`",
            content={
                "application/json": OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        required=["name"],
                        properties={"name": Schema(type=OpenAPIType.STRING, pattern=NAME_PATTERN)},
                        additional_properties=False,
                    )
                ),
                "application/x-tar": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format="binary")),
                "application/gzip": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format="binary")),
            },
        )


class AdaptersController(Controller):
    """The adapter registry: list, register (hot: validated fully before it can be served), activate,
    roll back, delete."""

    path = "/adapters"
    tags = ["adapters"]
    security = SECURITY

    @get("/", opt=READ, responses=errors(401, 403, 503))
    async def list_adapters(self, state: State) -> AdapterList:
        """Registered adapters with version, kind, base fingerprint, training metrics and which is active."""
        engine = engine_of(state)
        active = engine.active
        return AdapterList(active=active.label if active else None, adapters=[adapter_info(a, active) for a in engine.adapters()])

    @post(
        "/", opt=ADMIN, status_code=201, operation_class=RegisterAdapterOperation,
        request_max_body_size=None, responses=errors(400, 401, 403, 404, 409, 413, 503),
    )
    async def register(self, request: Request, state: State, name: str | None = Parameter(default=None, pattern=NAME_PATTERN, description="name for an uploaded tar (default: the checkpoint's own)")) -> AdapterInfo:
        """Register a checkpoint (a new name is version 1; a name registered again gets the next version).
        A checkpoint that fails validation (damaged, wrong base or shape) is refused and nothing changes."""
        engine = engine_of(state)
        body = await read_upload(request, state.settings.max_upload_bytes)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type in ("", "application/json"):
            try:
                spec = msgspec.json.decode(body, type=AdapterRegister)
            except msgspec.ValidationError as exc:
                raise InvalidInputError(f"invalid body: {exc}") from exc
            except msgspec.DecodeError as exc:
                raise InvalidInputError(f"the body is not valid JSON ({exc}); send {{\"name\": \"...\"}} or a tar with Content-Type: application/x-tar") from exc
            loaded = await asyncio.to_thread(engine.registry.register_name, spec.name)
        elif content_type in ("application/x-tar", "application/gzip", "application/x-gzip", "application/octet-stream"):
            loaded = await asyncio.to_thread(engine.registry.register_tar, body, name)
        else:
            raise InvalidInputError(f"unsupported Content-Type {content_type!r}: send application/json or application/x-tar")
        return adapter_info(loaded, engine.active)

    @post("/{name:str}/activate", opt=ADMIN, status_code=200, responses=errors(401, 403, 404, 503))
    async def activate(self, name: NamePath, state: State) -> ActiveAdapter:
        """Hot swap: requests that name no adapter use ``name`` from now on (``base``: no adapter).
        Requests in flight finish on the adapter they started with."""
        loaded = await asyncio.to_thread(engine_of(state).registry.activate, name)  # it fsyncs the registry state
        return ActiveAdapter(active=loaded.label if loaded else None)

    @post("/rollback", opt=ADMIN, status_code=200, responses=errors(401, 403, 409, 503))
    async def rollback(self, state: State) -> ActiveAdapter:
        """Back to the previously active adapter."""
        loaded = await asyncio.to_thread(engine_of(state).registry.rollback)
        return ActiveAdapter(active=loaded.label if loaded else None)

    @delete("/{name:str}", opt=ADMIN, status_code=204, responses=errors(401, 403, 404, 409, 503))
    async def delete_adapter(self, name: NamePath, state: State) -> None:
        """Unregister an adapter and remove its checkpoint directory; the active one cannot be deleted."""
        engine = engine_of(state)
        engine.registry.delete(name)
        for c in engine.collections.all():
            c.drop_views({a.label for a in engine.adapters()})


async def read_upload(request: Request, limit: int) -> bytes:
    """The body of a checkpoint upload (which may be larger than the JSON limit), read up to ``limit`` bytes:
    one byte more is a 413 before the rest is read."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"the upload is over {limit} bytes (max_upload_bytes); a checkpoint tar is far smaller")
        chunks.append(chunk)
    return b"".join(chunks)


def adapter_info(a: LoadedAdapter, active: LoadedAdapter | None) -> AdapterInfo:
    c = a.checkpoint.config
    return AdapterInfo(
        name=a.name, version=a.version, label=a.label, kind=c.kind, apply_to=c.apply_to,
        base_fingerprint=c.base.fingerprint, created=c.created, active=active is not None and active.name == a.name,
        metrics=dict(c.metrics),
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


HTTP_CODES = {
    400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "too_large", 415: "unsupported_media_type", 429: "overloaded",
}


def handle_http_exception(request: Request, exc: HTTPException) -> Response:
    """Litestar's own errors (validation 400, unknown route 404, 405, 413) in our shapes."""
    message = exc.detail
    extra = getattr(exc, "extra", None)
    if extra:
        message = f"{message}: " + "; ".join(
            f"{e.get('key', '')} {e.get('message', '')}".strip() if isinstance(e, dict) else str(e) for e in extra
        )
    return _error_response(request, exc.status_code, HTTP_CODES.get(exc.status_code, "error"), message, exc.headers)


def handle_internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_response(request, 500, "internal_error", "internal error; see the server log")


# ------------------------------------------------------------------------------------------------- app
def create_app(settings: Settings | None = None, engine: Engine | None = None) -> Litestar:
    """Build the app. With ``engine`` given it is ready at once; otherwise the engine loads in a thread at
    start-up, so ``/health`` answers (and ``/ready`` says 503) while the model, adapters and collections load."""
    settings = settings or Settings.from_sources()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # A thread per admitted request: each waits on the batcher while the model runs (asyncio's default
        # pool has cpu + 4 threads, which would cap the requests that can share a batch).
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=settings.max_concurrent + 8, thread_name_prefix="embedlift")
        )
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
            if (loaded := app.state.get("engine")) is not None:
                loaded.close()

    prometheus = PrometheusConfig(app_name="embedlift", prefix="embedlift", group_path=True, exclude=["/metrics"])
    app = Litestar(
        route_handlers=[
            OpsController, MetricsController, EmbedController, CollectionsController, EvalController, AdaptersController,
            # the playground: static files calling the public API with the keys the user types (so no auth here)
            create_static_files_router(path="/ui", directories=[UI_DIR], html_mode=True, include_in_schema=False, name="ui"),
        ],
        state=State({"settings": settings, "engine": engine}),
        lifespan=[lifespan],
        guards=[auth_guard],
        middleware=[prometheus.middleware],
        exception_handlers={
            EmbedliftError: handle_embedlift_error,
            HTTPException: handle_http_exception,
            Exception: handle_internal_error,
        },
        request_max_body_size=settings.max_body_bytes,
        cors_config=cors_config(settings),
        openapi_config=OpenAPIConfig(
            title="embedlift",
            version="0.1.0",
            description="Adapters over frozen embedding models: embed, search and evaluate.\n\nStatus codes, on every route: "
            + "; ".join(f"{c}: {d}" for c, d in STATUS_TABLE.items()),
            path="/schema",
            render_plugins=[SwaggerRenderPlugin(path="/")],
            components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}),
        ),
    )
    declare_body_rules(app)
    return app


def cors_config(settings: Settings) -> CORSConfig | None:
    """CORS only when origins are configured: by default no CORS headers, so a page on another site cannot
    read responses in a user's browser."""
    if not settings.cors_origins:
        return None
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    return CORSConfig(
        allow_origins=origins, allow_methods=["GET", "POST", "PUT", "DELETE"], allow_headers=["Authorization", "Content-Type"],
        expose_headers=[ADAPTER_HEADER, WINDOWS_HEADER, "Retry-After"],
    )


def declare_body_rules(app: Litestar) -> None:
    """What Litestar's schema generation leaves out of the request bodies, so the spec says what the server
    does (schemathesis checks it): ``additionalProperties: false`` on bodies that refuse unknown fields, and
    the rules across fields (``BODY_RULES``)."""
    components = app.openapi_schema.components.schemas or {}
    for name in closed_bodies():
        if isinstance(schema := components.get(name), Schema):
            schema.additional_properties = False
    for name, rules in BODY_RULES.items():
        schema = components[name]
        aliases = schema.field_aliases()  # JSON Schema keyword -> Schema attribute
        for key, value in rules.items():
            setattr(schema, aliases.get(key, key), value)
