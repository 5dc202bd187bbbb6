"""Fusing a dense and a lexical ranking into one (hybrid retrieval). Both sides use this module: the service
fuses a collection's two top-candidate lists, evaluation fuses a dataset's exact scores the same way.

- ``weighted``: each side's scores min-max normalised over its own candidates (its top ``CANDIDATES``), then
  ``alpha * dense + (1 - alpha) * lexical``; a candidate missing from one side counts 0 there. A side whose
  candidates all score the same normalises them to 1.
- ``rrf``: reciprocal rank fusion, ``sum of 1 / (RRF_K + rank)`` over the sides (rank from 1), ``RRF_K = 60``.

Ties are broken by the document's key, so a ranking is the same everywhere it is computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import msgspec
import numpy as np

# The modes and fusions are wire types (the client distribution holds them); the math is here.
from embedlift.client.schemas import FUSIONS, MODES, Fusion, LexicalSettings, Mode
RRF_K = 60
#: Candidates each side contributes before fusing.
CANDIDATES = 100
#: The dense weight when nothing else sets it: the best mean MRR@10 of the base model fused over both Lyft
#: splits' *training* halves (0.2 on one, 0.4 on the other; 0.4 is best on their mean), never on test data.
#: Below one half on purpose: BM25 alone beats a general-purpose base on filings, so the lexical side leads
#: until an adapter's training fits its own weight.
DEFAULT_ALPHA = 0.4
K = TypeVar("K")


def minmax(scores: Mapping[K, float]) -> dict[K, float]:
    """Scores mapped onto [0, 1] over the given candidates (all equal: all 1)."""
    if not scores:
        return {}
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return dict.fromkeys(scores, 1.0)
    return {k: (v - lo) / (hi - lo) for k, v in scores.items()}


def weighted(dense: Mapping[K, float], lexical: Mapping[K, float], alpha: float) -> dict[K, float]:
    """``alpha * dense + (1 - alpha) * lexical`` of min-max normalised candidate scores."""
    d, lex = minmax(dense), minmax(lexical)
    return {k: alpha * d.get(k, 0.0) + (1 - alpha) * lex.get(k, 0.0) for k in dict.fromkeys([*d, *lex])}


def rrf(dense: Mapping[K, float], lexical: Mapping[K, float], k: int = RRF_K) -> dict[K, float]:
    """Reciprocal rank fusion of two candidate lists (each ranked by its own scores, ties by key)."""
    fused: dict[K, float] = {}
    for side in (dense, lexical):
        for rank, key in enumerate(sorted(side, key=lambda x: (-side[x], x)), start=1):
            fused[key] = fused.get(key, 0.0) + 1.0 / (k + rank)
    return fused


def fuse(dense: Mapping[K, float], lexical: Mapping[K, float], fusion: Fusion, alpha: float) -> dict[K, float]:
    return weighted(dense, lexical, alpha) if fusion == "weighted" else rrf(dense, lexical)


def ranked(scores: Mapping[K, float]) -> list[K]:
    """Keys by score, highest first, ties by key."""
    return sorted(scores, key=lambda x: (-scores[x], x))


def top_candidates(row: np.ndarray, n: int = CANDIDATES) -> dict[int, float]:
    """One query's ``n`` best columns of a score row (ties by column) with their scores; zero-scored columns of a
    lexical row are no candidates (they contain no query term)."""
    order = np.lexsort((np.arange(len(row)), -row))[:n]
    return {int(i): float(row[i]) for i in order}


def fuse_rows(dense: np.ndarray, lexical: np.ndarray, fusion: Fusion, alpha: float, n: int = CANDIDATES) -> np.ndarray:
    """Exact fused scores of score matrices ``(n_queries, n_docs)``: per query, each side's top ``n`` candidates
    (lexical ones with a positive score) fused; documents no side proposes get ``-inf``."""
    out = np.full(dense.shape, -np.inf, dtype=np.float64)
    for i in range(len(dense)):
        lex = {k: v for k, v in top_candidates(lexical[i], n).items() if v > 0}
        for key, value in fuse(top_candidates(dense[i], n), lex, fusion, alpha).items():
            out[i, key] = value
    return out


class LearnedFusion(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A dense weight fitted on a validation split (``embedlift train``, ``embedlift finetune``), recorded with the
    lexical settings it was fitted under: it applies to collections with the same ones.

    Attributes:
        alpha: The dense weight of weighted fusion.
        metric: What the fit maximised.
        validation: The validation metrics of the dense ranking and of the hybrid one at ``alpha``.
        lexical: The analyzer settings of the lexical side it was fitted with.
    """

    alpha: float
    metric: str = "mrr@10"
    validation: dict[str, dict[str, float]] = {}
    lexical: LexicalSettings = LexicalSettings()
