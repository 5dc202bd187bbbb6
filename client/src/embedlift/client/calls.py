"""Every route of embedlift's API as a ``Call``: method, path, body and how to read the answer. ``Client`` and
``AsyncClient`` send the same calls, one with httpx's blocking client and one with its async one, so the two
cannot differ in what they send or how they read it; only the waiting (``time.sleep`` or ``asyncio.sleep``)
differs.

Also here: the retry rule (429 and 503, honouring ``Retry-After``; a refused connection), base64 vectors
decoded to floats, and the keyword options of the routes that take many (``TypedDict``, so a type checker
checks them).
"""

from __future__ import annotations

import base64
import io
import sys
import tarfile
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, TypedDict, TypeVar
from urllib.parse import quote

import msgspec

from embedlift.client.schemas import (
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
    Document,
    EmbedRequest,
    EmbedResponse,
    Embedding,
    EvalRequest,
    EvalResponse,
    Fusion,
    Health,
    IndexKind,
    JobAccepted,
    JobInfo,
    LexicalSettings,
    Mode,
    ModelList,
    SearchHit,
    SearchRequest,
    SearchResponse,
    StoredDataset,
    StoredDocument,
    UpsertRequest,
    UpsertResponse,
    Usage,
)

T = TypeVar("T")
Role = Literal["query", "document"]
#: Statuses worth another try: overloaded, and not ready / database unreachable.
RETRY_STATUSES = frozenset({429, 503})
#: The longest the client waits between two tries, whatever Retry-After says.
MAX_DELAY = 30.0


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request and how to read its successful answer (``decode(status, body)``)."""

    method: str
    path: str
    decode: Callable[[int, bytes], T]
    body: Any = None  # a msgspec Struct (or anything msgspec encodes) sent as JSON
    content: bytes | None = None  # a raw body instead (a checkpoint tar)
    content_type: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)

    def request_args(self) -> dict[str, Any]:
        headers = {}
        content = self.content
        if self.body is not None:
            content, headers["Content-Type"] = msgspec.json.encode(self.body), "application/json"
        elif self.content_type:
            headers["Content-Type"] = self.content_type
        return {"method": self.method, "url": self.path, "content": content, "headers": headers, "params": dict(self.params) or None}


def retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds from now (it may be seconds or an HTTP date); ``None`` when absent or
    unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        import datetime as dt

        return max((parsedate_to_datetime(value) - dt.datetime.now(dt.timezone.utc)).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


def retry_delay(asked: float | None, attempt: int) -> float:
    """Seconds before another try: what the server asked for (``retry_after``) when it did, else exponential
    backoff from half a second; never more than ``MAX_DELAY``."""
    return min(asked if asked is not None else 0.5 * 2**attempt, MAX_DELAY)


# ---------------------------------------------------------------------------------------------- decoders
def struct(type: type[T]) -> Callable[[int, bytes], T]:
    def decode(status: int, content: bytes) -> T:
        return msgspec.json.decode(content, type=type)

    return decode


def nothing(status: int, content: bytes) -> None:
    return None


def or_job(type: type[T]) -> Callable[[int, bytes], T | JobInfo]:
    """The route's answer, or the background job it started (202)."""

    def decode(status: int, content: bytes) -> T | JobInfo:
        if status == 202:
            return msgspec.json.decode(content, type=JobAccepted).job
        return msgspec.json.decode(content, type=type)

    return decode


def floats(encoded: list[float] | str) -> list[float]:
    """A vector from the wire: base64 little-endian float32 (what the client asks for: a quarter of JSON's size)."""
    if not isinstance(encoded, str):
        return encoded
    values = array("f", base64.b64decode(encoded))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def vectors(response: EmbedResponse) -> list[list[float]]:
    """An answer's vectors, in input order."""
    return [floats(item.embedding) for item in response.data]


