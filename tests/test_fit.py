"""Fitting on real base vectors of a Lyft slice: it learns, it is deterministic, and it keeps the identity
when it cannot beat the base."""

import numpy as np
import pytest
import torch

from embedlift.models.cache import CachedEncoder, EmbeddingCache
from embedlift.training.dataset import load_dataset, split
from embedlift.training.fit import FitSettings, evaluate_adapter, fit_adapter
from embedlift.training.retrieval import embed_dataset


@pytest.fixture(scope="module")
def embedded(minilm, lyft_slice, shared_cache):
    enc = CachedEncoder(minilm, EmbeddingCache(shared_cache), progress=False)
    ds = load_dataset(lyft_slice)
    train, val = split(ds, 0.2, by="document", seed=0)
    return embed_dataset(enc, ds), embed_dataset(enc, train), embed_dataset(enc, val)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_adapter_learns_its_training_queries(embedded, kind):
    everything, _, _ = embedded
    # validating on the training data itself: the adapter must fit it better than the base
    result = fit_adapter(everything, everything, FitSettings(kind=kind, epochs=10, patience=10), progress=False)
    assert result.improved and result.best_epoch > 0
    assert evaluate_adapter(everything, result.adapter)["mrr@10"] > evaluate_adapter(everything, None)["mrr@10"] + 0.02


def test_fitting_is_deterministic(embedded):
    _, train, val = embedded
    a = fit_adapter(train, val, FitSettings(epochs=3, seed=7), progress=False)
    b = fit_adapter(train, val, FitSettings(epochs=3, seed=7), progress=False)
    for pa, pb in zip(a.adapter.parameters(), b.adapter.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert a.history == b.history


def test_identity_kept_when_nothing_beats_the_base(embedded):
    _, train, val = embedded
    # a learning rate this small cannot move MRR: the guard must keep the identity and say so
    result = fit_adapter(train, val, FitSettings(epochs=2, lr=1e-9, patience=1), progress=False)
    assert not result.improved and result.best_epoch == 0
    assert "kept the identity adapter" in result.summary()
    np.testing.assert_allclose(result.adapter.transform(val.queries), val.queries, atol=1e-5)


def test_other_positives_are_never_negatives(embedded):
    everything, _, _ = embedded
    from dataclasses import replace

    # give the first query a second relevant document; its loss must not push that document away
    multi = replace(everything, relevant=[everything.relevant[0] | {5}] + everything.relevant[1:])
    result = fit_adapter(multi, multi, FitSettings(epochs=2, patience=2), progress=False)
    assert result.history and all(np.isfinite(h["loss"]) for h in result.history)


def test_sampled_candidates_with_hard_negatives(embedded):
    _, train, val = embedded
    from dataclasses import replace

    # each query's two top-ranked wrong documents as its dataset negatives: always among the sampled candidates
    scores = train.scores(None)
    negatives = [[int(d) for d in np.argsort(-row) if int(d) not in rel][:2] for row, rel in zip(scores, train.relevant)]
    with_negatives = replace(train, negatives=negatives)
    for loss in ("ranking", "triplet"):
        settings = FitSettings(epochs=2, max_candidate_docs=5, patience=2, loss=loss)
        result = fit_adapter(with_negatives, val, settings, progress=False)
        assert len(result.history) >= 1 and all(np.isfinite(h["loss"]) for h in result.history)
