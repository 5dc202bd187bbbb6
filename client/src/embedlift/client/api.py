"""``Client`` and ``AsyncClient``: every route of embedlift's API as a typed method.

Both send the calls of ``calls.py`` and differ only in how they wait. Each method returns the route's msgspec
Struct (the very type the server answers with); an error status raises the ``errors`` exception of that status,
carrying the server's message and the field at fault. 429 and 503 are retried (``max_retries``, honouring
``Retry-After``), as is a refused connection (a replica restarting). ``embed`` splits a long list of texts into
requests within the server's limits; ``upsert`` and ``evaluate`` wait for the background job a large request
becomes, unless told not to (``wait=False`` returns the job, and ``wait(job)`` waits for it later).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, Unpack, overload

import httpx

from embedlift.client import calls
from embedlift.client.calls import Call, CollectionOptions, EvalOptions, Role, SearchOptions
from embedlift.client.errors import JobFailedError, JobTimeoutError, RequestTooLargeError, api_error, result_of
from embedlift.client.schemas import (
    ActiveAdapter,
    AdapterInfo,
    AdapterList,
    CollectionInfo,
    DeleteResponse,
    Document,
    EmbedResponse,
    EvalResponse,
    Health,
    JobInfo,
    ModelList,
    SearchResponse,
    StoredDataset,
    StoredDocument,
    UpsertResponse,
)

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8080"
#: Texts per ``/embed`` request: well inside the server's 2048 inputs, small enough to pipeline.
EMBED_BATCH = 256
#: How often ``wait`` asks about a job.
POLL_SECONDS = 0.25


class _Settings:
    """What both clients are configured with."""

    def __init__(
        self, base_url: str | None, api_key: str | None, timeout: float, max_retries: int, headers: Mapping[str, str] | None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("EMBEDLIFT_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("EMBEDLIFT_API_KEY")
        self.headers = {"User-Agent": "embedlift-client", **(headers or {})}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.timeout = timeout
        self.max_retries = max_retries

    def retry(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before trying again, or ``None`` to stop (``response`` ``None``: the connection was
        refused)."""
        if attempt >= self.max_retries:
            return None
        if response is None:
            return calls.retry_delay(None, attempt)
        if response.status_code not in calls.RETRY_STATUSES:
            return None
        return calls.retry_delay(calls.retry_after(response.headers.get("Retry-After")), attempt)

    @staticmethod
    def finish(call: Call[T], response: httpx.Response) -> T:
        if response.status_code >= 400:
            raise api_error(response.status_code, response.content, calls.retry_after(response.headers.get("Retry-After")))
        return call.decode(response.status_code, response.content)


