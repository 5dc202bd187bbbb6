"""Long texts are split into windows that cover every token; documents score by their best window."""

import numpy as np
import pytest

from embedlift.models.windows import best_window_scores, embed_documents, embed_pooled, plan_windows


def _offsets(text):
    out, pos = [], 0
    for word in text.split(" "):
        out.append((pos, pos + len(word)))
        pos += len(word) + 1
    return out


def test_short_text_is_one_window():
    text = "a b c"
    assert plan_windows(text, _offsets(text), size=5, stride=4) == [(0, len(text))]


@pytest.mark.parametrize("size,stride", [(4, 3), (5, 5), (7, 2), (8, 1)])
def test_windows_cover_every_token_and_overlap(size, stride):
    text = " ".join(f"w{i}" for i in range(23))
    offsets = _offsets(text)
    spans = plan_windows(text, offsets, size, stride)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    covered = set()
    for a, b in spans:
        inside = [i for i, (s, e) in enumerate(offsets) if s >= a and e <= b]
        assert 0 < len(inside) <= size
        covered.update(inside)
    assert covered == set(range(len(offsets)))


def test_best_window_scores_take_the_max_per_document():
    scores = np.array([[0.1, 0.7, 0.3, 0.2, 0.9]])
    owner = np.array([0, 0, 1, 2, 2])
    assert best_window_scores(scores, owner, 3).tolist() == [[pytest.approx(0.7), pytest.approx(0.3), pytest.approx(0.9)]]


def test_real_model_windows_a_long_document_and_keeps_its_end(minilm):
    tail = "The secret password is periwinkle."
    long_doc = " ".join(["Revenue grew in every quarter of the fiscal year."] * 80) + " " + tail
    docs = embed_documents(minilm, ["A short note.", long_doc])
    assert docs.n_docs == 2 and docs.n_windowed == 1
    spans = [s for s, o in zip(docs.spans, docs.owner) if o == 1]
    assert len(spans) > 2 and long_doc[spans[-1][0] : spans[-1][1]].endswith(tail)
    for a, b in spans:  # each window fits the model once re-tokenized
        assert len(minilm.tokenizer(long_doc[a:b], add_special_tokens=False)["input_ids"]) <= minilm.window_tokens
    # the question about the tail finds the long document through its last window
    q = minilm.encode(["What is the secret password?"], "query")
    from embedlift.training.retrieval import windowed_scores

    whole = embed_documents(minilm, ["A short note.", long_doc], windows=False)
    assert windowed_scores(q, docs)[0, 1] > windowed_scores(q, whole)[0, 1] + 0.1


def test_pooled_query_is_the_normalised_mean_of_its_windows(minilm):
    long_query = " ".join(["what does the company say about risk factors"] * 60)
    vectors, counts = embed_pooled(minilm, [long_query, "short"], "query")
    assert counts.tolist()[1] == 1 and counts[0] > 1
    spans = minilm.split([long_query], "query")[0]
    parts = minilm.encode([long_query[a:b] for a, b in spans], "query")
    mean = parts.mean(axis=0)
    np.testing.assert_allclose(vectors[0], mean / np.linalg.norm(mean), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
