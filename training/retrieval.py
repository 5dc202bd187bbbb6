"""A dataset embedded once by the base, and exact windowed scoring over it.

Training and evaluation both start here, so they score a document the same way: the cosine of the
(adapted) query with the document's best window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from embedlift.models.adapters import Adapter
from embedlift.models.encoders import Encoder
from embedlift.models.lexical import LexicalSettings
from embedlift.models.windows import WindowedVectors, best_window_scores, embed_documents, embed_pooled
from embedlift.training.dataset import QADataset

if TYPE_CHECKING:
    from embedlift.training.formats import LabelledDataset


@dataclass(frozen=True)
class EmbeddedDataset:
    """Base vectors of a dataset's queries and of every window of its documents.

    Attributes:
        query_ids: Query ids, in dataset order.
        doc_ids: Document ids, in dataset order (the columns of every score matrix).
        queries: ``(n_queries, d)`` pooled base query vectors, normalised.
        docs: Base vectors of every document window.
        relevant: For each query, the column indices of its relevant documents.
        query_windows: Windows each query needed (a query longer than the model's window is pooled).
        negatives: For each query, the column indices of its hard negatives (from the dataset), in order.
        lexical: ``(n_queries, n_docs)`` BM25 of each document's best window, when hybrid rows are wanted
            (``training/hybrid.py``).
        lexical_settings: The analyzer settings those were computed with.
    """

    query_ids: list[str]
    doc_ids: list[str]
    queries: np.ndarray
    docs: WindowedVectors
    relevant: list[set[int]]
    query_windows: np.ndarray
    negatives: list[list[int]] = field(default_factory=list)
    lexical: np.ndarray | None = None
    lexical_settings: LexicalSettings | None = None

    def scores(self, adapter: Adapter | None = None) -> np.ndarray:
        """``(n_queries, n_docs)`` cosine scores of (adapted) queries against each document's best window."""
        q = self.queries if adapter is None else adapter.transform_query(self.queries)
        d = self.docs.vectors if adapter is None else adapter.transform_document(self.docs.vectors)
        return windowed_scores(q, self.docs.map(d))


def embed_dataset(encoder: Encoder, ds: QADataset, *, windows: bool = True) -> EmbeddedDataset:
    """Embed every query and every document window of ``ds`` with the (cached) base encoder.

    Args:
        encoder: The base, usually a ``CachedEncoder``.
        ds: The dataset.
        windows: ``False`` embeds documents whole (the model truncates them): for comparisons only.
    """
    doc_ids = list(ds.corpus)
    col = {d: i for i, d in enumerate(doc_ids)}
    query_ids = list(ds.queries)
    docs = embed_documents(encoder, [ds.corpus[d] for d in doc_ids], windows=windows)
    queries, query_windows = embed_pooled(encoder, [ds.queries[q] for q in query_ids], "query")
    relevant = [{col[d] for d in ds.relevant_docs[q]} for q in query_ids]
    negatives = [[col[d] for d in ds.hard_negatives.get(q, ())] for q in query_ids]
    return EmbeddedDataset(query_ids, doc_ids, queries, docs, relevant, query_windows, negatives)


@dataclass(frozen=True)
class EmbeddedLabelled:
    """Base vectors of labelled texts and each text's label as an integer.

    Attributes:
        vectors: ``(n, d)`` pooled base vectors, normalised.
        labels: ``(n,)`` int64 index into ``names``.
        names: The label names.
    """

    vectors: np.ndarray
    labels: np.ndarray
    names: list[str]


def embed_labelled(encoder: Encoder, ds: LabelledDataset) -> EmbeddedLabelled:
    """Embed labelled texts (as documents: a long text pooled over its windows)."""
    names = sorted(set(ds.labels))
    index = {n: i for i, n in enumerate(names)}
    vectors, _ = embed_pooled(encoder, ds.texts, "document")
    return EmbeddedLabelled(vectors, np.array([index[label] for label in ds.labels], dtype=np.int64), names)


def windowed_scores(queries: np.ndarray, docs: WindowedVectors, chunk: int = 1024) -> np.ndarray:
    """Exact scores of every query against every document (best window), computed in query chunks
    so the ``(chunk, n_windows)`` intermediate stays small."""
    out = np.empty((len(queries), docs.n_docs), dtype=np.float32)
    for i in range(0, len(queries), chunk):
        window_scores = queries[i : i + chunk] @ docs.vectors.T  # (chunk, n_windows)
        out[i : i + chunk] = best_window_scores(window_scores, docs.owner, docs.n_docs)
    return out
