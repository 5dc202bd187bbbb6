"""The engine: the one API of the service, called by the HTTP controllers, the CLI and the tests.

It owns the base encoder (behind one dynamic batching queue and two caches of base vectors), the adapter
registry, the collections and the background jobs, and it checks every request limit. Methods that do model
or store work are ``async``: their blocking part runs off the event loop through one helper (``_offload``),
and model work is admitted or refused with 429 at once (``Admission``), never queued without bound.

A request resolves its adapter once, at its start, and uses that object to the end: swapping the active
adapter replaces one reference under a lock and never changes what an in-flight request computes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import numpy as np

from embedlift.models.cache import CachedEncoder, EmbeddingCache, MemoryCache, VectorCache
from embedlift.models.checkpoint import CheckpointError, base_info, read_config
from embedlift.models.encoders import Encoder, Role
from embedlift.models.errors import ConflictError, InvalidInputError, NotFoundError, OverloadedError
from embedlift.models.fusion import DEFAULT_ALPHA, Fusion, LearnedFusion, Mode
from embedlift.models.lexical import LexicalSettings
from embedlift.models.spec import BaseSpec, load_base
from embedlift.models.windows import Span, embed_documents, embed_pooled, pool, window_texts
from embedlift.service import limits, metrics
from embedlift.service.batching import BULK, INTERACTIVE, BatchedEncoder, BatchQueue
from embedlift.service.collections import Collection, CollectionManager, Filter, check_name, reindex, valid_name
from embedlift.service.collections.base import CollectionIndex
from embedlift.service.collections.collection import Found, SearchPlan
from embedlift.service.collections.postgres import PostgresHome
from embedlift.service.database import Database, open_store
from embedlift.service.shared_cache import DatabaseCache
from embedlift.service.shared_jobs import DatabaseJobStore
from embedlift.service.shared_registry import DatabaseAdapters
from embedlift.service.jobs import Job, JobRunner, JobStore
from embedlift.service.registry import BASE, AdapterRegistry, LoadedAdapter, RegistryFile, RegistryStateStore
from embedlift.service.schemas import (
    CollectionCreate,
    CollectionInfo,
    EvalDataset,
    DatasetList,
    DeleteResponse,
    Document,
    FusionInfo,
    EvalRequest,
    EvalResponse,
    SearchResponse,
    SearchResult,
    StoredDataset,
    StoredDocument,
    UpsertResponse,
)
from embedlift.service.settings import Settings
from embedlift.training.dataset import QADataset, load_dataset, validate
from embedlift.training.evaluate import HYBRID_SUFFIX, LEXICAL, Comparison, Hybrid, compare_runs
from embedlift.training.hybrid import with_lexical
from embedlift.training.pipeline import learned_alpha
from embedlift.training.finetuning import base_fusion
from embedlift.training.retrieval import EmbeddedDataset, embed_dataset

logger = logging.getLogger(__name__)

__all__ = ["BASE", "EmbedResult", "Engine", "LoadedAdapter"]
T = TypeVar("T")
#: Characters of input a request tokenises on the event loop itself (a few questions: tens of microseconds);
#: a larger request is tokenised on a worker thread.
INLINE_CHARS = 4096
#: An adapter's document view in the database of a collection up to this many windows is built at once; a
#: larger one by a background job (its searches answer 503, naming the job, until it is done).
SYNC_VIEW_WINDOWS = 5_000


@dataclass(frozen=True)
class EmbedResult:
    """Vectors for a request and what produced them.

    Attributes:
        vectors: ``(n, d)`` float32, one per input.
        adapter: ``name@version`` of the adapter used, or ``base``.
        windows: Windows each input was split into (1 = it fitted the model's window).
        tokens: Tokens the inputs cost the base model.
        window_vectors: With ``return_windows``: per input, its windows' spans and (adapted) vectors.
    """

    vectors: np.ndarray
    adapter: str
    windows: list[int]
    tokens: int
    window_vectors: list[tuple[list[tuple[int, int]], np.ndarray]] | None = None


@dataclass(frozen=True)
class ViewResult:
    collection: str
    adapter: str  # its label, name@version
    windows: int


@dataclass(frozen=True)
class ReindexResult:
    collection: str
    documents: int
    windows: int
    previous_base: str
    base: str


class Admission:
    """At most ``limit`` requests doing model work at once; one more is refused (429), never queued
    without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            if self._in_flight >= self.limit:
                raise OverloadedError(f"{self._in_flight} requests in progress (maximum {self.limit}); retry shortly")
            self._in_flight += 1

    def __exit__(self, *_: Any) -> None:
        with self._lock:
            self._in_flight -= 1


def served_spec(settings: Settings, state: RegistryStateStore) -> BaseSpec:
    """The base to serve: the base options given, with the identity fields they leave unset (prompts, sequence
    limit, ...) taken from the adapter the server will activate (``--adapter``, else the remembered active one),
    so an adapter trained with ``--query-prompt`` is served without repeating it."""
    name = settings.adapter or state.peek_active()
    if name in (None, BASE) or not valid_name(name):
        return settings.base
    try:
        recorded = read_config(settings.adapters_dir / name).base.base_spec()
    except CheckpointError:
        return settings.base  # the registry reports it when it loads
    if recorded is None:
        return settings.base
    filled = settings.base.fill_from(recorded)
    if taken := [f for f in filled.given() if f not in settings.base.given()]:
        logger.info("base settings taken from adapter %s: %s", name, filled.as_flags(taken))
    return filled


class Engine:
    """Owns the base encoder, the adapters, the collections and the jobs; thread-safe.

    Every model call goes through one ``BatchQueue`` (dynamic batching). Requests read and fill a bounded
    in-memory cache of base vectors (a hit skips the queue and the model); background work (upserts,
    evaluations, re-indexes) reads and fills the persistent cache, and yields the model to requests.

    Args:
        base: The base encoder.
        registry: The adapter registry (already loaded).
        collections: The collections (already loaded), or ``None`` for an engine over ``settings.data_dir``.
        settings: Limits, batching and cache sizes.
        bulk_cache: The persistent base-embedding cache for background work (``None``: none).
        jobs: Where jobs are kept (default: in memory).
    """

    def __init__(
        self,
        base: Encoder,
        registry: AdapterRegistry,
        collections: CollectionManager | None = None,
        settings: Settings | None = None,
        *,
        bulk_cache: VectorCache | None = None,
        jobs: JobStore | None = None,
    ) -> None:
        self.settings = s = settings or Settings()
        self.registry = registry
        self.batcher = BatchQueue(
            base, max_batch_inputs=s.max_batch_inputs, max_batch_tokens=s.max_batch_tokens, max_queued_inputs=s.max_queued_inputs
        )
        # The bulk encoder first: with a remote base it learns the dimension from the persistent cache.
        self.bulk_encoder = CachedEncoder(BatchedEncoder(self.batcher, BULK), bulk_cache, progress=False)
        memory = MemoryCache(s.cache_mb << 20) if s.cache_mb > 0 else None
        self.encoder = CachedEncoder(BatchedEncoder(self.batcher, INTERACTIVE), memory, progress=False)
        self.collections = collections or CollectionManager(s.data_dir / "collections", base.fingerprint, base.dim, base.spec)
        self.jobs = JobRunner(jobs)
        self.admission = Admission(s.max_concurrent)
        self.base_fusion: LearnedFusion | None = base_fusion(base.spec)  # a fine-tuned base's fitted alpha
        self.database: Database | None = None  # the shared store, when collections live in PostgreSQL
        self._stopping = threading.Event()
        #: Upserts' lexical analysis, beside the window planning of the same documents (``_upsert``).
        self._analysis = ThreadPoolExecutor(max_workers=2, thread_name_prefix="analysis")
        if isinstance(self.jobs.store, DatabaseJobStore):
            threading.Thread(target=self._take_over_jobs, args=(self.jobs.store,), name="jobs-take-over", daemon=True).start()
        registry.on_change = self._prepare_views
        metrics.track_engine(self)

    @classmethod
    def from_settings(cls, settings: Settings, *, watch: bool = True) -> Engine:
        """Load the base, open the caches, registry and collections: under ``data_dir``, or, with ``store``
        set, the collections and the adapter registry in the shared database."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        database = open_store(settings)
        shared = DatabaseAdapters(database) if database is not None else None
        state: RegistryStateStore = shared if shared is not None else RegistryFile(settings.data_dir / "registry.json")
        if shared is not None:
            shared.materialise_active(settings.adapters_dir)  # so the base can take the active adapter's settings
        base = load_base(served_spec(settings, state), api_key=settings.openai_api_key, compiled_dir=settings.data_dir / "openvino")
        bulk_cache: VectorCache = (
            DatabaseCache(database) if database is not None and settings.cache_store == "store"
            else EmbeddingCache(settings.data_dir / "base-embeddings.sqlite3")
        )
        if base.needs_dim and (known := bulk_cache.dim_of(base.fingerprint)):
            base.set_dim(known)  # a remote base's dimension without a probe call
        home = PostgresHome(database) if database is not None else settings.data_dir / "collections"
        collections = CollectionManager(home, base.fingerprint, base.dim, base.spec)
        collections.load_all()
        registry = AdapterRegistry(settings.adapters_dir, state, base_info(base), shared=shared)
        jobs = DatabaseJobStore(database, lease=settings.job_lease) if database is not None else None
        engine = cls(base, registry, collections, settings, bulk_cache=bulk_cache, jobs=jobs)
        engine.database = database
        registry.load(settings.adapter)
        if watch and settings.watch_interval > 0:
            registry.watch(settings.watch_interval)
        return engine

    def _take_over_jobs(self, store: DatabaseJobStore) -> None:
        """Finish the jobs whose replica died: claim one whenever a lease has run out, and go on with it from
        its ``spec`` (a bulk upsert after its committed documents; an evaluation or a re-index from the start)."""
        while not self._stopping.wait(max(1.0, store.lease / 3)):
            try:
                while (job := store.claim()) is not None:
                    logger.info("job %s (%s, %s of %s done elsewhere) taken over", job.id, job.kind, job.done, job.total)
                    self.jobs.resume(job, self._resumed_work(job))
            except Exception as exc:  # noqa: BLE001 - the database may be down; try again at the next tick
                logger.warning("taking over orphaned jobs: %s", getattr(exc, "message", exc))

    def _resumed_work(self, job: Job) -> Callable[[Job], Any]:
        """What goes on with a job taken over from another replica (its kind is one of ``RESUMABLE``)."""
        spec = job.spec
        if job.kind == "upsert":
            documents = msgspec.convert(spec["documents"], list[Document])
            return lambda job: self._upsert(spec["collection"], documents, job, start=job.done)
        if job.kind == "eval":
            request = msgspec.convert(spec["request"], EvalRequest)
            return lambda job: self._plan_eval(request)[1](job)
        if job.kind == "reindex":
            return lambda job: self._resume_reindex(spec["collection"], spec["previous_base"], job)
        if job.kind == "view":
            return lambda job: self._resume_view(spec["collection"], spec["adapter"], spec["label"], job)
        raise ValueError(f"job kind {job.kind!r} cannot be taken over")

    def close(self) -> None:
        self._stopping.set()
        self.registry.stop()
        self.jobs.shutdown()
        self._analysis.shutdown(wait=False, cancel_futures=True)
        self.batcher.close()
        self.collections.close()
        if self.database is not None:
            self.database.close()
        if self.bulk_encoder.cache is not None:
            self.bulk_encoder.cache.close()

    async def _offload(self, fn: Callable[..., T], *args: Any, model: bool = False, **kwargs: Any) -> T:
        """Run blocking work on a worker thread so the event loop keeps answering; ``model`` work is admitted
        first (429 at once past ``max_concurrent`` requests in progress)."""
        call = functools.partial(fn, *args, **kwargs)
        if not model:
            return await asyncio.to_thread(call)
        with self.admission:
            return await asyncio.to_thread(call)

    # ------------------------------------------------------------------------------------------ facts
    @property
    def base(self) -> Encoder:
        return self.batcher.encoder

    @property
    def active(self) -> LoadedAdapter | None:
        return self.registry.active

    def adapters(self) -> list[LoadedAdapter]:
        return self.registry.all()

    def resolve(self, name: str | None) -> LoadedAdapter | None:
        """``None``: the active adapter (or none); ``base``: none; else the named one (404 listing the names)."""
        return self.registry.resolve(name)

    def job(self, job_id: str) -> Job:
        return self.jobs.get(job_id)

    # ------------------------------------------------------------------------------------------ embed
    async def embed(
        self,
        texts: Sequence[str],
        role: Role,
        adapter: str | None = None,
        *,
        normalize: bool = True,
        truncate: bool = False,
        return_windows: bool = False,
        allow_blank: bool = False,
    ) -> EmbedResult:
        """Embed inputs through the base (cached) and the resolved adapter.

        An input longer than the model's window is the normalised mean of its windows' vectors (no content
        dropped) unless ``truncate`` asks for its first window only; ``return_windows`` also returns every
        window's own vector and span. ``allow_blank``: whitespace-only inputs are embedded (text decoded from
        token ids), not refused.
        """
        limits.check_texts(texts, self.settings, allow_blank=allow_blank)
        chosen = self.resolve(adapter)
        with self.admission:
            transform = self._transform(chosen, role, normalize)
            spans = await self._plan(texts, role)
            tokens = sum(self.encoder.count_tokens(texts))
            limits.check_request_tokens(tokens, len(texts), self.settings)
            flat, counts = window_texts(texts, spans)
            per_window: np.ndarray | None = None
            if truncate:
                vectors = await self._base_vectors([t[s[0][0] : s[0][1]] for t, s in zip(texts, spans, strict=True)], role)
                windows = [1] * len(texts)
            else:
                per_window = await self._base_vectors(flat, role)
                vectors, windows = pool(per_window, counts), counts.tolist()
            window_vectors = None
            if return_windows:
                every = transform(per_window if per_window is not None else await self._base_vectors(flat, role))
                bounds = np.cumsum([0, *counts.tolist()])
                window_vectors = [(spans[i], every[bounds[i] : bounds[i + 1]]) for i in range(len(texts))]
            metrics.EMBED_INPUTS.observe(len(texts))
            return EmbedResult(
                vectors=transform(vectors),
                adapter=chosen.label if chosen else BASE,
                windows=windows,
                tokens=tokens,
                window_vectors=window_vectors,
            )

    async def _plan(self, texts: Sequence[str], role: Role) -> list[list[Span]]:
        """Each input's windows (tokenising it, once): on the event loop for a request of a few questions, on a
        worker thread for a large one, so the loop never waits on the tokenizer for long."""
        if sum(map(len, texts)) <= INLINE_CHARS:
            return self.encoder.split(texts, role)
        return await asyncio.to_thread(self.encoder.split, texts, role)

    async def _base_vectors(self, texts: Sequence[str], role: Role) -> np.ndarray:
        """Base vectors of model inputs for a request: the memory cache's at once, the rest awaited from the batch
        queue on the event loop, so no thread is held while the model runs (429 where the queue is full)."""
        lookup = self.encoder.lookup(texts, role)
        if lookup.missing:
            todo = lookup.missing_texts
            if sum(map(len, todo)) <= INLINE_CHARS:
                future = self.batcher.submit(todo, role, INTERACTIVE)
            else:  # submitting tokenises what window planning left to do
                future = await asyncio.to_thread(self.batcher.submit, todo, role, INTERACTIVE)
            self.encoder.fill(lookup, lookup.missing, await asyncio.wrap_future(future))
        return lookup.stacked(self.base.dim)

    @staticmethod
    def _transform(chosen: LoadedAdapter | None, role: Role, normalize: bool) -> Callable[[np.ndarray], np.ndarray]:
        if chosen is None:
            return lambda v: v  # base vectors come normalised from the encoder
        a = chosen.checkpoint.adapter
        apply = a.transform_query if role == "query" else a.transform_document
        return lambda v: apply(v, normalize=normalize)

    # ------------------------------------------------------------------------------------ collections
    def collection(self, name: str) -> Collection:
        """A collection that can serve (404 unknown, 409 another base or re-indexing, 503 damaged)."""
        return self.collections.get(name)

    def collection_info(self, name: str) -> CollectionInfo:
        """A collection's status, settings and counts; a damaged or mismatched one says so instead of failing."""
        manager = self.collections
        if (problem := manager.damaged().get(name)) is not None:
            return CollectionInfo(name=name, status="damaged", problem=problem)
        if (c := manager.mismatched().get(name)) is not None:
            job = manager.reindexing().get(name)
            return CollectionInfo(
                name=name, status="base_mismatch" if job is None else "reindexing", index=c.index,
                base_fingerprint=c.base_fingerprint, dim=c.dim, created=c.created, job=job or None,
            )
        collection = self.collection(name)
        docs, windows = collection.counts()
        config = collection.config
        return CollectionInfo(
            name=name, status="ready", index=config.index, base_fingerprint=config.base_fingerprint, dim=config.dim,
            created=config.created, documents=docs, windows=windows, searching_with=collection.kind,  # type: ignore[arg-type]
            lexical=config.lexical, lexical_status=collection.lexical_status,  # type: ignore[arg-type]
            fusion=self.fusion_for(collection, self.active) if config.lexical is not None else None,
        )

    def collections_info(self) -> list[CollectionInfo]:
        return [self.collection_info(n) for n in self.collections.names()]

    async def create_collection(self, name: str, spec: CollectionCreate | None = None) -> tuple[CollectionInfo, bool]:
        """Create a collection (idempotent: the same settings again is ``False``; other settings, 409)."""
        s = spec or CollectionCreate()
        _, created = await self._offload(
            self.collections.create, name, s.index, hnsw_m=s.hnsw_m, ef_search=s.ef_search, ef_construction=s.ef_construction,
            lexical=s.lexical_settings(), alpha=s.alpha,
        )
        return await self._offload(self.collection_info, name), created

    async def delete_collection(self, name: str) -> None:
        await self._offload(self.collections.delete, name)

    async def get_document(self, name: str, doc_id: str) -> StoredDocument:
        collection = await self._offload(self.collection, name)
        found = await self._offload(collection.get, doc_id)
        if found is None:
            raise NotFoundError(f"no document {doc_id!r} in collection {name!r}")
        return found

    async def delete_documents(self, name: str, ids: Sequence[str]) -> DeleteResponse:
        """Delete documents by id; ids not in the collection are listed in ``missing``."""
        collection = await self._offload(self.collection, name)
        missing = await self._offload(collection.delete, ids)
        return DeleteResponse(deleted=len(set(ids)) - len(set(missing)), missing=missing)

    async def upsert(self, name: str, documents: Sequence[Document]) -> UpsertResponse | Job:
        """Insert or replace documents; past ``sync_upsert_documents`` documents it runs as a background job."""
        limits.check_documents(documents, self.settings)
        await self._offload(self.collection, name)  # 404/409 before any work
        if len(documents) > self.settings.sync_upsert_documents:
            spec = {"collection": name, "documents": msgspec.to_builtins(list(documents))}  # another replica resumes from it
            return self.jobs.submit("upsert", lambda job: self._upsert(name, documents, job), total=len(documents), spec=spec)
        return await self._offload(self._upsert, name, documents, model=True)

    def _upsert(self, name: str, documents: Sequence[Document], job: Job | None = None, start: int = 0) -> UpsertResponse:
        """Embed every window of each document (base, cached) and store them, batch by batch, so a bulk upsert
        commits as it goes and reports progress. A job resumed on another replica starts after the ``start``
        documents its first replica committed."""
        collection = self.collection(name)
        windows = windowed = 0
        step = self.settings.upsert_batch
        for start in range(start, len(documents), step):
            part = documents[start : start + step]
            texts = [d.text for d in part]
            # the lexical analysis runs while the tokenizer plans the windows (it lets go of the GIL meanwhile)
            analysed = self._analysis.submit(collection.analyse, texts)
            embedded = embed_documents(self.bulk_encoder, texts)
            collection.upsert([
                collection.new_document(d.id, d.text, d.metadata, spans, vectors, a)
                for d, (spans, vectors), a in zip(part, embedded.per_document(), analysed.result(), strict=True)
            ])
            windows += len(embedded.spans)
            windowed += embedded.n_windowed
            if job is not None:
                job.report(start + len(part), len(documents))
        return UpsertResponse(upserted=len(documents), windows=windows, windowed=windowed)

    async def search(
        self,
        name: str,
        queries: str | Sequence[str],
        k: int,
        adapter: str | None = None,
        where: Filter | None = None,
        *,
        mode: Mode | None = None,
        fusion: Fusion = "weighted",
        alpha: float | None = None,
        threshold: float | None = None,
        offset: int = 0,
    ) -> SearchResponse:
        """Top-``k`` documents for one query (``hits``) or for each of a list (``results``).

        ``mode``: ``dense`` (the query through the adapter, documents through its view), ``lexical`` (BM25) or
        ``hybrid`` (both, fused by ``fusion``: weighted with dense weight ``alpha``, or rrf); default hybrid where
        the collection's lexical index is ready, else dense. ``alpha`` defaults to the collection's, else the
        adapter's learned one (where its lexical settings match the collection's), else ``DEFAULT_ALPHA``.
        """
        single = isinstance(queries, str)
        texts = [queries] if isinstance(queries, str) else list(queries)
        limits.check_texts(texts, self.settings, "query" if single else "queries")
        limits.check_search(k, offset, alpha, self.settings)
        chosen = self.resolve(adapter)

        def plan_for(collection: Collection) -> SearchPlan:  # reads the store (a database round trip on PostgreSQL)
            if chosen is not None and chosen.checkpoint.config.apply_to == "both":
                self._ensure_view(collection, chosen)  # a collection created since the adapter was registered
            return SearchPlan(
                k=k, offset=offset, mode=mode or ("hybrid" if collection.lexical_status == "ready" else "dense"), fusion=fusion,
                alpha=alpha if alpha is not None else self.fusion_for(collection, chosen).alpha, threshold=threshold, where=where,
            )

        collection = await self._offload(self.collection, name)
        plan = await self._offload(plan_for, collection)
        label, view_adapter = (chosen.label, chosen.checkpoint.adapter) if chosen else (BASE, None)
        with self.admission:
            vectors = await self._query_vectors(texts, chosen) if collection.dense_needed(texts, plan.mode) else None
            found = await asyncio.to_thread(collection.search, vectors, texts, plan, label, view_adapter)
        results = [SearchResult(hits=f.hits, mode_used=f.mode_used, note=f.note) for f in found]
        if single:
            return SearchResponse(adapter=label, hits=results[0].hits, mode_used=results[0].mode_used, note=results[0].note)
        return SearchResponse(adapter=label, results=results)

    async def _query_vectors(self, queries: Sequence[str], chosen: LoadedAdapter | None) -> np.ndarray:
        flat, counts = window_texts(queries, await self._plan(queries, "query"))
        vectors = pool(await self._base_vectors(flat, "query"), counts)
        return chosen.checkpoint.adapter.transform_query(vectors) if chosen is not None else vectors

    def fusion_for(self, collection: Collection, chosen: LoadedAdapter | None) -> FusionInfo:
        """The dense weight a hybrid search of ``collection`` through ``chosen`` uses when the request gives none."""
        config = collection.config
        if config.alpha is not None:
            return FusionInfo(alpha=config.alpha, source="collection")
        learned, whose = (chosen.checkpoint.config.fusion, f"adapter {chosen.label}") if chosen else (self.base_fusion, "base")
        if learned is None:
            return FusionInfo(alpha=DEFAULT_ALPHA, source="default")
        if config.lexical != learned.lexical:
            mine = config.lexical.language if config.lexical else "none"
            return FusionInfo(
                alpha=DEFAULT_ALPHA,
                source=f"default ({whose}'s alpha was fitted with lexical language {learned.lexical.language}, the collection's is {mine})",
            )
        return FusionInfo(alpha=learned.alpha, source=whose)

    async def reindex(self, name: str) -> Job:
        """Re-embed a collection built with another base onto this server's base, as a background job: the new
        windows are staged in its store, swapped in with the new fingerprint in one transaction, and the
        collection is served from then on. Until then it answers 409 naming the job; if the job fails, it is
        left as it was. Refused at once (404, 409, 503) when the collection cannot be re-indexed."""
        store = await self._offload(self.collections.claim_reindex, name)
        try:
            before = (await self._offload(store.read_config)).base_fingerprint
            job = self.jobs.submit("reindex", lambda job: self._reindex(name, store, job), spec={"collection": name, "previous_base": before})
        except BaseException:
            store.close()
            self.collections.abandon_reindex(name)
            raise
        self.collections.note_reindex_job(name, job.id)
        return job

    def _resume_reindex(self, name: str, previous_base: str, job: Job) -> ReindexResult:
        """A re-index whose replica died: done again from the start (staging replaces what it had staged), or,
        when its swap had committed, reported as it is."""
        try:
            served = self.collections.get(name)
        except ConflictError:  # still on the other base (the usual case)
            store = self.collections.claim_reindex(name)
            self.collections.note_reindex_job(name, job.id)
            return self._reindex(name, store, job)
        documents, windows = served.counts()
        return ReindexResult(collection=name, documents=documents, windows=windows, previous_base=previous_base, base=served.config.base_fingerprint)

    def _reindex(self, name: str, store: Any, job: Job) -> ReindexResult:
        try:
            before = store.read_config().base_fingerprint
            config, windows = reindex(store, self.bulk_encoder, batch=self.settings.upsert_batch, report=job.report)
        except BaseException:
            self.collections.abandon_reindex(name)
            raise
        finally:
            store.close()
        collection = self.collections.finish_reindex(name)
        for adapter in self.adapters():
            if adapter.checkpoint.config.apply_to == "both":
                view = self._ensure_view(collection, adapter)
                if not view.pending:
                    view.catch_up()  # a view in the store: filled again from the new windows here, not by a search
        documents, _ = collection.counts()
        return ReindexResult(collection=name, documents=documents, windows=windows, previous_base=before, base=config.base_fingerprint)

    def _prepare_views(self, adapter: LoadedAdapter) -> None:
        """When an ``apply_to: both`` adapter is registered, build its document view of every collection: in
        memory at once (the embedded store), or in the database as a job (past ``SYNC_VIEW_WINDOWS``)."""
        if adapter.checkpoint.config.apply_to != "both":
            return
        for collection in self.collections.all():
            self._ensure_view(collection, adapter)

    def _ensure_view(self, collection: Collection, adapter: LoadedAdapter) -> CollectionIndex:
        """``adapter``'s document view of ``collection``, built, or being built by a job (then its searches
        answer 503 naming the job). A view in the store is built by one replica: the one that claims it."""
        view = collection.index_for(adapter.label, adapter.checkpoint.adapter)
        if not view.pending:
            return view
        if collection.counts()[1] <= SYNC_VIEW_WINDOWS:  # small: built at once, nobody waits for a job
            view.build()
            return view
        job_id = uuid.uuid4().hex
        if view.claim_build(job_id):
            spec = {"collection": collection.name, "adapter": adapter.name, "label": adapter.label}
            self.jobs.submit("view", functools.partial(self._build_view, collection, adapter.label, view), spec=spec, job_id=job_id)
        return view

    @staticmethod
    def _build_view(collection: Collection, label: str, view: CollectionIndex, job: Job) -> ViewResult:
        view.build(job.report)
        return ViewResult(collection=collection.name, adapter=label, windows=collection.counts()[1])

    def _resume_view(self, name: str, adapter_name: str, label: str, job: Job) -> ViewResult:
        """A view build whose replica died: built here, unless its adapter has moved on (another version)."""
        adapter = self.resolve(adapter_name)
        if adapter is None or adapter.label != label:
            raise ConflictError(f"adapter {adapter_name} is no longer {label}; its view is not needed")
        collection = self.collection(name)
        return self._build_view(collection, label, collection.index_for(label, adapter.checkpoint.adapter), job)

    # ------------------------------------------------------------------------------------------- eval
    def models_for_eval(self, names: Sequence[str] | None) -> list[LoadedAdapter]:
        """Adapters to compare with the base: the names given (``base`` is always the first row), or the
        active adapter when none are given."""
        if names is None:
            return [self.active] if self.active else []
        chosen = [self.resolve(n) for n in dict.fromkeys(names) if n != BASE]
        return [a for a in chosen if a is not None]

    async def evaluate(self, request: EvalRequest) -> EvalResponse | Job:
        """Base vs adapters on a dataset (inline or stored) or on a collection with queries and relevant ids:
        exactly what ``embedlift eval --json`` computes. Past ``sync_eval_texts`` texts, or when asked, a job
        (whose request another replica re-runs if this one dies: an evaluation has no side effects)."""
        request, work, size = await self._offload(self._plan_eval, request)
        if request.background or size > self.settings.sync_eval_texts:
            return self.jobs.submit("eval", work, total=size, spec={"request": msgspec.to_builtins(request)})
        return await self._offload(work, model=True)

    def _plan_eval(self, request: EvalRequest) -> tuple[EvalRequest, Callable[..., EvalResponse], int]:
        """Check an evaluation request (4xx before any work); the request with its adapters named (the active
        one at the time it was asked), the work that answers it, and its size in texts."""
        adapters = self.models_for_eval(request.adapters)  # unknown names: 404 before any work
        request = msgspec.structs.replace(request, adapters=[a.name for a in adapters])
        if sum(x is not None for x in (request.dataset, request.dataset_name, request.collection)) != 1:
            raise InvalidInputError(
                "send exactly one of `dataset` (EmbeddingQAFinetuneDataset JSON), `dataset_name` (a stored dataset, "
                "see GET /datasets) or `collection` (with `queries` and `relevant_docs`)"
            )
        lexical: LexicalSettings | None = LexicalSettings()
        if request.collection is None:
            if request.queries is not None or request.relevant_docs is not None:
                raise InvalidInputError("`queries` and `relevant_docs` go inside the dataset (or use `collection`)")
            ds = self._eval_dataset(request)
            size = len(ds.queries) + len(ds.corpus)
            embed: Callable[[], tuple[EmbeddedDataset, Mapping[str, str], dict[str, str]]] = lambda: (embed_dataset(self.bulk_encoder, ds), ds.corpus, ds.queries)  # noqa: E731
        else:
            if not request.queries or not request.relevant_docs:
                raise InvalidInputError("with `collection`, send `queries` ({id: text}) and `relevant_docs` ({id: [document ids]})")
            collection = self.collection(request.collection)
            size = len(request.queries) + collection.counts()[0]
            lexical = collection.config.lexical
            embed = functools.partial(self._embed_collection, request.collection, request.queries, request.relevant_docs)
        if request.mode == "hybrid" and lexical is None:
            raise ConflictError(f"collection {request.collection!r} has no lexical index (lexical: null): evaluate it with mode: dense")

        def work(job: Job | None = None) -> EvalResponse:
            data, doc_texts, query_texts = embed()
            hybrid = None
            if request.mode == "hybrid":
                assert lexical is not None
                data = with_lexical(data, doc_texts, [query_texts[q] for q in data.query_ids], lexical)
                alphas = {BASE: learned_alpha(self.base_fusion, lexical), **{a.name: learned_alpha(a.checkpoint.config.fusion, lexical) for a in adapters}}
                hybrid = Hybrid(fusion=request.fusion, alphas={k: v for k, v in alphas.items() if v is not None})
            return self._eval_response(self._compare(data, adapters, request.k, hybrid), adapters, request.per_query)

        return request, work, size

    def _eval_dataset(self, request: EvalRequest) -> QADataset:
        if request.dataset_name is not None:
            path = self.settings.datasets_path / f"{check_name(request.dataset_name, 'dataset')}.json"
            if not path.is_file():
                raise NotFoundError(
                    f"no stored dataset {request.dataset_name!r} in {self.settings.datasets_path}; see GET /datasets, or send `dataset` inline"
                )
            return load_dataset(path)
        assert request.dataset is not None
        return validate(dataset_of(request.dataset), "dataset")

    def _embed_collection(
        self, name: str, queries: dict[str, str], relevant: dict[str, list[str]]
    ) -> tuple[EmbeddedDataset, dict[str, str], dict[str, str]]:
        """Queries against every document of a collection, scored exactly from its stored base vectors (and its
        documents' texts, for the lexical side)."""
        doc_ids, texts, windowed = self.collection(name).store.all_documents()
        col = {d: i for i, d in enumerate(doc_ids)}
        problems = [q for q in relevant if q not in queries] + [q for q in queries if not relevant.get(q)]
        if problems:
            raise InvalidInputError(f"every query needs relevant ids and every relevant_docs key a query; offending: {problems[:5]}")
        unknown = sorted({d for docs in relevant.values() for d in docs if d not in col})
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise NotFoundError(f"relevant ids not in collection {name!r}: {unknown[:5]}{more}")
        query_ids = list(queries)
        qv, qw = embed_pooled(self.bulk_encoder, [queries[q] for q in query_ids], "query")
        data = EmbeddedDataset(
            query_ids=query_ids, doc_ids=doc_ids, queries=qv, docs=windowed,
            relevant=[{col[d] for d in relevant[q]} for q in query_ids], query_windows=qw,
        )
        return data, dict(zip(doc_ids, texts, strict=True)), queries

    @staticmethod
    def _compare(data: EmbeddedDataset, adapters: Sequence[LoadedAdapter], ks: Sequence[int], hybrid: Hybrid | None = None) -> Comparison:
        checkpoints = [
            dataclasses.replace(a.checkpoint, config=msgspec.structs.replace(a.checkpoint.config, name=a.name))
            for a in adapters
        ]
        return compare_runs([("", data)], checkpoints, ks, hybrid=hybrid)

    @staticmethod
    def _eval_response(comparison: Comparison, adapters: Sequence[LoadedAdapter], per_query: bool) -> EvalResponse:
        labels = {BASE: BASE, **{a.name: a.label for a in adapters}}
        if any(r.name == LEXICAL for r in comparison.results):
            labels |= {LEXICAL: LEXICAL, **{f"{name}{HYBRID_SUFFIX}": f"{label}{HYBRID_SUFFIX}" for name, label in labels.items()}}
        return EvalResponse(
            metrics=comparison.to_json(),
            models=labels,
            queries=len(comparison.query_ids),
            documents=comparison.n_docs,
            windowed=comparison.n_windowed,
            ranks=comparison.ranks() if per_query else None,
        )

    # --------------------------------------------------------------------------------------- adapters
    async def register_adapter(self, name: str) -> LoadedAdapter:
        """Register (or re-register, as the next version) the checkpoint directory ``name`` of the adapters directory."""
        return await self._offload(self.registry.register_name, name)

    async def register_upload(self, data: bytes, name: str | None = None) -> LoadedAdapter:
        """Register a checkpoint uploaded as a tar (optionally gzipped) of its directory."""
        return await self._offload(self.registry.register_tar, data, name)

    async def activate(self, name: str) -> LoadedAdapter | None:
        """Hot swap: requests that name no adapter use ``name`` from now on (``base``: none); durable on return."""
        return await self._offload(self.registry.activate, name)

    async def rollback(self) -> LoadedAdapter | None:
        """Back to the previously active adapter."""
        return await self._offload(self.registry.rollback)

    async def delete_adapter(self, name: str) -> None:
        """Unregister an adapter, remove its checkpoint and drop its document views (the active one: 409)."""
        await self._offload(self._delete_adapter, name)

    def _delete_adapter(self, name: str) -> None:
        self.registry.delete(name)
        keep = {a.label for a in self.adapters()}
        for c in self.collections.all():
            c.drop_views(keep)


def stored_datasets(settings: Settings) -> DatasetList:
    """Stored evaluation datasets (``NAME.json`` in the datasets directory), for ``dataset_name``."""
    folder = settings.datasets_path
    files = [f for f in sorted(folder.glob("*.json")) if valid_name(f.stem)] if folder.is_dir() else []
    stats = [(f.stem, f.stat()) for f in files]
    return DatasetList(datasets=[
        StoredDataset(name=name, bytes=st.st_size, modified=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)))
        for name, st in stats
    ])


def dataset_of(edge: EvalDataset) -> QADataset:
    """The wire's dataset as the training library's."""
    return QADataset(queries=edge.queries, corpus=edge.corpus, relevant_docs=edge.relevant_docs)
