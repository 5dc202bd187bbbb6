"""Metrics against rankings computed by hand on tiny data."""

import math

import numpy as np
import pytest

from embedlift.training.metrics import bootstrap_delta, first_relevant_rank, mean_metrics, per_query_metrics, rank_documents

DOCS = ["d0", "d1", "d2", "d3"]


def test_ranking_breaks_ties_by_document_id():
    ids = ["b", "a", "c"]
    scores = np.array([[0.5, 0.5, 0.9]])
    assert rank_documents(scores, ids, 3).tolist() == [[2, 1, 0]]  # c, then a before b


def test_single_relevant_metrics_by_hand():
    # query 0: ranking d2, d0, d1, d3 -> relevant d0 at rank 2
    # query 1: ranking d3, d2, d1, d0 -> relevant d0 at rank 4
    scores = np.array([[0.8, 0.3, 0.9, 0.1], [0.1, 0.2, 0.3, 0.4]])
    m = mean_metrics(per_query_metrics(scores, DOCS, [{0}, {0}], ks=(1, 3, 5)))
    assert m["hit_rate@1"] == 0.0
    assert m["hit_rate@3"] == 0.5
    assert m["hit_rate@5"] == 1.0
    assert m["mrr@3"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["mrr@5"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["precision@3"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["map@5"] == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_several_relevant_documents_by_hand():
    # ranking d1, d3, d0, d2; relevant {d0, d1}: hits at ranks 1 and 3
    scores = np.array([[0.5, 0.9, 0.1, 0.7]])
    m = mean_metrics(per_query_metrics(scores, DOCS, [{0, 1}], ks=(1, 3)))
    assert m["recall@1"] == 0.5 and m["recall@3"] == 1.0
    assert m["precision@3"] == pytest.approx(2 / 3)
    assert m["mrr@3"] == 1.0
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / idcg)
    assert m["map@3"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m["map@1"] == pytest.approx(1.0)


def test_first_relevant_rank_counts_ties_by_id():
    scores = np.array([[0.5, 0.5, 0.5, 0.1], [0.2, 0.9, 0.9, 0.3]])
    assert first_relevant_rank(scores, DOCS, [{2}, {2, 3}]).tolist() == [3, 2]


def test_bootstrap_interval_brackets_the_true_shift():
    rng = np.random.default_rng(1)
    a = rng.random(400)
    lo, hi = bootstrap_delta(a, a + 0.1)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    lo, hi = bootstrap_delta(a, rng.random(400))
    assert lo < 0 < hi


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="scores shape"):
        per_query_metrics(np.zeros((2, 3)), DOCS, [{0}, {1}])
