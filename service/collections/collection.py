"""A collection: its store (the source of truth) and its indexes (derived), kept consistent, and search in
three modes (dense, lexical, hybrid).

A write commits to the store first (that is the acknowledgement), then every index follows it, with both
steps under one write lock, so two writes to the same document never reach the indexes in the other order.
Why base vectors are stored: a query-only adapter (the default) searches the base index as it is, so swapping
adapters never rebuilds anything; an ``apply_to: both`` adapter gets its own dense index (a *view*: the stored
base vectors mapped by its document transform), built before it serves. The lexical index (BM25 over each
window's terms) is shared by every adapter; a collection written before it existed gets it built in the
background, and searches dense until it is ready.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from embedlift.models.adapters import Adapter
from embedlift.models.encoders import Encoder
from embedlift.models.errors import ConflictError, InvalidInputError
from embedlift.models.fusion import CANDIDATES, DEFAULT_ALPHA, Fusion, Mode, fuse
from embedlift.models.lexical import AnalysedText, Analyzer, analyzer
from embedlift.models.windows import Span, embed_documents
from embedlift.service.collections.base import (
    MAX_WINDOWS,
    Candidates,
    Changes,
    CollectionConfig,
    CollectionIndex,
    CollectionStore,
    Filter,
    LexicalIndex,
    NewDocument,
    Selection,
    WindowTerms,
)
from embedlift.service.collections.filters import parse
from embedlift.service.schemas import HitScores, SearchHit, StoredDocument

logger = logging.getLogger(__name__)

BASE_VIEW = "base"
BUILD_BATCH = 256


@dataclass(frozen=True, kw_only=True)
class SearchPlan:
    """How to search: the mode, the fusion and its dense weight, the page, a score threshold and a filter."""

    k: int
    offset: int = 0
    mode: Mode = "dense"
    fusion: Fusion = "weighted"
    alpha: float = DEFAULT_ALPHA
    threshold: float | None = None
    where: Filter | None = None


@dataclass(frozen=True)
class Found:
    """One query's page of hits, the mode that produced them, and why it is not the one asked, if it is not."""

    hits: list[SearchHit]
    mode_used: Mode
    note: str | None = None


def window_terms(analyzer: Analyzer, text: str, spans: Sequence[Span], analysed: AnalysedText | None = None) -> list[WindowTerms]:
    """Each window's analysed text (what the lexical index stores), from one analysis of the whole text
    (``analysed``, when it was made beforehand)."""
    return [WindowTerms(*counts) for counts in analyzer.window_counts(text, spans, analysed)]


