"""OpenAI-protocol clients as RAG apps use them, unmodified, against a real server on the real model: LangChain's
``OpenAIEmbeddings`` with its defaults (token ids, base64, 1000 texts a request) and the openai SDK with ids."""

from __future__ import annotations

import hashlib
import shutil

import httpx
import numpy as np
import openai
import pytest

from tests.helpers import start_server, stop_server

pytestmark = pytest.mark.slow
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    proc, url = start_server(root / "data", root / "adapters", "--watch-interval", "0")
    yield url
    assert stop_server(proc) == 0


@pytest.fixture
def tiktoken_cache(tmp_path, monkeypatch):
    """The client's tiktoken cannot download either: its cache gets the file embedlift ships, named as tiktoken
    names a cached download."""
    from embedlift.models.bpe import DATA

    shutil.copy(DATA, tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


def embed(server: str, texts: list[str], role: str = "query") -> np.ndarray:
    r = httpx.post(f"{server}/embed", json={"input": texts, "input_type": role}, timeout=120)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


def test_langchain_openai_embeddings_with_its_defaults_gives_embed_vectors(server, tiktoken_cache):
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model="active", base_url=f"{server}/v1", api_key="unused")  # check_embedding_ctx_length=True
    assert lc.check_embedding_ctx_length
    texts = ["How many riders did Lyft have in 2021?", "Drivers are independent contractors.", "Café prices — 5 € each, naïvely."]
    np.testing.assert_allclose(lc.embed_documents(texts), embed(server, texts), atol=1e-5)
    np.testing.assert_allclose(lc.embed_query(texts[0]), embed(server, texts[:1])[0], atol=1e-5)


def test_langchain_sends_1000_texts_a_request_and_they_pass(server, tiktoken_cache):
    from langchain_openai import OpenAIEmbeddings

    texts = [f"Lyft risk factor number {i}: regulation of ride sharing in market {i % 17}." for i in range(1000)]
    for check in (True, False):
        lc = OpenAIEmbeddings(model="active", base_url=f"{server}/v1", api_key="unused", check_embedding_ctx_length=check)
        vectors = np.array(lc.embed_documents(texts))
        assert vectors.shape == (1000, 384)
    np.testing.assert_allclose(vectors[[0, 999]], embed(server, [texts[0], texts[999]]), atol=1e-5)


def test_token_ids_through_the_openai_sdk_count_as_sent(server, tiktoken_cache):
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base")
    text = "What were Lyft's total revenues in 2021? " * 40  # longer than the model's window: windowed, not cut
    ids = enc.encode(text)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    by_ids = client.embeddings.create(model="active", input=[ids])
    by_text = client.embeddings.create(model="active", input=[text])
    np.testing.assert_allclose(by_ids.data[0].embedding, by_text.data[0].embedding, atol=1e-6)
    assert by_ids.usage.prompt_tokens == len(ids)
    flat = client.embeddings.create(model="active", input=ids)  # one list of ids is one input
    assert len(flat.data) == 1


def test_a_request_over_the_token_budget_says_both_limits(tmp_path):
    proc, url = start_server(tmp_path / "data", tmp_path / "adapters", "--watch-interval", "0", "--base", "hashing:64",
                             env={"EMBEDLIFT_MAX_REQUEST_TOKENS": "100"})
    try:
        r = httpx.post(f"{url}/embed", json={"input": ["one two three four five six seven eight nine ten eleven"] * 20})
        assert r.status_code == 413
        assert "tokens > maximum allowed 100 tokens per request" in r.json()["detail"] and "2048 inputs" in r.json()["detail"]
        assert httpx.post(f"{url}/embed", json={"input": ["short"] * 10}).status_code == 200
    finally:
        stop_server(proc)
