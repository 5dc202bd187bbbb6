"""Base vs adapters vs fine-tuned models, side by side, on one dataset.

Every query is scored exactly against the whole corpus with the windowed scoring training uses. Each
adapter's (or fine-tuned model's) column carries its deltas against the base with a paired bootstrap 95%
interval, so a user can tell a real gain from noise before shipping. A dataset with hard negatives also gets
triplet accuracy: how often a query is closer to its positive than to its negative, under cosine, dot,
euclidean and manhattan distance (sentence-transformers' ``TripletEvaluator``), a document being as close as
its closest window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from embedlift.models.adapters import Adapter
from embedlift.models.checkpoint import Checkpoint
from embedlift.models.errors import InvalidInputError
from embedlift.models.fusion import DEFAULT_ALPHA, Fusion
from embedlift.training.metrics import (
    DEFAULT_KS,
    bootstrap_delta,
    first_relevant_rank,
    mean_metrics,
    metric_names,
    per_query_metrics,
)
from embedlift.training.hybrid import hybrid_scores
from embedlift.training.retrieval import EmbeddedDataset

BASE = "base"
LEXICAL = "lexical"  # the BM25 row of a hybrid comparison
HYBRID_SUFFIX = "+hybrid"
CURVE_KS = tuple(range(1, 11))
TRIPLET_METRICS = ("triplet_accuracy_cosine", "triplet_accuracy_dot", "triplet_accuracy_euclidean", "triplet_accuracy_manhattan")


@dataclass(frozen=True)
class ModelResult:
    """One model's metrics on the dataset.

    Attributes:
        name: ``base`` or the adapter's checkpoint name.
        metrics: Mean of each metric.
        per_query: Each metric per query (for bootstrap intervals).
        ranks: 1-based rank of each query's first relevant document in the full ranking.
        curve: ``hit_rate@k`` for k = 1..10 (the report's curve).
    """

    name: str
    metrics: dict[str, float]
    per_query: dict[str, np.ndarray]
    ranks: np.ndarray
    curve: list[float]


@dataclass(frozen=True)
class Comparison:
    """The base and each adapter on one dataset; ``results[0]`` is the base."""

    ks: tuple[int, ...]
    query_ids: list[str]
    results: list[ModelResult]
    n_docs: int
    n_windowed: int
    deltas: dict[str, dict[str, tuple[float, float, float]]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, dict[str, float]]:
        """``{"base": {"hit_rate@5": ...}, "<adapter>": {...}}``, as ``embedlift eval --json`` prints."""
        return {r.name: r.metrics for r in self.results}

    def ranks(self) -> dict[str, dict[str, int]]:
        """Per model, each query's rank of its first relevant document (what an adapter fixed or broke)."""
        return {r.name: dict(zip(self.query_ids, map(int, r.ranks), strict=True)) for r in self.results}


@dataclass(frozen=True)
class Hybrid:
    """How a comparison's hybrid rows are made: the fusion and each dense row's alpha (by row name: ``base``, an
    adapter's, a fine-tuned model's; rows not named use ``DEFAULT_ALPHA``)."""

    fusion: Fusion = "weighted"
    alphas: dict[str, float] = field(default_factory=dict)


def _hybrid_results(
    data: EmbeddedDataset, checkpoints: Sequence[Checkpoint], models: Sequence[tuple[str, EmbeddedDataset]], hybrid: Hybrid, ks: tuple[int, ...]
) -> list[ModelResult]:
    """``lexical`` (BM25 alone) and ``<row>+hybrid`` for the base, each adapter and each model."""
    if data.lexical is None:
        raise InvalidInputError("hybrid rows need the dataset's lexical scores (training.hybrid.with_lexical)")
    dense_rows = [(BASE, data.scores(None)), *((c.name, data.scores(c.adapter)) for c in checkpoints), *((n, run.scores(None)) for n, run in models)]
    out = [_result(LEXICAL, data.lexical, data, ks, triplets=False)]
    for name, dense in dense_rows:
        fused = hybrid_scores(dense, data.lexical, hybrid.fusion, hybrid.alphas.get(name, DEFAULT_ALPHA))
        out.append(_result(f"{name}{HYBRID_SUFFIX}", fused, data, ks, triplets=False))
    return out


def _check_names(checkpoints: Sequence[Checkpoint]) -> None:
    names = [c.name for c in checkpoints]
    if reserved := [n for n in names if n in (BASE, LEXICAL) or n.endswith(HYBRID_SUFFIX)]:
        raise InvalidInputError(
            f"an adapter may not be named {reserved[0]!r} (base, lexical and names ending in {HYBRID_SUFFIX!r} name rows of the table); rename it"
        )
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise InvalidInputError(f"two adapters share the name {dupes[0]!r}: names must be unique in one comparison")


def triplet_accuracy(data: EmbeddedDataset, adapter: Adapter | None = None) -> dict[str, np.ndarray]:
    """Per query with hard negatives, the fraction of its (positive, negative) pairs ranked right under each
    distance. Vectors as the model gives them (an adapter's output not normalised), as TripletEvaluator does."""
    q = data.queries if adapter is None else adapter.transform_query(data.queries, normalize=False)
    w = data.docs.vectors if adapter is None else adapter.transform_document(data.docs.vectors, normalize=False)
    start = data.docs.bounds()
    qn = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    wn = w / np.linalg.norm(w, axis=1, keepdims=True).clip(1e-12)

    def closeness(i: int, doc: int) -> np.ndarray:
        """Higher is closer, per distance: the document's best window."""
        win, winn = w[start[doc] : start[doc + 1]], wn[start[doc] : start[doc + 1]]
        return np.array([
            (winn @ qn[i]).max(), (win @ q[i]).max(),
            -np.linalg.norm(win - q[i], axis=1).min(), -np.abs(win - q[i]).sum(axis=1).min(),
        ])

    out: dict[str, list[float]] = {m: [] for m in TRIPLET_METRICS}
    for i, negatives in enumerate(data.negatives):
        if not negatives:
            continue
        positives = [closeness(i, p) for p in sorted(data.relevant[i])]
        right = [p > n for n in (closeness(i, d) for d in negatives) for p in positives]
        for m, frac in zip(TRIPLET_METRICS, np.mean(right, axis=0), strict=True):
            out[m].append(float(frac))
    return {m: np.array(v) for m, v in out.items()}


def _result(
    name: str, scores: np.ndarray, data: EmbeddedDataset, ks: tuple[int, ...], adapter: Adapter | None = None, *, triplets: bool = True
) -> ModelResult:
    per_query = per_query_metrics(scores, data.doc_ids, data.relevant, ks)
    if triplets and any(data.negatives):
        per_query |= triplet_accuracy(data, adapter)
    curve = per_query_metrics(scores, data.doc_ids, data.relevant, CURVE_KS)
    return ModelResult(
        name=name,
        metrics=mean_metrics(per_query),
        per_query=per_query,
        ranks=first_relevant_rank(scores, data.doc_ids, data.relevant),
        curve=[float(curve[f"hit_rate@{k}"].mean()) for k in CURVE_KS],
    )


def compare(
    data: EmbeddedDataset, checkpoints: Sequence[Checkpoint] = (), ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0
) -> Comparison:
    """Evaluate the base and each adapter on an embedded dataset.

    Args:
        data: The dataset embedded by the base the adapters were trained on.
        checkpoints: Adapters to compare with the base (names must be unique and not ``base``).
        ks: Cut-offs.
        seed: Seed of the bootstrap.
    """
    return compare_runs([("", data)], checkpoints, ks, seed=seed)


def compare_runs(
    runs: Sequence[tuple[str, EmbeddedDataset]],
    checkpoints: Sequence[Checkpoint] = (),
    ks: Sequence[int] = DEFAULT_KS,
    *,
    models: Sequence[tuple[str, EmbeddedDataset]] = (),
    hybrid: Hybrid | None = None,
    seed: int = 0,
) -> Comparison:
    """The base and each adapter on the same dataset embedded more than one way (e.g. by the float32 and the
    int8 backend of one model), in one comparison: rows of a run labelled ``x`` are named ``base [x]``,
    ``name [x]``; every delta is against the first run's base, so the table shows what the other runs cost.

    Args:
        models: Other whole models (fine-tuned bases) on the same dataset, each a row of its own name, without
            adapters (adapters belong to the base they were trained on).
        hybrid: Add a ``lexical`` row (BM25 alone) and a ``<row>+hybrid`` row for the first run's base, each
            adapter and each model, fused with each row's alpha (``hybrid.alphas``, else the default); the
            datasets must carry their lexical scores (``training/hybrid.py: with_lexical``).
    """
    ks = tuple(sorted(set(ks)))
    if not ks or ks[0] < 1:
        raise InvalidInputError(f"k values must be positive integers, got {list(ks)}")
    _check_names(checkpoints)
    data = runs[0][1]
    if any(other.query_ids != data.query_ids or other.doc_ids != data.doc_ids for _, other in [*runs[1:], *models]):
        raise InvalidInputError("compared runs must embed the same queries and documents")
    if clash := {n for n, _ in models} & ({BASE} | {c.name for c in checkpoints}):
        raise InvalidInputError(f"a fine-tuned model and an adapter (or the base row) share the name {sorted(clash)[0]!r}; rename one")
    results: list[ModelResult] = []
    for label, run in runs:
        suffix = f" [{label}]" if label else ""
        results.append(_result(BASE + suffix, run.scores(None), run, ks))
        results += [_result(c.name + suffix, run.scores(c.adapter), run, ks, c.adapter) for c in checkpoints]
    results += [_result(name, run.scores(None), run, ks) for name, run in models]
    if hybrid is not None:
        results += _hybrid_results(runs[0][1], checkpoints, models, hybrid, ks)
    base = results[0]
    names = [*metric_names(ks), *(TRIPLET_METRICS if TRIPLET_METRICS[0] in base.metrics else ())]
    deltas = {
        r.name: {
            m: (r.metrics[m] - base.metrics[m], *bootstrap_delta(base.per_query[m], r.per_query[m], seed=seed))
            for m in names
            if m in r.metrics
        }
        for r in results[1:]
    }
    return Comparison(
        ks=ks, query_ids=data.query_ids, results=results, n_docs=data.docs.n_docs,
        n_windowed=data.docs.n_windowed, deltas=deltas, names=names,
    )
