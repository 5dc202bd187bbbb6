"""Base vs adapters, side by side, on one dataset.

Every query is scored exactly against the whole corpus with the windowed scoring training uses. Each
adapter's row carries its deltas against the base with a paired bootstrap 95% interval, so a user can tell
a real gain from noise before shipping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from embedlift.models.checkpoint import Checkpoint
from embedlift.models.errors import InvalidInputError
from embedlift.training.metrics import (
    DEFAULT_KS,
    bootstrap_delta,
    first_relevant_rank,
    mean_metrics,
    metric_names,
    per_query_metrics,
)
from embedlift.training.retrieval import EmbeddedDataset

BASE = "base"
CURVE_KS = tuple(range(1, 11))


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

    def to_json(self) -> dict[str, dict[str, float]]:
        """``{"base": {"hit_rate@5": ...}, "<adapter>": {...}}``, as ``embedlift eval --json`` prints."""
        return {r.name: r.metrics for r in self.results}

    def ranks(self) -> dict[str, dict[str, int]]:
        """Per model, each query's rank of its first relevant document (what an adapter fixed or broke)."""
        return {r.name: dict(zip(self.query_ids, map(int, r.ranks), strict=True)) for r in self.results}


def _check_names(checkpoints: Sequence[Checkpoint]) -> None:
    names = [c.name for c in checkpoints]
    if BASE in names:
        raise InvalidInputError(f"an adapter may not be named {BASE!r} (the name of the base row); rename it")
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise InvalidInputError(f"two adapters share the name {dupes[0]!r}: names must be unique in one comparison")


def _result(name: str, scores: np.ndarray, data: EmbeddedDataset, ks: tuple[int, ...]) -> ModelResult:
    per_query = per_query_metrics(scores, data.doc_ids, data.relevant, ks)
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
    seed: int = 0,
) -> Comparison:
    """The base and each adapter on the same dataset embedded more than one way (e.g. by the float32 and the
    int8 backend of one model), in one comparison: rows of a run labelled ``x`` are named ``base [x]``,
    ``name [x]``; every delta is against the first run's base, so the table shows what the other runs cost.
    """
    ks = tuple(sorted(set(ks)))
    if not ks or ks[0] < 1:
        raise InvalidInputError(f"k values must be positive integers, got {list(ks)}")
    _check_names(checkpoints)
    data = runs[0][1]
    if any(other.query_ids != data.query_ids or other.doc_ids != data.doc_ids for _, other in runs[1:]):
        raise InvalidInputError("compared runs must embed the same queries and documents")
    results: list[ModelResult] = []
    for label, run in runs:
        suffix = f" [{label}]" if label else ""
        results.append(_result(BASE + suffix, run.scores(None), run, ks))
        results += [_result(c.name + suffix, run.scores(c.adapter), run, ks) for c in checkpoints]
    base = results[0]
    deltas = {
        r.name: {
            m: (r.metrics[m] - base.metrics[m], *bootstrap_delta(base.per_query[m], r.per_query[m], seed=seed))
            for m in metric_names(ks)
        }
        for r in results[1:]
    }
    return Comparison(
        ks=ks, query_ids=data.query_ids, results=results, n_docs=data.docs.n_docs,
        n_windowed=data.docs.n_windowed, deltas=deltas,
    )
