"""Exact information-retrieval metrics from a score matrix.

Every query is ranked against the whole corpus (no approximate search), ties broken by document id, as
sentence-transformers' ``InformationRetrievalEvaluator`` does. Metric names are flat: ``hit_rate@k``,
``mrr@k``, ``recall@k``, ``precision@k``, ``ndcg@k``, ``map@k``. ``hit_rate@k`` and ``mrr@k`` follow
LlamaIndex: a hit when a relevant document is in the top k; the reciprocal rank of the first relevant
document in the top k, else 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("hit_rate", "mrr", "recall", "precision", "ndcg", "map")
DEFAULT_KS = (1, 3, 5, 10)


def rank_documents(scores: np.ndarray, doc_ids: Sequence[str], top: int) -> np.ndarray:
    """Indices of the ``top`` best documents per query, best first, ties broken by ascending document id.

    Args:
        scores: ``(n_queries, n_docs)`` similarities.
        doc_ids: Id of each column.
        top: How many to return (clipped to ``n_docs``).
    """
    order = np.argsort(np.asarray(doc_ids, dtype=object), kind="stable")  # columns in id order
    by_id = scores[:, order]
    # A stable sort on -score keeps id order among equal scores.
    ranked = np.argsort(-by_id, axis=1, kind="stable")[:, : min(top, scores.shape[1])]
    return order[ranked]


def first_relevant_rank(scores: np.ndarray, doc_ids: Sequence[str], relevant: Sequence[set[int]]) -> np.ndarray:
    """1-based rank of each query's best-ranked relevant document in the full ranking (ties by id)."""
    id_rank = np.empty(len(doc_ids), dtype=np.int64)
    id_rank[np.argsort(np.asarray(doc_ids, dtype=object), kind="stable")] = np.arange(len(doc_ids))
    ranks = np.empty(len(relevant), dtype=np.int64)
    for i, rel in enumerate(relevant):
        rel_idx = np.fromiter(rel, dtype=np.int64)
        row = scores[i]
        best = rel_idx[np.lexsort((id_rank[rel_idx], -row[rel_idx]))[0]]  # best relevant: top score, then id
        s = row[best]
        ranks[i] = 1 + int((row > s).sum()) + int(((row == s) & (id_rank < id_rank[best])).sum())
    return ranks


def per_query_metrics(
    scores: np.ndarray, doc_ids: Sequence[str], relevant: Sequence[set[int]], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, np.ndarray]:
    """Each metric for each query: ``{"hit_rate@5": array (n_queries,), ...}``; their means are the metrics."""
    if scores.shape != (len(relevant), len(doc_ids)):
        raise ValueError(f"scores shape {scores.shape} != ({len(relevant)} queries, {len(doc_ids)} documents)")
    top = rank_documents(scores, doc_ids, max(ks))
    hits = np.array([[d in rel for d in row] for row, rel in zip(top, relevant, strict=True)], dtype=bool)
    n_rel = np.array([len(r) for r in relevant], dtype=np.float64)
    positions = np.arange(1, hits.shape[1] + 1, dtype=np.float64)
    discounts = 1.0 / np.log2(positions + 1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = hits[:, :k]
        n_hit = h.sum(axis=1)
        first = np.where(h.any(axis=1), h.argmax(axis=1) + 1, 0)
        out[f"hit_rate@{k}"] = (n_hit > 0).astype(np.float64)
        out[f"mrr@{k}"] = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
        out[f"recall@{k}"] = n_hit / n_rel
        out[f"precision@{k}"] = n_hit / k
        dcg = (h * discounts[: h.shape[1]]).sum(axis=1)
        ideal = np.array([discounts[: min(int(n), k)].sum() for n in n_rel])
        out[f"ndcg@{k}"] = dcg / ideal
        precision_at_hits = np.cumsum(h, axis=1) / positions[: h.shape[1]] * h
        out[f"map@{k}"] = precision_at_hits.sum(axis=1) / np.minimum(n_rel, k)
    return {name: out[name] for name in metric_names(ks)}


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Metric keys in display order: by metric, then by k."""
    return [f"{m}@{k}" for m in METRICS for k in ks]


def mean_metrics(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(values.mean()) if len(values) else 0.0 for name, values in per_query.items()}


def bootstrap_delta(
    a: np.ndarray, b: np.ndarray, *, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Paired bootstrap interval of ``mean(b) - mean(a)`` over queries (both arrays per query, same order)."""
    diff = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    if len(diff) == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_resamples, len(diff)))
    means = diff[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
