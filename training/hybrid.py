"""Hybrid retrieval in evaluation and training: BM25 over a dataset's document windows, fused with a dense
ranking exactly as a collection fuses them (``models/fusion.py``), and the dense weight fitted on a validation
split (a 1-D search: the fused ranking's selection metric at each alpha of a grid).

The lexical side scores each document by its best window, over the same windows the dense side embeds (the
base model's), so a dataset evaluated here and the same documents searched in a collection rank alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from embedlift.models.fusion import CANDIDATES, Fusion, LearnedFusion, fuse_rows
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
    """The alpha of ``ALPHA_GRID`` whose weighted fusion of ``dense`` (the model's scores on the validation split)
    and the split's BM25 scores ranks best by ``metric``; ties go to the alpha nearest 0.5 (neither side
    favoured without evidence)."""
    assert data.lexical is not None and data.lexical_settings is not None
    dense_metrics = mean_metrics(per_query_metrics(dense, data.doc_ids, data.relevant))
    tried = {a: mean_metrics(per_query_metrics(hybrid_scores(dense, data.lexical, fusion, a), data.doc_ids, data.relevant)) for a in ALPHA_GRID}
    best = max(tried, key=lambda a: (tried[a][metric], -abs(a - 0.5)))
    return LearnedFusion(alpha=best, metric=metric, validation={"dense": dense_metrics, "hybrid": tried[best]}, lexical=data.lexical_settings)
