"""The service's plain-Python engine: base encoder + cache, adapter registry, collections, evaluation, jobs.

HTTP controllers only check limits, call one engine method and shape the answer (infinity's split), so every
behaviour here is testable without a server. A request resolves its adapter once, at its start, and uses
that object to the end: swapping the active adapter replaces one reference under a lock and never changes
what an in-flight request computes.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from embedlift.models.cache import CachedEncoder, EmbeddingCache, MemoryCache
from embedlift.models.encoders import Encoder, Role, load_encoder
from embedlift.models.errors import InvalidInputError, NotFoundError, OverloadedError
from embedlift.models.windows import embed_documents, embed_pooled
from embedlift.service import metrics
from embedlift.service.batching import BULK, INTERACTIVE, BatchedEncoder, BatchQueue
from embedlift.service.collections import Collection, CollectionManager, DocumentStore, Filter, Hit, Metadata, NewDocument, reindex_store
from embedlift.service.jobs import Job, JobRunner
from embedlift.service.registry import BASE, AdapterRegistry, LoadedAdapter
from embedlift.service.settings import Settings
from embedlift.training.dataset import QADataset
from embedlift.training.evaluate import Comparison, compare
from embedlift.training.retrieval import EmbeddedDataset, embed_dataset

logger = logging.getLogger(__name__)

__all__ = ["BASE", "Engine", "EmbedResult", "LoadedAdapter"]


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
class SearchResult:
    adapter: str
    hits: list[list[Hit]]


@dataclass(frozen=True)
class ReindexResult:
    collection: str
    documents: int
    windows: int
    previous_base: str
    base: str


@dataclass(frozen=True)
class UpsertResult:
    upserted: int
    windows: int
    windowed: int


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


class Engine:
    """Owns the base encoder, the adapters and the collections; thread-safe.

    Every model call goes through one ``BatchQueue`` (dynamic batching). Requests read and fill a bounded
    in-memory cache of base vectors (a hit skips the queue and the model); background work (upserts,
    evaluations) reads and fills the persistent cache, and yields the model to requests.

    Args:
        base: The base encoder.
        registry: The adapter registry (already loaded).
        collections: The collections (already loaded), or ``None`` for an engine without any.
        settings: Limits, batching and cache sizes.
        bulk_cache: The persistent base-embedding cache for background work (``None``: none).
    """

    def __init__(
        self,
        base: Encoder,
        registry: AdapterRegistry,
        collections: CollectionManager | None = None,
        settings: Settings | None = None,
        *,
        bulk_cache: EmbeddingCache | None = None,
    ) -> None:
        self.settings = s = settings or Settings()
        self.registry = registry
        self.batcher = BatchQueue(base, max_batch_inputs=s.max_batch_inputs, max_queued_inputs=s.max_queued_inputs)
        # The bulk encoder first: with a remote base it learns the dimension from the persistent cache.
        self.bulk_encoder = CachedEncoder(BatchedEncoder(self.batcher, BULK), bulk_cache, progress=False)
        memory = MemoryCache(s.cache_mb << 20) if s.cache_mb > 0 else None
        self.encoder = CachedEncoder(BatchedEncoder(self.batcher, INTERACTIVE), memory, progress=False)
        self.collections = collections or CollectionManager(s.data_dir / "collections", base.fingerprint, base.dim)
        self.jobs = JobRunner()
        self.admission = Admission(s.max_concurrent)
        registry.on_change = self._prepare_views
        metrics.track_engine(self)

    @classmethod
    def from_settings(cls, settings: Settings, *, watch: bool = True) -> Engine:
        """Load the base, open the caches, registry and collections under ``data_dir``."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        base = load_encoder(
            settings.base, batch_size=settings.batch_size, base_url=settings.base_url,
            api_key=settings.openai_api_key, dimensions=settings.dimensions, progress=False,
            backend=settings.backend, threads=settings.threads,
        )
        bulk_cache = EmbeddingCache(settings.data_dir / "base-embeddings.sqlite3")
        if getattr(base, "needs_dim", False) and (known := bulk_cache.dim_of(base.fingerprint)):
            base.set_dim(known)  # type: ignore[attr-defined]  # a remote base's dimension without a probe call
        collections = CollectionManager(settings.data_dir / "collections", base.fingerprint, base.dim)
        collections.load_all()
        registry = AdapterRegistry(
            settings.adapters_dir, settings.data_dir / "registry.json", base.fingerprint,
            allow_backend_mismatch=settings.allow_backend_mismatch,
        )
        engine = cls(base, registry, collections, settings, bulk_cache=bulk_cache)
        registry.load(settings.adapter)
        if watch and settings.watch_interval > 0:
            registry.watch(settings.watch_interval)
        return engine

    def close(self) -> None:
        self.registry.stop()
        self.jobs.shutdown()
        self.batcher.close()
        self.collections.close()
        if isinstance(self.bulk_encoder.cache, EmbeddingCache):
            self.bulk_encoder.cache.close()

    @property
    def base(self) -> Encoder:
        return self.batcher.encoder

    @property
    def active(self) -> LoadedAdapter | None:
        return self.registry.active

    def adapters(self) -> list[LoadedAdapter]:
        return self.registry.all()

    def resolve(self, name: str | None) -> LoadedAdapter | None:
        return self.registry.resolve(name)

    def _prepare_views(self, adapter: LoadedAdapter) -> None:
        """Before an ``apply_to: both`` adapter is served, build its document view of every collection."""
        if adapter.checkpoint.config.apply_to != "both":
            return
        for collection in self.collections.all():
            collection.ensure_view(adapter.label, adapter.checkpoint.adapter)

    # ------------------------------------------------------------------------------------------ embed
    def embed(
        self,
        texts: Sequence[str],
        role: Role,
        adapter: str | None = None,
        *,
        normalize_output: bool = True,
        truncate: bool = False,
        return_windows: bool = False,
    ) -> EmbedResult:
        """Embed inputs through the base (cached) and the resolved adapter.

        An input longer than the model's window is the normalised mean of its windows' vectors (no content
        dropped) unless ``truncate`` asks for its first window only; ``return_windows`` also returns every
        window's own vector and span.
        """
        chosen = self.resolve(adapter)
        transform = self._transform(chosen, role, normalize_output)
        spans = self.encoder.split(texts, role)
        window_vectors = None
        if truncate:
            vectors = self.encoder.encode([t[s[0][0] : s[0][1]] for t, s in zip(texts, spans, strict=True)], role)
            windows = [1] * len(texts)
        else:
            vectors, counts = embed_pooled(self.encoder, texts, role, spans=spans)
            windows = counts.tolist()
        if return_windows:
            flat = [t[a:b] for t, s in zip(texts, spans, strict=True) for a, b in s]
            per_window = transform(self.encoder.encode(flat, role))
            bounds = np.cumsum([0, *(len(s) for s in spans)])
            window_vectors = [(spans[i], per_window[bounds[i] : bounds[i + 1]]) for i in range(len(texts))]
        metrics.EMBED_INPUTS.observe(len(texts))
        return EmbedResult(
            vectors=transform(vectors),
            adapter=chosen.label if chosen else BASE,
            windows=windows,
            tokens=sum(self.encoder.count_tokens(texts)),
            window_vectors=window_vectors,
        )

    @staticmethod
    def _transform(chosen: LoadedAdapter | None, role: Role, normalize_output: bool):
        if chosen is None:
            return lambda v: v  # base vectors come normalised from the encoder
        a = chosen.checkpoint.adapter
        apply = a.transform_query if role == "query" else a.transform_document
        return lambda v: apply(v, normalize=normalize_output)

    # ------------------------------------------------------------------------------------ collections
    def collection(self, name: str) -> Collection:
        return self.collections.get(name)

    def upsert(self, name: str, documents: Sequence[tuple[str, str, Metadata]], job: Job | None = None) -> UpsertResult:
        """Embed every window of each document (base, cached) and store them; batch by batch, so a bulk upsert
        commits as it goes and reports progress."""
        collection = self.collection(name)
        ids = [d[0] for d in documents]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidInputError(f"document ids must be unique in one upsert; repeated: {dupes[:5]}")
        windows = windowed = 0
        step = self.settings.upsert_batch
        for start in range(0, len(documents), step):
            part = documents[start : start + step]
            embedded = embed_documents(self.bulk_encoder, [d[1] for d in part])
            collection.upsert(
                [
                    NewDocument(id=doc_id, text=text, metadata=meta, spans=spans, vectors=vectors)
                    for (doc_id, text, meta), (spans, vectors) in zip(part, embedded.per_document(), strict=True)
                ]
            )
            windows += len(embedded.spans)
            windowed += embedded.n_windowed
            if job is not None:
                job.report(start + len(part), len(documents))
        return UpsertResult(upserted=len(documents), windows=windows, windowed=windowed)

    def start_reindex(self, name: str) -> Job:
        """Re-embed a collection built with another base onto this server's base, as a background job: the new
        windows are staged in its store, swapped in with the new fingerprint in one transaction, and the
        collection is served from then on. Until then it answers 409 naming the job; if the job fails, it is
        left as it was. Refused at once (404, 409, 503) when the collection cannot be re-indexed."""
        path = self.collections.claim_reindex(name)
        try:
            job = self.jobs.submit("reindex", lambda job: self._reindex(name, path, job))
        except BaseException:
            self.collections.abandon_reindex(name)
            raise
        self.collections.note_reindex_job(name, job.id)
        return job

    def _reindex(self, name: str, path: Path, job: Job) -> ReindexResult:
        store = DocumentStore(path)
        try:
            before = store.read_config().base_fingerprint
            config, windows = reindex_store(store, self.bulk_encoder, batch=self.settings.upsert_batch, report=job.report)
        except BaseException:
            self.collections.abandon_reindex(name)
            raise
        finally:
            store.close()
        collection = self.collections.finish_reindex(name)
        for adapter in self.adapters():
            if adapter.checkpoint.config.apply_to == "both":
                collection.ensure_view(adapter.label, adapter.checkpoint.adapter)
        documents, _ = collection.counts()
        return ReindexResult(collection=name, documents=documents, windows=windows, previous_base=before, base=config.base_fingerprint)

    def search(
        self, name: str, queries: Sequence[str], k: int, adapter: str | None = None, where: Filter | None = None
    ) -> SearchResult:
        """Top-``k`` documents per query; the query goes through the adapter, documents through its view."""
        collection = self.collection(name)
        chosen = self.resolve(adapter)
        vectors, _ = embed_pooled(self.encoder, queries, "query")
        if chosen is not None:
            vectors = chosen.checkpoint.adapter.transform_query(vectors)
        label, view_adapter = (chosen.label, chosen.checkpoint.adapter) if chosen else (BASE, None)
        return SearchResult(adapter=label, hits=collection.search(vectors, k, label, view_adapter, where))

    # ------------------------------------------------------------------------------------------- eval
    def models_for_eval(self, names: Sequence[str] | None) -> list[LoadedAdapter]:
        """Adapters to compare with the base: the names given (``base`` is always the first row), or the
        active adapter when none are given."""
        if names is None:
            return [self.active] if self.active else []
        chosen = [self.resolve(n) for n in dict.fromkeys(names) if n != BASE]
        return [a for a in chosen if a is not None]

    def evaluate_dataset(self, ds: QADataset, adapters: Sequence[LoadedAdapter], ks: Sequence[int]) -> Comparison:
        """Exactly what ``embedlift eval`` computes, on the engine's base and cache."""
        return self._compare(embed_dataset(self.bulk_encoder, ds), adapters, ks)

    def evaluate_collection(
        self, name: str, queries: dict[str, str], relevant: dict[str, list[str]], adapters: Sequence[LoadedAdapter], ks: Sequence[int]
    ) -> Comparison:
        """Queries against every document of a collection, scored exactly from its stored base vectors."""
        collection = self.collection(name)
        doc_ids, _, windowed = collection.store.all_documents()
        col = {d: i for i, d in enumerate(doc_ids)}
        problems = [q for q in relevant if q not in queries] + [q for q in queries if not relevant.get(q)]
        if problems:
            raise InvalidInputError(f"every query needs relevant ids and every relevant_docs key a query; offending: {problems[:5]}")
        unknown = sorted({d for docs in relevant.values() for d in docs if d not in col})
        if unknown:
            raise NotFoundError(f"relevant ids not in collection {name!r}: {unknown[:5]}" + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        query_ids = list(queries)
        qv, qw = embed_pooled(self.bulk_encoder, [queries[q] for q in query_ids], "query")
        data = EmbeddedDataset(
            query_ids=query_ids, doc_ids=doc_ids, queries=qv, docs=windowed,
            relevant=[{col[d] for d in relevant[q]} for q in query_ids], query_windows=qw,
        )
        return self._compare(data, adapters, ks)

    @staticmethod
    def _compare(data: EmbeddedDataset, adapters: Sequence[LoadedAdapter], ks: Sequence[int]) -> Comparison:
        checkpoints = [
            dataclasses.replace(a.checkpoint, config=msgspec.structs.replace(a.checkpoint.config, name=a.name))
            for a in adapters
        ]
        return compare(data, checkpoints, ks)
