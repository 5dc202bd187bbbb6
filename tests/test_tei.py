"""TEI's protocol under /tei with the real clients that speak it, unmodified, on a real server and the real model:
LlamaIndex's ``TextEmbeddingsInference`` and huggingface_hub's ``InferenceClient(...).feature_extraction``."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.helpers import make_adapter, start_server, stop_server

pytestmark = pytest.mark.slow
READ_KEY = "tei-read-key"


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("tei")
    make_adapter(minilm, root / "adapters" / "tuned")
    proc, url = start_server(root / "data", root / "adapters", "--watch-interval", "0", "--api-key", READ_KEY,
                             env={"EMBEDLIFT_ADAPTER": "tuned"})
    yield url
    assert stop_server(proc) == 0


AUTH = {"Authorization": f"Bearer {READ_KEY}"}


def embed(server: str, texts: list[str], role: str) -> np.ndarray:
    r = httpx.post(f"{server}/embed", json={"input": texts, "input_type": role}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


TEXTS = ["What were Lyft's revenues in 2021?", "Drivers are classified as independent contractors. " * 40]


def test_llamaindex_text_embeddings_inference_on_both_sides(server):
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    documents = TextEmbeddingsInference(model_name="minilm", base_url=f"{server}/tei", auth_token=READ_KEY)
    queries = TextEmbeddingsInference(model_name="minilm", base_url=f"{server}/tei/query", auth_token=READ_KEY)
    np.testing.assert_allclose(documents.get_text_embedding_batch(TEXTS), embed(server, TEXTS, "document"), atol=1e-5)
    np.testing.assert_allclose(queries.get_query_embedding(TEXTS[0]), embed(server, TEXTS[:1], "query")[0], atol=1e-5)
    assert not np.allclose(queries.get_query_embedding(TEXTS[0]), documents.get_query_embedding(TEXTS[0]), atol=1e-3)  # the adapter


def test_huggingface_hub_feature_extraction(server, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite's HF_HUB_OFFLINE blocks even loopback; the URL is ours

    client = InferenceClient(model=f"{server}/tei", token=READ_KEY)
    got = client.feature_extraction(TEXTS[0])
    np.testing.assert_allclose(np.asarray(got).reshape(-1), embed(server, TEXTS[:1], "document")[0], atol=1e-5)
    as_query = InferenceClient(model=f"{server}/tei", token=READ_KEY).feature_extraction(TEXTS[0], prompt_name="query")
    np.testing.assert_allclose(np.asarray(as_query).reshape(-1), embed(server, TEXTS[:1], "query")[0], atol=1e-5)


def test_info_tokenize_and_tei_shaped_errors(server):
    info = httpx.get(f"{server}/tei/info", headers=AUTH).json()
    assert info["dimension"] == 384 and info["max_input_length"] == 256 and info["max_client_batch_size"] == 2048
    tokens = httpx.post(f"{server}/tei/tokenize", json={"inputs": "Lyft rides"}, headers=AUTH).json()[0]
    assert tokens[0]["special"] and tokens[-1]["special"]  # [CLS] ... [SEP]
    assert "".join(t["text"] for t in tokens if not t["special"]) == "Lyftrides"  # each token's text is its span
    assert tokens[1]["start"] == 0 and tokens[-2]["stop"] == len("Lyft rides")
    for body, status, kind, words in [
        ({"inputs": []}, 400, "Validation", "inputs"),
        ({"inputs": "x", "dimensions": 64}, 400, "Validation", "dimensions=64"),
        ({"inputs": "x", "prompt_name": "nope"}, 400, "Validation", "prompt_name"),
    ]:
        r = httpx.post(f"{server}/tei/embed", json=body, headers=AUTH)
        assert r.status_code == status and r.json()["error_type"] == kind and words in r.json()["error"], r.text
    r = httpx.post(f"{server}/tei/embed", json={"inputs": "x"})
    assert r.status_code == 401 and set(r.json()) == {"error", "error_type"}
    r = httpx.post(f"{server}/tei/embed", params={"adapter": "nope"}, json={"inputs": "x"}, headers=AUTH)
    assert r.status_code == 404 and "unknown adapter" in r.json()["error"]
    base = httpx.post(f"{server}/tei/query", params={"adapter": "base"}, json={"inputs": TEXTS[0]}, headers=AUTH).json()
    np.testing.assert_allclose(base[0], embed(server, TEXTS[:1], "document")[0], atol=1e-5)  # no adapter: base space
