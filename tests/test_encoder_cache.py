"""The local encoder's fingerprint and the persistent base-embedding cache."""

from collections.abc import Sequence

import numpy as np
import pytest

from embedlift.models.cache import CachedEncoder, EmbeddingCache
from embedlift.models.encoders import Encoder, LocalEncoder
from embedlift.models.errors import InvalidInputError


class CountingEncoder(Encoder):
    """Delegates to the real model and counts the texts it was asked to embed."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.name, self.dim, self.fingerprint = inner.name, inner.dim, inner.fingerprint

    def encode(self, texts: Sequence[str], role):
        self.calls.append(list(texts))
        return self.inner.encode(texts, role)

    def split(self, texts, role):
        return self.inner.split(texts, role)

    def prompt(self, role):
        return self.inner.prompt(role)

    def count_tokens(self, texts):
        return self.inner.count_tokens(texts)


def test_encode_is_normalised_float32(minilm):
    v = minilm.encode(["hello world", "another text"], "query")
    assert v.dtype == np.float32 and v.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_fingerprint_is_stable_and_path_free(minilm):
    from embedlift.models.encoders import default_model_path

    again = LocalEncoder(default_model_path(), precision="fp32", runtime="torch")  # the same weights, loaded by path
    assert again.fingerprint == minilm.fingerprint
    assert str(default_model_path()) not in minilm.fingerprint
    assert minilm.fingerprint.startswith("all-MiniLM-L6-v2:")


def test_fingerprint_changes_with_prompts():
    prompted = LocalEncoder(query_prompt="Represent this question for retrieval: ", precision="fp32", runtime="torch")
    plain = LocalEncoder(precision="fp32", runtime="torch")
    assert prompted.fingerprint != plain.fingerprint
    q = prompted.encode(["revenue growth"], "query")
    d = prompted.encode(["revenue growth"], "document")
    assert not np.allclose(q, d)  # the query carries the instruction, the document does not


def test_bad_base_and_window_are_clear_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="cannot load base model"):
        LocalEncoder(str(tmp_path / "no-such-model"))
    with pytest.raises(InvalidInputError, match="window_tokens must be between"):
        LocalEncoder(window_tokens=100_000)


def test_second_run_never_runs_the_model(minilm, tmp_path):
    texts = ["first passage", "second passage", "first passage"]
    counting = CountingEncoder(minilm)
    first = CachedEncoder(counting, EmbeddingCache(tmp_path / "c.sqlite3"))
    v1 = first.encode(texts, "document")
    assert counting.calls == [["first passage", "second passage"]]  # de-duplicated
    assert (first.stats.cached, first.stats.computed) == (0, 2)

    counting2 = CountingEncoder(minilm)
    second = CachedEncoder(counting2, EmbeddingCache(tmp_path / "c.sqlite3"))  # a new process would do this
    v2 = second.encode(texts, "document")
    assert counting2.calls == []
    assert (second.stats.cached, second.stats.computed) == (2, 0)
    np.testing.assert_array_equal(v1, v2)


def test_cache_key_includes_the_prompt(tmp_path):
    prompted = LocalEncoder(query_prompt="query: ", precision="fp32", runtime="torch")
    cached = CachedEncoder(prompted, EmbeddingCache(tmp_path / "c.sqlite3"))
    q = cached.encode(["net income"], "query")
    d = cached.encode(["net income"], "document")
    assert cached.stats.computed == 2  # same text, different model inputs
    assert not np.allclose(q, d)