def match(hit: SearchHit, mode_used: str | None) -> dict[str, Any]:
    """What a search knows of one hit beyond its document, for the integrations to carry in metadata."""
    found: dict[str, Any] = {"score": hit.score, "span": list(hit.span), "window": hit.window, "mode_used": mode_used}
    if hit.scores is not None:
        found["scores"] = {"dense": hit.scores.dense, "lexical": hit.scores.lexical}
    return found


def embeddings(status: int, content: bytes) -> EmbedResponse:
    response = msgspec.json.decode(content, type=EmbedResponse)
    for item in response.data:
        item.embedding = floats(item.embedding)
        for window in item.windows or ():
            window.embedding = floats(window.embedding)
    return response


def joined(parts: Sequence[EmbedResponse]) -> EmbedResponse:
    """Batches of one ``embed`` joined into one answer, indexes running over all of them."""
    data: list[Embedding] = []
    for part in parts:
        data += [msgspec.structs.replace(item, index=len(data) + i) for i, item in enumerate(part.data)]
    usage = Usage(prompt_tokens=sum(p.usage.prompt_tokens for p in parts), total_tokens=sum(p.usage.total_tokens for p in parts))
    return EmbedResponse(data=data, model=parts[-1].model, adapter=parts[-1].adapter, usage=usage)


# ---------------------------------------------------------------------------------------------- options
class CollectionOptions(TypedDict, total=False):
    """``PUT /collections/{name}``'s settings (see ``CollectionCreate``)."""

    index: IndexKind
    hnsw_m: int
    ef_construction: int
    ef_search: int
    lexical: LexicalSettings | Mapping[str, str] | None  # None: no lexical index
    alpha: float | None


class SearchOptions(TypedDict, total=False):
    """``POST /collections/{name}/search``'s options (see ``SearchRequest``)."""

    k: int
    adapter: str | None
    filter: Mapping[str, Any] | None
    mode: Mode | None
    fusion: Fusion
    alpha: float | None
    score_threshold: float | None
    offset: int


class EvalOptions(TypedDict, total=False):
    """``POST /eval``'s body (see ``EvalRequest``): a dataset inline, a stored one, or a collection with queries."""

    dataset: Any  # EvalDataset, or its JSON as a dict (LlamaIndex's EmbeddingQAFinetuneDataset)
    dataset_name: str
    collection: str
    queries: Mapping[str, str]
    relevant_docs: Mapping[str, Sequence[str]]
    adapters: Sequence[str]
    k: Sequence[int]
    per_query: bool
    background: bool
    mode: Literal["dense", "hybrid"]
    fusion: Fusion


def name(value: str) -> str:
    """A path segment (collection, adapter, document id), escaped."""
    return quote(value, safe="")


# ---------------------------------------------------------------------------------------------- calls
def health() -> Call[Health]:
    return Call("GET", "/health", struct(Health))


def ready() -> Call[Health]:
    return Call("GET", "/ready", struct(Health))


def metrics() -> Call[str]:
    return Call("GET", "/metrics", lambda status, content: content.decode())


def models() -> Call[ModelList]:
    return Call("GET", "/v1/models", struct(ModelList))


class EmbedOptions(NamedTuple):
    """What every batch of one ``embed`` call is sent with."""

    role: Role = "query"
    adapter: str | None = None
    normalize: bool = True
    truncate: bool = False
    windows: bool = False


def embed(texts: Sequence[str], options: EmbedOptions) -> Call[EmbedResponse]:
    body = EmbedRequest(
        input=list(texts), input_type=options.role, adapter=options.adapter, normalize=options.normalize,
        truncate=options.truncate, return_windows=options.windows, encoding_format="base64",
    )
    return Call("POST", "/embed", embeddings, body=body)


def list_collections() -> Call[list[CollectionInfo]]:
    return Call("GET", "/collections", lambda status, content: msgspec.json.decode(content, type=CollectionList).collections)


def create_collection(collection: str, options: CollectionOptions) -> Call[CollectionInfo]:
    return Call("PUT", f"/collections/{name(collection)}", struct(CollectionInfo), body=CollectionCreate(**options))  # type: ignore[arg-type]


