"""Hybrid retrieval in evaluation and training: BM25 over a dataset's document windows, fused with a dense
ranking exactly as a collection fuses them (``models/fusion.py``), and the dense weight fitted on a validation
split (a 1-D search: the fused ranking's selection metric at each alpha of a grid, with a one-standard-error
rule so that a split of a few dozen questions does not move the weight on noise).

The lexical side scores each document by its best window, over the same windows the dense side embeds (the
base model's), so a dataset evaluated here and the same documents searched in a collection rank alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from embedlift.models.fusion import (
    CANDIDATES,
    DEFAULT_ALPHA,
    Fusion,
    LearnedFusion,
    fuse_rows,
)
from embedlift.models.lexical import BM25Matrix, LexicalSettings
from embedlift.models.windows import best_window_scores
from embedlift.training.metrics import mean_metrics, per_query_metrics
from embedlift.training.retrieval import EmbeddedDataset

#: The alphas a fit tries (0 = lexical only, 1 = dense only).
ALPHA_GRID = tuple(round(float(a), 2) for a in np.linspace(0.0, 1.0, 21))


def lexical_scores(data: EmbeddedDataset, doc_texts: Mapping[str, str], query_texts: Sequence[str], settings: LexicalSettings) -> np.ndarray:
    """``(n_queries, n_docs)`` BM25 of each document's best window (the windows ``data`` was embedded with)."""
    windows = [doc_texts[data.doc_ids[owner]][a:b] for owner, (a, b) in zip(data.docs.owner.tolist(), data.docs.spans, strict=True)]
    window_scores = BM25Matrix(windows, settings.language).scores(query_texts)
    return best_window_scores(window_scores, data.docs.owner, data.docs.n_docs)


def with_lexical(data: EmbeddedDataset, doc_texts: Mapping[str, str], query_texts: Sequence[str], settings: LexicalSettings) -> EmbeddedDataset:
    """``data`` with its lexical scores (``data.lexical``), for hybrid rows and alpha fits."""
    return dataclasses.replace(data, lexical=lexical_scores(data, doc_texts, query_texts, settings), lexical_settings=settings)


def hybrid_scores(dense: np.ndarray, lexical: np.ndarray, fusion: Fusion, alpha: float) -> np.ndarray:
    """Fused scores of every query and document (documents no side proposes: ``-inf``)."""
    return fuse_rows(dense, lexical, fusion, alpha, CANDIDATES)


def fit_alpha(data: EmbeddedDataset, dense: np.ndarray, metric: str, *, fusion: Fusion = "weighted") -> LearnedFusion:
    """The dense weight for ``dense`` (the model's scores on the validation split) fused with the split's BM25.

    Every alpha of ``ALPHA_GRID`` is scored by ``metric``; the best one wins only by more than one paired
    standard error (of the per-query differences against it). Among the alphas within that margin the one
    nearest ``DEFAULT_ALPHA`` is kept: the validation split is small and is also what stopped training early,
    so its best alpha alone overfits it (measured on the Lyft splits, see ``benchmarks/quality.py``)."""
    assert data.lexical is not None and data.lexical_settings is not None
    dense_metrics = mean_metrics(per_query_metrics(dense, data.doc_ids, data.relevant))
    per_query = {a: per_query_metrics(hybrid_scores(dense, data.lexical, fusion, a), data.doc_ids, data.relevant) for a in ALPHA_GRID}
    means = {a: mean_metrics(values) for a, values in per_query.items()}
    best = max(ALPHA_GRID, key=lambda a: (means[a][metric], -abs(a - DEFAULT_ALPHA)))
    chosen = min((a for a in ALPHA_GRID if _within_one_se(per_query[a][metric], per_query[best][metric])), key=lambda a: abs(a - DEFAULT_ALPHA))
    return LearnedFusion(alpha=chosen, metric=metric, validation={"dense": dense_metrics, "hybrid": means[chosen]}, lexical=data.lexical_settings)


def _within_one_se(candidate: np.ndarray, best: np.ndarray) -> bool:
    """Whether ``candidate``'s mean is no more than one paired standard error below ``best``'s."""
    diff = np.asarray(best, np.float64) - np.asarray(candidate, np.float64)
    if len(diff) < 2:
        return bool(diff.mean() <= 0) if len(diff) else True
    return bool(diff.mean() <= diff.std(ddof=1) / np.sqrt(len(diff)))
