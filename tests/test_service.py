"""The service: the engine without HTTP, then a real `embedlift serve` on 127.0.0.1 driven by httpx and
the real openai SDK."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from embedlift.models.adapters import AdapterConfig, build_adapter
from embedlift.models.cache import CachedEncoder, EmbeddingCache
from embedlift.models.checkpoint import BaseInfo, load_checkpoint, save_checkpoint
from embedlift.models.errors import NotFoundError
from embedlift.service.engine import Engine

REPO = Path(__file__).resolve().parents[1]
LONG = " ".join(["Lyft's revenue depends on the number of riders and drivers on its platform."] * 60)


def make_adapter(minilm, out: Path, apply_to: str = "query", seed: int = 0) -> Path:
    """A real checkpoint for the real base, with weights moved off the identity."""
    torch.manual_seed(seed)
    adapter = build_adapter(AdapterConfig(kind="linear", dim=minilm.dim, apply_to=apply_to))
    with torch.no_grad():
        adapter.linear.weight.add_(0.05 * torch.randn_like(adapter.linear.weight))
    base = BaseInfo(name=minilm.name, fingerprint=minilm.fingerprint, dim=minilm.dim, details=minilm.describe())
    save_checkpoint(adapter, out, base=base)
    return out


@pytest.fixture(scope="module")
def adapters_dir(minilm, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("adapters")
    make_adapter(minilm, d / "q-linear")
    make_adapter(minilm, d / "both-linear", apply_to="both", seed=1)
    return d


# ------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def engine(minilm, adapters_dir, tmp_path_factory):
    cache = EmbeddingCache(tmp_path_factory.mktemp("engine") / "c.sqlite3")
    ckpts = [load_checkpoint(p, expected_fingerprint=minilm.fingerprint) for p in sorted(adapters_dir.iterdir())]
    return Engine(CachedEncoder(minilm, cache, progress=False), ckpts, active="q-linear")


def test_engine_applies_the_adapter_to_queries_only(engine, minilm, adapters_dir):
    ckpt = load_checkpoint(adapters_dir / "q-linear")
    base = minilm.encode(["net revenue"], "query")
    q = engine.embed(["net revenue"], "query")
    assert q.adapter == "q-linear@1"
    np.testing.assert_allclose(q.vectors, ckpt.adapter.transform(base), atol=1e-5)
    d = engine.embed(["net revenue"], "document")
    np.testing.assert_allclose(d.vectors, base, atol=1e-6)  # apply_to=query: documents stay in base space
    both = engine.embed(["net revenue"], "document", "both-linear")
    np.testing.assert_allclose(both.vectors, load_checkpoint(adapters_dir / "both-linear").adapter.transform(base), atol=1e-5)
    assert engine.embed(["net revenue"], "query", "base").adapter == "base"


def test_engine_pools_long_inputs_unless_truncation_is_asked(engine, minilm):
    pooled = engine.embed([LONG, "short"], "query", "base")
    assert pooled.windows[0] > 1 and pooled.windows[1] == 1
    first = engine.embed([LONG], "query", "base", truncate=True)
    assert first.windows == [1]
    assert not np.allclose(pooled.vectors[0], first.vectors[0])


def test_engine_unknown_adapter_lists_names(engine):
    with pytest.raises(NotFoundError, match=r"available: \['base', 'both-linear', 'q-linear'\]"):
        engine.embed(["x"], "query", "nope")


# ------------------------------------------------------------------------------------------- HTTP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(adapters_dir, tmp_path_factory):
    """`embedlift serve` as a user starts it, on a free loopback port; stopped by its PID."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("serve-data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDLIFT_ADAPTER": "q-linear"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedlift.service.cli", "serve", "--port", str(port),
         "--data-dir", str(data_dir), "--adapters-dir", str(adapters_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server did not become ready in 120 s")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_health_and_ready(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/ready").status_code == 200


def test_embed_float_and_base64_agree(server, minilm, adapters_dir):
    r = httpx.post(f"{server}/embed", json={"input": ["net revenue", "active riders"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "q-linear@1" and r.headers["x-embedlift-adapter"] == "q-linear@1"
    assert body["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert body["usage"]["prompt_tokens"] > 0
    floats = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    expected = load_checkpoint(adapters_dir / "q-linear").adapter.transform(minilm.encode(["net revenue", "active riders"], "query"))
    np.testing.assert_allclose(floats, expected, atol=1e-5)
    b = httpx.post(f"{server}/embed", json={"input": "net revenue", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats[0], atol=1e-6)  # single vs batched encode: padding numerics


def test_embed_long_input_says_how_many_windows(server):
    r = httpx.post(f"{server}/embed", json={"input": [LONG, "short"], "input_type": "document"})
    counts = [int(c) for c in r.headers["x-embedlift-windows"].split(",")]
    assert counts[0] > 1 and counts[1] == 1


def test_openai_sdk_base64_and_float_match_embed(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    texts = ["How many riders did Lyft have?", "What are the risk factors?"]
    default = client.embeddings.create(model="active", input=texts)  # the SDK asks for base64
    floats = client.embeddings.create(model="active", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    native = np.array([d["embedding"] for d in httpx.post(f"{server}/embed", json={"input": texts}).json()["data"]])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, native, atol=1e-6)
    assert default.usage.total_tokens > 0
    base = np.array(client.embeddings.create(model="base", input=texts).data[0].embedding)
    doc = np.array(client.embeddings.create(model="q-linear:document", input=texts).data[0].embedding)
    np.testing.assert_allclose(base, doc, atol=1e-6)  # documents stay in base space for a query adapter
    assert not np.allclose(a[0], base, atol=1e-3)


def test_openai_errors_are_openai_shaped(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-anything", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="available"):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length=False"):
        client.embeddings.create(model="base", input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="dimensions=64 is not supported"):
        client.embeddings.create(model="base", input="x", dimensions=64)
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "nope", "input": "x"})
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    ids = [m.id for m in client.models.list().data]
    assert ids == ["active", "base", "both-linear", "q-linear"]


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"input": []}, 400, "input is empty"),
        ({"input": "  "}, 400, "input[0] is empty"),
        ({"input": ["x"] * 257}, 413, "257 inputs > maximum allowed 256"),
        ({"input": "x" * 70_000}, 413, "70000 characters > maximum allowed 65536"),
        ({"input": "x", "surprise": 1}, 400, "surprise"),
        ({"input": 5}, 400, "input"),
        ({"input": "x", "input_type": "passage"}, 400, "input_type"),
        ({"input": "x", "adapter": "nope"}, 404, "unknown adapter 'nope'"),
    ],
)
def test_bad_input_is_a_clear_4xx(server, body, status, message):
    r = httpx.post(f"{server}/embed", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_malformed_json_and_unknown_routes(server):
    r = httpx.post(f"{server}/embed", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert httpx.get(f"{server}/nothing-here").status_code == 404


def test_adapters_listing(server):
    body = httpx.get(f"{server}/adapters").json()
    assert body["active"] == "q-linear@1"
    assert {a["name"]: a["active"] for a in body["adapters"]} == {"both-linear": False, "q-linear": True}


def test_openapi_spec_has_not_drifted():
    from embedlift.service.cli import spec_bytes

    committed = (REPO / "openapi" / "openapi.json").read_bytes()
    assert spec_bytes() == committed, "openapi/openapi.json is stale: run `embedlift openapi --out openapi/openapi.json`"