def get_collection(collection: str) -> Call[CollectionInfo]:
    return Call("GET", f"/collections/{name(collection)}", struct(CollectionInfo))


def delete_collection(collection: str) -> Call[None]:
    return Call("DELETE", f"/collections/{name(collection)}", nothing)


def reindex(collection: str) -> Call[JobInfo]:
    return Call("POST", f"/collections/{name(collection)}/reindex", lambda status, content: msgspec.json.decode(content, type=JobAccepted).job)


def upsert(collection: str, documents: Iterable[Document | Mapping[str, Any]]) -> Call[UpsertResponse | JobInfo]:
    """Documents as ``Document`` structs or dicts of the same fields (``id``, ``text``, ``metadata``)."""
    # Dicts go as they are: the server validates them as Documents (and its 400 names the field).
    body = UpsertRequest(documents=list(documents))  # type: ignore[arg-type]
    return Call("POST", f"/collections/{name(collection)}/documents", or_job(UpsertResponse), body=body)


def get_document(collection: str, doc_id: str) -> Call[StoredDocument]:
    return Call("GET", f"/collections/{name(collection)}/documents/{name(doc_id)}", struct(StoredDocument))


def delete_documents(collection: str, ids: Iterable[str]) -> Call[DeleteResponse]:
    return Call("POST", f"/collections/{name(collection)}/documents/delete", struct(DeleteResponse), body=DeleteRequest(ids=list(ids)))


def search(collection: str, query: str | Sequence[str], options: SearchOptions) -> Call[SearchResponse]:
    """One query (the answer's ``hits``) or a batch (``results``, one per query)."""
    batch = {"queries": list(query)} if not isinstance(query, str) else {"query": query}
    body = SearchRequest(**batch, **options)  # type: ignore[arg-type]
    return Call("POST", f"/collections/{name(collection)}/search", struct(SearchResponse), body=body)


def evaluate(options: EvalOptions) -> Call[EvalResponse | JobInfo]:
    return Call("POST", "/eval", or_job(EvalResponse), body=EvalRequest(**options))  # type: ignore[arg-type]


def datasets() -> Call[list[StoredDataset]]:
    return Call("GET", "/datasets", lambda status, content: msgspec.json.decode(content, type=DatasetList).datasets)


def job(job_id: str) -> Call[JobInfo]:
    return Call("GET", f"/jobs/{name(job_id)}", struct(JobInfo))


def adapters() -> Call[AdapterList]:
    return Call("GET", "/adapters", struct(AdapterList))


def register_adapter(adapter: str) -> Call[AdapterInfo]:
    """Register the checkpoint directory ``adapter`` of the server's adapters directory."""
    return Call("POST", "/adapters", struct(AdapterInfo), body=AdapterRegister(name=adapter))


def upload_adapter(path: str | Path, adapter: str | None) -> Call[AdapterInfo]:
    """Upload a checkpoint: a directory (sent as a tar built in memory) or a ``.tar`` / ``.tar.gz`` file."""
    path = Path(path)
    if path.is_dir():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                tar.add(file, arcname=str(file.relative_to(path)))
        content, content_type = buffer.getvalue(), "application/x-tar"
    else:
        content = path.read_bytes()
        content_type = "application/gzip" if content[:2] == b"\x1f\x8b" else "application/x-tar"
    params = {"name": adapter} if adapter else {}
    return Call("POST", "/adapters", struct(AdapterInfo), content=content, content_type=content_type, params=params)


def activate(adapter: str) -> Call[ActiveAdapter]:
    return Call("POST", f"/adapters/{name(adapter)}/activate", struct(ActiveAdapter))


def rollback() -> Call[ActiveAdapter]:
    return Call("POST", "/adapters/rollback", struct(ActiveAdapter))


def delete_adapter(adapter: str) -> Call[None]:
    return Call("DELETE", f"/adapters/{name(adapter)}", nothing)