class Collection:
    """One collection's store and its indexes; thread-safe."""

    def __init__(self, store: CollectionStore, config: CollectionConfig) -> None:
        self.store = store
        self.config = config
        self._write_lock = threading.Lock()
        self._indexes: dict[str, CollectionIndex] = {}
        self.analyzer = analyzer(config.lexical.language) if config.lexical is not None else None
        self.lexical_index: LexicalIndex | None = None
        self._building: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def load(self, *, build: bool = True) -> Collection:
        """Build the indexes from the store (at start-up); a lexical index whose postings are incomplete (or made
        by another analyzer) is built in the background when ``build``."""
        self._indexes = {BASE_VIEW: self.store.dense_index(self.config)}
        if self.analyzer is not None:
            state = self.store.postings_state()
            if state is not None and state != self.analyzer.version:
                logger.info("collection %s: postings made by analyzer %s, not %s; rebuilding", self.name, state, self.analyzer.version)
                self.store.mark_postings(None)
            self.lexical_index = self.store.lexical_index(self.analyzer)
            if self.lexical_index.status != "ready" and build:
                self._building = threading.Thread(target=self._build_lexical, name=f"lexical-{self.name}", daemon=True)
                self._building.start()
        return self

    def _build_lexical(self) -> None:
        """Postings for every document that has none, batch by batch, each batch written and indexed under the
        write lock (so no upsert of the same document slips between); then the index is ready."""
        assert self.analyzer is not None and self.lexical_index is not None
        try:
            while missing := self.store.missing_postings(BUILD_BATCH):
                rows = [(seq, window_terms(self.analyzer, text, spans)) for seq, text, spans in missing]
                with self._write_lock:
                    self.lexical_index.apply(Changes(postings=self.store.add_postings(rows)))
            self.store.mark_postings(self.analyzer.version)
            self.lexical_index.status = "ready"
            logger.info("collection %s: lexical index ready (%d windows)", self.name, self.lexical_index.windows)
        except Exception:
            logger.exception("collection %s: building the lexical index failed; searches stay dense", self.name)

    @property
    def kind(self) -> str:
        """What serves the base searches now: ``flat`` or ``hnsw``."""
        return self._indexes[BASE_VIEW].kind

    @property
    def base_index(self) -> CollectionIndex:
        return self._indexes[BASE_VIEW]

    @property
    def lexical_ready(self) -> bool:
        return self.lexical_index is not None and self.lexical_index.status == "ready"

    @property
    def lexical_status(self) -> str:
        """``off`` (no lexical index), ``building`` or ``ready``."""
        return "off" if self.lexical_index is None else self.lexical_index.status

    def counts(self) -> tuple[int, int]:
        """``(documents, windows)``."""
        return self.store.count()

    def index_for(self, key: str, adapter: Adapter | None) -> CollectionIndex:
        """The dense index an adapter's searches use: its view (``key`` = its label) for an ``apply_to: both``
        adapter, built from the stored base vectors when missing; else the base index."""
        if adapter is None or adapter.config.apply_to != "both":
            return self._indexes[BASE_VIEW]
        if (index := self._indexes.get(key)) is not None:
            return index
        with self._write_lock:  # no write slips between the view's snapshot and its registration
            if key not in self._indexes:
                self._indexes = {**self._indexes, key: self.store.view_index(self.config, adapter.transform_document, key)}
            return self._indexes[key]

    def drop_views(self, keep: set[str]) -> None:
        """Drop the views of adapters that are gone (``keep``: the labels registered), here and in the store."""
        with self._write_lock:
            self._indexes = {k: v for k, v in self._indexes.items() if k == BASE_VIEW or k in keep}
            self.store.drop_views(keep)

    # writes ------------------------------------------------------------------------------------------
    def analyse(self, texts: Sequence[str]) -> list[AnalysedText | None]:
        """The lexical analysis of documents' texts before their windows are known (``new_document`` takes it),
        so that it can run while the model's tokenizer plans the windows; nothing without a lexical index."""
        if self.analyzer is None:
            return [None] * len(texts)
        return [self.analyzer.analyse(t) for t in texts]

    def new_document(
        self, doc_id: str, text: str, metadata: dict, spans: list[Span], vectors: np.ndarray, analysed: AnalysedText | None = None
    ) -> NewDocument:
        """A document ready to store: with its windows' terms when the collection has a lexical index."""
        terms = window_terms(self.analyzer, text, spans, analysed) if self.analyzer is not None else None
        return NewDocument(id=doc_id, text=text, metadata=metadata, spans=spans, vectors=vectors, terms=terms)

    def upsert(self, docs: Sequence[NewDocument]) -> None:
        for doc in docs:
            if len(doc.spans) >= MAX_WINDOWS:
                raise InvalidInputError(f"document {doc.id!r} needs {len(doc.spans)} windows > {MAX_WINDOWS - 1}; split it")
        if self.analyzer is not None:  # every document of a collection with a lexical index has its postings
            docs = [d if d.terms is not None else dataclasses.replace(d, terms=window_terms(self.analyzer, d.text, d.spans)) for d in docs]
        with self._write_lock:
            self._apply(self.store.upsert(docs))

    def delete(self, ids: Sequence[str]) -> list[str]:
        """Delete documents; returns the ids that were not in the collection."""
        with self._write_lock:
            changes, missing = self.store.delete(ids)
            self._apply(changes)
        return missing

    def _apply(self, changes: Changes) -> None:
        for index in self._indexes.values():
            index.apply(changes)
        if self.lexical_index is not None:
            self.lexical_index.apply(changes)

    # reads -------------------------------------------------------------------------------------------
    def dense_needed(self, texts: Sequence[str], mode: Mode) -> bool:
        """Whether a search in ``mode`` reads the dense side (a lexical one falls back to it where BM25 cannot serve)."""
        if mode != "lexical":
            return True
        return self._lexical_problem(mode) is not None or not all(self.analyzer.terms(t) for t in texts)  # type: ignore[union-attr]

    def search(
        self, vectors: np.ndarray | None, texts: Sequence[str], plan: SearchPlan, key: str = BASE_VIEW, adapter: Adapter | None = None
    ) -> list[Found]:
        """Each query's page of hits (``plan``): one hit per document (its best window), best first. ``vectors``
        (the adapted query vectors) may be ``None`` when ``dense_needed`` says the dense side is not read.

        A lexical or hybrid search falls back to dense, saying so, while the lexical index is being built or
        when a query has no indexable term; a collection without one refuses them (400)."""
        if plan.where is not None:
            parse(plan.where)  # a bad filter is a 400 before any work
        selection = Selection(self.store, plan.where) if plan.where else None
        want = plan.k + plan.offset
        mode_note = self._lexical_problem(plan.mode)
        terms = [self.analyzer.terms(t) for t in texts] if self.analyzer is not None and plan.mode != "dense" else [[] for _ in texts]
        dense: list[Candidates] = []
        if vectors is not None and (plan.mode != "lexical" or mode_note is not None or not all(terms)):
            dense = self.index_for(key, adapter).dense(vectors, max(want, CANDIDATES) if plan.mode == "hybrid" else want, selection)
        lexical = self.lexical_index.lexical(terms, max(want, CANDIDATES), selection) if self.lexical_index is not None and plan.mode != "dense" and mode_note is None else []
        out = []
        for i in range(len(texts)):
            mode, note = plan.mode, mode_note
            if mode != "dense" and note is None and not terms[i]:
                note = "the query has no indexable terms (only stop words or punctuation): searched dense only"
            if note is not None:
                mode = "dense"
            d, lex = dense[i] if dense else {}, lexical[i] if lexical else {}
            if mode == "dense":
                scored = {k: v[0] for k, v in d.items()}
            elif mode == "lexical":
                scored = {k: v[0] for k, v in lex.items()}
            else:
                scored = fuse({k: v[0] for k, v in d.items()}, {k: v[0] for k, v in lex.items()}, plan.fusion, plan.alpha)
            out.append(Found(self._page(scored, d if mode != "lexical" else {}, lex if mode != "dense" else {}, plan), mode, note))
        return out

    def _lexical_problem(self, mode: Mode) -> str | None:
        """Why a lexical or hybrid search cannot run now (``None``: it can)."""
        if mode == "dense":
            return None
        if self.lexical_index is None:
            # 409, not 400: the request is well formed; the collection it names was created without the index
            raise ConflictError(
                f"collection {self.name!r} has no lexical index (it was created with lexical: null); search it with mode: dense"
            )
        if self.lexical_index.status != "ready":
            return f"the lexical index of {self.name!r} is being built ({self.lexical_index.windows} windows so far): searched dense only"
        return None

    def _page(self, scored: dict[int, float], dense: Candidates, lexical: Candidates, plan: SearchPlan) -> list[SearchHit]:
        """The requested page of ``scored`` documents as hits: threshold, then offset and ``k``, ties by id."""
        if plan.threshold is not None:
            scored = {k: v for k, v in scored.items() if v >= plan.threshold}
        want = plan.k + plan.offset
        ranked = sorted(scored, key=lambda k: (-scored[k], k))
        if len(ranked) > want:  # keep every document tied with the last one wanted: ties are broken by id below
            cut = scored[ranked[want - 1]]
            ranked = [k for k in ranked if scored[k] >= cut]
        docs = self.store.documents(ranked)
        ranked = sorted((k for k in ranked if k in docs), key=lambda k: (-scored[k], docs[k][0]))[plan.offset : want]
        windows = {k: (dense.get(k) or lexical[k])[1] for k in ranked}
        spans = self.store.spans([(k, w) for k, w in windows.items()])
        return [
            SearchHit(
                id=docs[k][0], score=scored[k], text=docs[k][1], metadata=docs[k][2], span=spans[(k, windows[k])], window=windows[k],
                scores=HitScores(dense=dense[k][0] if k in dense else None, lexical=lexical[k][0] if k in lexical else None),
            )
            for k in ranked
        ]

    def get(self, doc_id: str) -> StoredDocument | None:
        return self.store.get(doc_id)

    def close(self) -> None:
        for index in self._indexes.values():
            index.close()
        self.store.close()


def reindex(
    store: CollectionStore, encoder: Encoder, *, batch: int = 256, report: Callable[[int, int], None] | None = None
) -> tuple[CollectionConfig, int]:
    """Re-embed every stored text with ``encoder`` (its windows) and swap the new vectors in atomically, with the
    new windows' postings when the collection has a lexical index.

    Returns:
        The collection's new config and the number of windows written.
    """
    config = store.read_config()
    lexical = analyzer(config.lexical.language) if config.lexical is not None else None
    docs = store.texts()
    store.start_staging()
    windows = 0
    if report is not None:
        report(0, len(docs))
    for start in range(0, len(docs), batch):
        part = docs[start : start + batch]
        embedded = embed_documents(encoder, [text for _, text in part])
        store.stage_windows([
            (seq, spans, vectors, window_terms(lexical, text, spans) if lexical is not None else None)
            for (seq, text), (spans, vectors) in zip(part, embedded.per_document(), strict=True)
        ])
        windows += len(embedded.spans)
        if report is not None:
            report(start + len(part), len(docs))
    new = store.swap_staged(encoder.fingerprint, encoder.dim, encoder.spec)
    if lexical is not None:
        store.mark_postings(lexical.version)
    return new, windows