def _batches(texts: Sequence[str], size: int) -> list[Sequence[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def _texts(texts: str | Sequence[str]) -> Sequence[str]:
    return [texts] if isinstance(texts, str) else texts


class Client:
    """A blocking client of one embedlift server.

    Args:
        base_url: The server (default ``$EMBEDLIFT_URL``, else ``http://127.0.0.1:8080``).
        api_key: Sent as ``Authorization: Bearer`` (default ``$EMBEDLIFT_API_KEY``; none when unset).
        timeout: Seconds per request.
        max_retries: Further tries of a 429, a 503 or a refused connection.
        headers: Extra headers on every request.
        http_client: An ``httpx.Client`` of your own (its base URL and headers are left as they are).
    """

    def __init__(
        self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3,
        headers: Mapping[str, str] | None = None, http_client: httpx.Client | None = None,
    ) -> None:
        self._settings = s = _Settings(base_url, api_key, timeout, max_retries, headers)
        self.base_url = s.base_url
        self._http = http_client or httpx.Client(base_url=s.base_url, headers=s.headers, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call[T]) -> T:
        """One call, retried as the settings say."""
        attempt = 0
        while True:
            try:
                response = self._http.request(**call.request_args())
            except httpx.ConnectError:
                if (delay := self._settings.retry(attempt, None)) is None:
                    raise
            else:
                if (delay := self._settings.retry(attempt, response)) is None:
                    return self._settings.finish(call, response)
            time.sleep(delay)
            attempt += 1

    # ------------------------------------------------------------------------------------------ service
    def health(self) -> Health:
        return self.send(calls.health())

    def ready(self) -> bool:
        """Whether the server is ready (model, adapters and collections loaded; its database reachable)."""
        response = self._http.get("/ready")
        return response.status_code == 200

    def models(self) -> ModelList:
        return self.send(calls.models())

    def metrics(self) -> str:
        return self.send(calls.metrics())

    # ------------------------------------------------------------------------------------------ embeddings
    def embed(
        self, texts: str | Sequence[str], *, input_type: Role = "query", adapter: str | None = None, normalize: bool = True,
        truncate: bool = False, return_windows: bool = False, batch_size: int = EMBED_BATCH,
    ) -> EmbedResponse:
        """Vectors of ``texts`` as queries or documents (an adapter applies to the query side unless trained for
        both; ``adapter="base"``: none); ``return_windows`` adds each window's vector and span. Sent in requests
        of ``batch_size`` texts; a request over the server's token budget is split in two until it fits."""
        options = calls.EmbedOptions(input_type, adapter, normalize, truncate, return_windows)
        return calls.joined([self._embed(batch, options) for batch in _batches(_texts(texts), batch_size)])

    def _embed(self, texts: Sequence[str], options: calls.EmbedOptions) -> EmbedResponse:
        try:
            return self.send(calls.embed(texts, options))
        except RequestTooLargeError:
            if len(texts) == 1:
                raise
            half = len(texts) // 2
            return calls.joined([self._embed(part, options) for part in (texts[:half], texts[half:])])

    # ------------------------------------------------------------------------------------------ collections
    def list_collections(self) -> list[CollectionInfo]:
        return self.send(calls.list_collections())

    def create_collection(self, name: str, **options: Unpack[CollectionOptions]) -> CollectionInfo:
        """Create a collection (the same settings again are a no-op; other settings raise ``ConflictError``)."""
        return self.send(calls.create_collection(name, options))

    def get_collection(self, name: str) -> CollectionInfo:
        return self.send(calls.get_collection(name))

    def delete_collection(self, name: str) -> None:
        self.send(calls.delete_collection(name))

    def reindex(self, name: str) -> JobInfo:
        """Re-embed a collection onto the server's base in the background; ``wait()`` the job."""
        return self.send(calls.reindex(name))

    @overload
    def upsert(self, collection: str, documents: Iterable[Document | Mapping[str, Any]], *, wait: Literal[True] = ..., timeout: float | None = ...) -> UpsertResponse: ...
    @overload
    def upsert(self, collection: str, documents: Iterable[Document | Mapping[str, Any]], *, wait: bool, timeout: float | None = ...) -> UpsertResponse | JobInfo: ...

    def upsert(self, collection: str, documents: Iterable[Document | Mapping[str, Any]], *, wait: bool = True, timeout: float | None = None) -> UpsertResponse | JobInfo:
        """Insert or replace documents (``Document`` or dicts with ``id``, ``text``, ``metadata``). A large
        upsert runs as a job on the server: waited for (``timeout`` seconds at most), or returned with
        ``wait=False``."""
        answer = self.send(calls.upsert(collection, documents))
        if isinstance(answer, JobInfo) and wait:
            return result_of(self.wait(answer, timeout=timeout), UpsertResponse)
        return answer

    def get_document(self, collection: str, doc_id: str) -> StoredDocument:
        return self.send(calls.get_document(collection, doc_id))

    def delete_documents(self, collection: str, ids: Iterable[str]) -> DeleteResponse:
        return self.send(calls.delete_documents(collection, ids))

    def search(self, collection: str, query: str | Sequence[str], **options: Unpack[SearchOptions]) -> SearchResponse:
        """Top ``k`` documents for ``query`` (``.hits``) or for each of a list of queries (``.results``)."""
        return self.send(calls.search(collection, query, options))

    # ------------------------------------------------------------------------------------------ eval, jobs
    @overload
    def evaluate(self, *, wait: Literal[True] = ..., timeout: float | None = ..., **body: Unpack[EvalOptions]) -> EvalResponse: ...
    @overload
    def evaluate(self, *, wait: bool, timeout: float | None = ..., **body: Unpack[EvalOptions]) -> EvalResponse | JobInfo: ...

    def evaluate(self, *, wait: bool = True, timeout: float | None = None, **body: Unpack[EvalOptions]) -> EvalResponse | JobInfo:
        """Hit rate, MRR... of the base and adapters on a dataset; a large one is a job, waited for unless
        ``wait=False``."""
        answer = self.send(calls.evaluate(body))
        if isinstance(answer, JobInfo) and wait:
            return result_of(self.wait(answer, timeout=timeout), EvalResponse)
        return answer

    def datasets(self) -> list[StoredDataset]:
        return self.send(calls.datasets())

    def job(self, job_id: str) -> JobInfo:
        return self.send(calls.job(job_id))

    def wait(self, job: JobInfo | str, *, timeout: float | None = None, poll: float = POLL_SECONDS) -> JobInfo:
        """The job once it has ``succeeded``. Raises ``JobFailedError`` if it failed, ``JobTimeoutError`` after
        ``timeout`` seconds (the job goes on)."""
        info = job if isinstance(job, JobInfo) else self.job(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        while info.status in ("queued", "running"):
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(info, timeout or 0.0)
            time.sleep(poll)
            info = self.job(info.id)
        if info.status == "failed":
            raise JobFailedError(info)
        return info

    # ------------------------------------------------------------------------------------------ adapters
    def adapters(self) -> AdapterList:
        return self.send(calls.adapters())

    def register_adapter(self, name: str) -> AdapterInfo:
        return self.send(calls.register_adapter(name))

    def upload_adapter(self, path: str | Path, *, name: str | None = None) -> AdapterInfo:
        return self.send(calls.upload_adapter(path, name))

    def activate(self, name: str) -> ActiveAdapter:
        """Serve ``name`` (``"base"``: no adapter) to requests that name none, from now on."""
        return self.send(calls.activate(name))

    def rollback(self) -> ActiveAdapter:
        return self.send(calls.rollback())

    def delete_adapter(self, name: str) -> None:
        self.send(calls.delete_adapter(name))


class AsyncClient:
    """``Client``'s methods as coroutines, over ``httpx.AsyncClient``; the same arguments (see ``Client``)."""

    def __init__(
        self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3,
        headers: Mapping[str, str] | None = None, http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._settings = s = _Settings(base_url, api_key, timeout, max_retries, headers)
        self.base_url = s.base_url
        self._http = http_client or httpx.AsyncClient(base_url=s.base_url, headers=s.headers, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(**call.request_args())
            except httpx.ConnectError:
                if (delay := self._settings.retry(attempt, None)) is None:
                    raise
            else:
                if (delay := self._settings.retry(attempt, response)) is None:
                    return self._settings.finish(call, response)
            await asyncio.sleep(delay)
            attempt += 1

    async def health(self) -> Health:
        return await self.send(calls.health())

    async def ready(self) -> bool:
        return (await self._http.get("/ready")).status_code == 200

    async def models(self) -> ModelList:
        return await self.send(calls.models())

    async def metrics(self) -> str:
        return await self.send(calls.metrics())

    async def embed(
        self, texts: str | Sequence[str], *, input_type: Role = "query", adapter: str | None = None, normalize: bool = True,
        truncate: bool = False, return_windows: bool = False, batch_size: int = EMBED_BATCH,
    ) -> EmbedResponse:
        """As ``Client.embed``; the batches are sent concurrently (the server batches them for the model)."""
        options = calls.EmbedOptions(input_type, adapter, normalize, truncate, return_windows)
        return calls.joined(await asyncio.gather(*(self._embed(batch, options) for batch in _batches(_texts(texts), batch_size))))

    async def _embed(self, texts: Sequence[str], options: calls.EmbedOptions) -> EmbedResponse:
        try:
            return await self.send(calls.embed(texts, options))
        except RequestTooLargeError:
            if len(texts) == 1:
                raise
            half = len(texts) // 2
            return calls.joined([await self._embed(part, options) for part in (texts[:half], texts[half:])])

    async def list_collections(self) -> list[CollectionInfo]:
        return await self.send(calls.list_collections())

    async def create_collection(self, name: str, **options: Unpack[CollectionOptions]) -> CollectionInfo:
        return await self.send(calls.create_collection(name, options))

    async def get_collection(self, name: str) -> CollectionInfo:
        return await self.send(calls.get_collection(name))

    async def delete_collection(self, name: str) -> None:
        await self.send(calls.delete_collection(name))

    async def reindex(self, name: str) -> JobInfo:
        return await self.send(calls.reindex(name))

    @overload
    async def upsert(self, collection: str, documents: Iterable[Document | Mapping[str, Any]], *, wait: Literal[True] = ..., timeout: float | None = ...) -> UpsertResponse: ...
    @overload
    async def upsert(self, collection: str, documents: Iterable[Document | Mapping[str, Any]], *, wait: bool, timeout: float | None = ...) -> UpsertResponse | JobInfo: ...

    async def upsert(self, collection: str, documents: Iterable[Document | Mapping[str, Any]], *, wait: bool = True, timeout: float | None = None) -> UpsertResponse | JobInfo:
        answer = await self.send(calls.upsert(collection, documents))
        if isinstance(answer, JobInfo) and wait:
            return result_of(await self.wait(answer, timeout=timeout), UpsertResponse)
        return answer

    async def get_document(self, collection: str, doc_id: str) -> StoredDocument:
        return await self.send(calls.get_document(collection, doc_id))

    async def delete_documents(self, collection: str, ids: Iterable[str]) -> DeleteResponse:
        return await self.send(calls.delete_documents(collection, ids))

    async def search(self, collection: str, query: str | Sequence[str], **options: Unpack[SearchOptions]) -> SearchResponse:
        return await self.send(calls.search(collection, query, options))

    @overload
    async def evaluate(self, *, wait: Literal[True] = ..., timeout: float | None = ..., **body: Unpack[EvalOptions]) -> EvalResponse: ...
    @overload
    async def evaluate(self, *, wait: bool, timeout: float | None = ..., **body: Unpack[EvalOptions]) -> EvalResponse | JobInfo: ...

    async def evaluate(self, *, wait: bool = True, timeout: float | None = None, **body: Unpack[EvalOptions]) -> EvalResponse | JobInfo:
        answer = await self.send(calls.evaluate(body))
        if isinstance(answer, JobInfo) and wait:
            return result_of(await self.wait(answer, timeout=timeout), EvalResponse)
        return answer

    async def datasets(self) -> list[StoredDataset]:
        return await self.send(calls.datasets())

    async def job(self, job_id: str) -> JobInfo:
        return await self.send(calls.job(job_id))

    async def wait(self, job: JobInfo | str, *, timeout: float | None = None, poll: float = POLL_SECONDS) -> JobInfo:
        info = job if isinstance(job, JobInfo) else await self.job(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        while info.status in ("queued", "running"):
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(info, timeout or 0.0)
            await asyncio.sleep(poll)
            info = await self.job(info.id)
        if info.status == "failed":
            raise JobFailedError(info)
        return info

    async def adapters(self) -> AdapterList:
        return await self.send(calls.adapters())

    async def register_adapter(self, name: str) -> AdapterInfo:
        return await self.send(calls.register_adapter(name))

    async def upload_adapter(self, path: str | Path, *, name: str | None = None) -> AdapterInfo:
        return await self.send(calls.upload_adapter(path, name))

    async def activate(self, name: str) -> ActiveAdapter:
        return await self.send(calls.activate(name))

    async def rollback(self) -> ActiveAdapter:
        return await self.send(calls.rollback())

    async def delete_adapter(self, name: str) -> None:
        await self.send(calls.delete_adapter(name))


class PerLoop:
    """An ``AsyncClient`` for the running event loop: httpx's async connections belong to the loop that opened
    them, and code that calls ``asyncio.run`` more than once (a framework's sync wrappers, notebooks, tests)
    runs each call on a new loop. The integrations hold one of these instead of one ``AsyncClient``."""

    def __init__(self, make: Callable[[], AsyncClient]) -> None:
        self._make = make
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: AsyncClient | None = None

    def get(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._loop, self._client = loop, self._make()
        return self._client
