"""The service: the engine without HTTP, then a real `embedlift serve` on 127.0.0.1 (API keys on) driven by
httpx and the real openai SDK."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import shutil
import tarfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from embedlift.models.cache import EmbeddingCache
from embedlift.models.checkpoint import base_info, load_checkpoint
from embedlift.models.errors import NotFoundError, OverloadedError
from embedlift.models.windows import embed_documents
from embedlift.service.collections import CollectionManager
from embedlift.service.engine import Engine
from embedlift.service.registry import AdapterRegistry, RegistryFile
from embedlift.service.schemas import Document
from embedlift.service.settings import Settings

from tests.helpers import (
    HASHING,
    REPO,
    make_adapter,
    run_cli,
    start_server,
    stop_server,
)

LONG = " ".join(["Lyft's revenue depends on the number of riders and drivers on its platform."] * 60)
READ_KEY, ADMIN_KEY = "read-key", "admin-key"
run = asyncio.run
READ = {"Authorization": f"Bearer {READ_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DOCS = [
    {"id": f"d{i}", "text": text, "metadata": {"section": "risk" if i % 2 else "financials"}}
    for i, text in enumerate(
        [
            "Revenue grew 36% year over year as rides recovered.",
            "Drivers may be reclassified as employees, which would raise costs.",
            "Active riders reached 18.7 million in the fourth quarter.",
            "Insurance reserves may prove inadequate for claims.",
            "Bikes and scooters operate in several cities.",
            "Autonomous vehicle efforts were sold to Toyota's Woven Planet.",
            LONG,
        ]
    )
]


@pytest.fixture(scope="module")
def adapters_dir(minilm, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("adapters")
    make_adapter(minilm, d / "q-linear")
    make_adapter(minilm, d / "both-linear", apply_to="both", seed=1)
    return d


# ------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def engine(minilm, adapters_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    registry = AdapterRegistry(adapters_dir, RegistryFile(root / "registry.json"), base_info(minilm))
    collections = CollectionManager(root / "collections", minilm.fingerprint, minilm.dim, minilm.spec)
    collections.load_all()
    engine = Engine(minilm, registry, collections, Settings(data_dir=root), bulk_cache=EmbeddingCache(root / "c.sqlite3"))
    registry.load("q-linear")
    return engine


def test_engine_applies_the_adapter_to_queries_only(engine, minilm, adapters_dir):
    ckpt = load_checkpoint(adapters_dir / "q-linear")
    base = minilm.encode(["net revenue"], "query")
    q = run(engine.embed(["net revenue"], "query"))
    assert q.adapter == "q-linear@1"
    np.testing.assert_allclose(q.vectors, ckpt.adapter.transform(base), atol=1e-5)
    d = run(engine.embed(["net revenue"], "document"))
    np.testing.assert_allclose(d.vectors, base, atol=1e-6)  # apply_to=query: documents stay in base space
    both = run(engine.embed(["net revenue"], "document", "both-linear"))
    np.testing.assert_allclose(both.vectors, load_checkpoint(adapters_dir / "both-linear").adapter.transform(base), atol=1e-5)
    assert run(engine.embed(["net revenue"], "query", "base")).adapter == "base"


def test_engine_pools_long_inputs_unless_truncation_is_asked(engine, minilm):
    pooled = run(engine.embed([LONG, "short"], "query", "base"))
    assert pooled.windows[0] > 1 and pooled.windows[1] == 1
    first = run(engine.embed([LONG], "query", "base", truncate=True))
    assert first.windows == [1]
    assert not np.allclose(pooled.vectors[0], first.vectors[0])
    every = run(engine.embed([LONG], "query", "base", return_windows=True))
    spans, vectors = every.window_vectors[0]
    assert len(spans) == pooled.windows[0] and spans[0][0] == 0 and spans[-1][1] == len(LONG)
    np.testing.assert_allclose(vectors, minilm.encode([LONG[a:b] for a, b in spans], "query"), atol=1e-5)


def test_engine_unknown_adapter_lists_names(engine):
    with pytest.raises(NotFoundError, match=r"available: \['base', 'both-linear', 'q-linear'\]"):
        run(engine.embed(["x"], "query", "nope"))


def test_engine_search_with_a_both_adapter_uses_its_document_view(engine, minilm, adapters_dir):
    """An apply_to=both adapter searches documents mapped by its document transform from the stored base
    vectors: the same ranking as embedding everything through the adapter by hand."""
    run(engine.create_collection("view-test"))
    run(engine.upsert("view-test", [Document(**d) for d in DOCS]))
    adapter = load_checkpoint(adapters_dir / "both-linear").adapter
    result = run(engine.search("view-test", ["who bought the self-driving unit?"], 3, "both-linear", mode="dense"))
    docs = embed_documents(minilm, [d["text"] for d in DOCS])
    q = adapter.transform_query(minilm.encode(["who bought the self-driving unit?"], "query"))
    scores = adapter.transform_document(docs.vectors) @ q[0]
    best = {DOCS[o]["id"]: max(s for s, oo in zip(scores, docs.owner) if oo == o) for o in range(len(DOCS))}
    assert [h.id for h in result.results[0].hits] == sorted(best, key=lambda d: -best[d])[:3]
    assert result.adapter == "both-linear@1"


def test_overload_is_a_429_with_retry_after(engine):
    """Past max_concurrent requests in progress, the next is refused at once (never queued without bound)."""
    from embedlift.service.http import create_app
    from litestar.testing import TestClient

    engine.admission.limit = 1
    with engine.admission, pytest.raises(OverloadedError, match="maximum 1"), engine.admission:
        pass
    try:
        with TestClient(create_app(engine.settings, engine)) as client, engine.admission:
            r = client.post("/embed", json={"input": "x"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1" and "maximum 1" in r.json()["detail"]
    finally:
        engine.admission.limit = engine.settings.max_concurrent


# ------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def server(adapters_dir, tmp_path_factory):
    """`embedlift serve` with API keys, on a free loopback port; stopped by SIGTERM, which must exit 0."""
    proc, url = start_server(
        tmp_path_factory.mktemp("serve-data"), adapters_dir, "--api-key", READ_KEY, "--admin-key", ADMIN_KEY,
        "--watch-interval", "0.2", env={"EMBEDLIFT_ADAPTER": "q-linear"},
    )
    yield url
    assert stop_server(proc) == 0


def test_health_ready_and_metrics_are_public(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/ready").status_code == 200
    assert httpx.get(f"{server}/schema/openapi.json").status_code == 200


def test_auth_read_and_admin_keys(server):
    assert httpx.post(f"{server}/embed", json={"input": "x"}).status_code == 401
    assert httpx.post(f"{server}/embed", json={"input": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert httpx.post(f"{server}/embed", json={"input": "x"}, headers=READ).status_code == 200
    assert httpx.post(f"{server}/embed", json={"input": "x"}, headers=ADMIN).status_code == 200  # admin may read
    r = httpx.put(f"{server}/collections/nope", headers=READ)
    assert r.status_code == 403 and "admin key" in r.json()["detail"]
    assert httpx.post(f"{server}/adapters/rollback", headers=READ).status_code == 403
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="base", input="x")


def test_embed_float_and_base64_agree(server, minilm, adapters_dir):
    r = httpx.post(f"{server}/embed", json={"input": ["net revenue", "active riders"]}, headers=READ)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "q-linear@1" and r.headers["x-embedlift-adapter"] == "q-linear@1"
    assert body["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert body["usage"]["prompt_tokens"] > 0
    floats = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    expected = load_checkpoint(adapters_dir / "q-linear").adapter.transform(minilm.encode(["net revenue", "active riders"], "query"))
    np.testing.assert_allclose(floats, expected, atol=1e-5)
    b = httpx.post(f"{server}/embed", json={"input": "net revenue", "encoding_format": "base64"}, headers=READ).json()
    decoded = np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats[0], atol=1e-6)


def test_embed_long_input_windows(server):
    r = httpx.post(f"{server}/embed", json={"input": [LONG, "short"], "input_type": "document", "return_windows": True}, headers=READ)
    counts = [int(c) for c in r.headers["x-embedlift-windows"].split(",")]
    assert counts[0] > 1 and counts[1] == 1
    data = r.json()["data"]
    assert len(data[0]["windows"]) == counts[0] and len(data[1]["windows"]) == 1
    assert data[0]["windows"][-1]["span"][1] == len(LONG)


def test_openai_sdk_base64_and_float_match_embed(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=READ_KEY)
    texts = ["How many riders did Lyft have?", "What are the risk factors?"]
    default = client.embeddings.create(model="active", input=texts)  # the SDK asks for base64
    floats = client.embeddings.create(model="active", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    native = np.array([d["embedding"] for d in httpx.post(f"{server}/embed", json={"input": texts}, headers=READ).json()["data"]])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, native, atol=1e-6)
    assert default.usage.total_tokens > 0
    base = np.array(client.embeddings.create(model="base", input=texts).data[0].embedding)
    doc = np.array(client.embeddings.create(model="q-linear:document", input=texts).data[0].embedding)
    np.testing.assert_allclose(base, doc, atol=1e-6)  # documents stay in base space for a query adapter
    assert not np.allclose(a[0], base, atol=1e-3)


def test_openai_errors_are_openai_shaped(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=READ_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="available"):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError, match=r"input\[1\]\[2\] = 100256 is not a token id of cl100k_base"):
        client.embeddings.create(model="base", input=[[1, 2, 3], [4, 5, 100256]])  # 100256: a hole in the vocabulary
    with pytest.raises(openai.BadRequestError, match="not a mix"):
        client.embeddings.create(model="base", input=["text", 5])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match="dimensions=64 is not supported"):
        client.embeddings.create(model="base", input="x", dimensions=64)
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "nope", "input": "x"}, headers=READ)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert [m.id for m in client.models.list().data] == ["active", "base", "both-linear", "q-linear"]


@pytest.mark.parametrize(
    "path,body,status,message",
    [
        ("/embed", {"input": []}, 400, "input is empty"),
        ("/embed", {"input": "  "}, 400, "input[0] is empty"),
        ("/embed", {"input": ["x"] * 2049}, 413, "2049 inputs > maximum allowed 2048"),
        ("/embed", {"input": "x" * 70_000}, 413, "70000 characters > maximum allowed 65536"),
        ("/embed", {"input": "x", "surprise": 1}, 400, "surprise"),
        ("/embed", {"input": 5}, 400, "input"),
        ("/embed", {"input": "x", "input_type": "passage"}, 400, "input_type"),
        ("/embed", {"input": "x", "adapter": "nope"}, 404, "unknown adapter 'nope'"),
        ("/collections/nope/search", {"query": "x"}, 404, "unknown collection 'nope'"),
        ("/collections/docs/search", {"query": "x", "k": 1001}, 413, "k=1001 > maximum allowed 1000"),
        ("/collections/docs/search", {"query": "x", "queries": ["y"]}, 400, "exactly one of"),
        ("/collections/docs/search", {"query": "x", "k": 0}, 400, "k"),
        ("/eval", {"collection": "docs"}, 400, "queries"),
        ("/eval", {"dataset": {"queries": {"q": "x"}, "corpus": {"a": "y"}, "relevant_docs": {"q": ["zz"]}}}, 400, "zz"),
        ("/eval", {"collection": "docs", "queries": {"q": "x"}, "relevant_docs": {"q": ["nope"]}}, 404, "nope"),
    ],
)
def test_bad_input_is_a_clear_4xx(server, path, body, status, message):
    httpx.put(f"{server}/collections/docs", headers=ADMIN)
    r = httpx.post(f"{server}{path}", json=body, headers=ADMIN)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_malformed_json_and_unknown_routes(server):
    r = httpx.post(f"{server}/embed", content=b"{nope", headers={"content-type": "application/json", **READ})
    assert r.status_code == 400
    assert httpx.get(f"{server}/nothing-here", headers=READ).status_code == 404


def keep_alive_answers(url: str, idle: float) -> bool:
    """One request, ``idle`` seconds of silence, then a second request on the same socket: whether it answered."""
    parts = httpx.URL(url)
    conn = http.client.HTTPConnection(parts.host, parts.port, timeout=10)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        sock = conn.sock
        time.sleep(idle)
        try:
            conn.request("GET", "/health")
            answered = conn.getresponse().status == 200
        except (http.client.HTTPException, ConnectionError):
            return False
        return answered and conn.sock is sock  # not a reconnect
    finally:
        conn.close()


@pytest.mark.slow
def test_idle_connections_outlive_client_pools_and_proxies(server, tmp_path):
    """httpx (and so the openai SDK) reuses a connection idle up to 5 s, nginx and AWS load balancers up to 60 s:
    the server keeps one longer (75 s), so a request never meets a connection the server is just closing (under
    load that race failed a request now and then with uvicorn's own 5 s). ``--keep-alive-timeout`` sets it."""
    assert keep_alive_answers(server, idle=6)
    proc, url = start_server(tmp_path / "data", tmp_path / "adapters", "--base", HASHING, "--keep-alive-timeout", "1",
                             "--watch-interval", "0")
    try:
        assert keep_alive_answers(url, idle=0.2)
        assert not keep_alive_answers(url, idle=2.5)
    finally:
        assert stop_server(proc) == 0


def test_collections_upsert_search_get_delete(server):
    assert httpx.put(f"{server}/collections/kb", headers=ADMIN).status_code == 201
    assert httpx.put(f"{server}/collections/kb", headers=ADMIN).status_code == 200  # idempotent
    r = httpx.post(f"{server}/collections/kb/documents", json={"documents": DOCS}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["upserted"] == len(DOCS) and r.json()["windowed"] == 1
    r = httpx.post(f"{server}/collections/kb/search", json={"query": "How many riders were active?", "k": 3}, headers=READ)
    body = r.json()
    assert r.status_code == 200 and body["adapter"] == "q-linear@1" and body["hits"][0]["id"] == "d2"
    assert [h["score"] for h in body["hits"]] == sorted((h["score"] for h in body["hits"]), reverse=True)
    r = httpx.post(
        f"{server}/collections/kb/search",
        json={"queries": ["insurance claims", "driver classification"], "k": 2, "filter": {"section": "risk"}, "adapter": "base"},
        headers=READ,
    )
    results = r.json()["results"]
    assert [res["hits"][0]["id"] for res in results] == ["d3", "d1"]
    assert all(h["metadata"]["section"] == "risk" for res in results for h in res["hits"])
    long_hit = httpx.post(f"{server}/collections/kb/search", json={"query": "Lyft's revenue depends on riders and drivers on its platform", "k": 1, "adapter": "base"}, headers=READ).json()["hits"][0]
    assert long_hit["id"] == "d6" and long_hit["span"][1] - long_hit["span"][0] < len(LONG)
    # hybrid on the real model (the default mode): a lexical match the dense side ranks lower comes up
    woven = httpx.post(f"{server}/collections/kb/search", json={"query": "Woven Planet", "k": 3, "adapter": "base"}, headers=READ).json()
    assert woven["mode_used"] == "hybrid" and woven["hits"][0]["id"] == "d5" and woven["hits"][0]["scores"]["lexical"] > 0
    assert httpx.get(f"{server}/collections/kb/documents/d3", headers=READ).json()["metadata"] == {"section": "risk"}
    assert httpx.get(f"{server}/collections/kb/documents/zz", headers=READ).status_code == 404
    r = httpx.post(f"{server}/collections/kb/documents/delete", json={"ids": ["d3", "zz"]}, headers=ADMIN)
    assert r.json() == {"deleted": 1, "missing": ["zz"]}
    info = httpx.get(f"{server}/collections/kb", headers=READ).json()
    assert info["documents"] == len(DOCS) - 1 and info["status"] == "ready"
    assert "kb" in [c["name"] for c in httpx.get(f"{server}/collections", headers=READ).json()["collections"]]


def test_openai_sdk_generic_calls_reach_embedlift_routes(server):
    """The README's promise: the openai SDK's generic get/post (same Bearer header) call every route group."""
    api = openai.OpenAI(base_url=server, api_key=ADMIN_KEY, max_retries=0)
    api.put("/collections/sdk", cast_to=object)
    api.post("/collections/sdk/documents", body={"documents": DOCS[:3]}, cast_to=object)
    found = api.post("/collections/sdk/search", body={"query": "How many active riders?", "k": 1, "adapter": "base"}, cast_to=object)
    assert found["hits"][0]["id"] == "d2"
    assert api.get("/adapters", cast_to=object)["active"] == "q-linear@1"


@pytest.mark.slow
def test_bulk_upsert_runs_as_a_job(server):
    httpx.put(f"{server}/collections/bulk", headers=ADMIN)
    docs = [{"id": f"b{i}", "text": f"Bulk passage number {i} about ride volumes."} for i in range(300)]
    r = httpx.post(f"{server}/collections/bulk/documents", json={"documents": docs}, headers=ADMIN, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert r.headers["location"] == f"/jobs/{job['id']}"
    deadline = time.time() + 120
    while job["status"] in ("queued", "running") and time.time() < deadline:
        time.sleep(0.2)
        job = httpx.get(f"{server}/jobs/{job['id']}", headers=READ).json()
    assert job["status"] == "succeeded" and job["done"] == job["total"] == 300
    assert job["result"]["upserted"] == 300
    assert httpx.get(f"{server}/collections/bulk", headers=READ).json()["documents"] == 300
    assert httpx.get(f"{server}/jobs/nope", headers=READ).status_code == 404


@pytest.mark.slow
def test_eval_equals_the_cli(server, lyft_slice, adapters_dir, tmp_path):
    cli = run_cli("eval", str(lyft_slice), "--adapter", str(adapters_dir / "q-linear"), "--json", "--cache", str(tmp_path / "c.sqlite3"))
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    dataset = json.loads(lyft_slice.read_text())
    r = httpx.post(f"{server}/eval", json={"dataset": dataset, "adapters": ["q-linear"], "per_query": True}, headers=READ, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["metrics"].keys() == expected.keys()
    for name in expected:
        for metric, value in expected[name].items():
            assert body["metrics"][name][metric] == pytest.approx(value, abs=1e-9), (name, metric)
    assert body["models"] == {"base": "base", "q-linear": "q-linear@1"}
    assert set(body["ranks"]["base"]) == set(dataset["queries"])
    r = httpx.post(f"{server}/eval", json={"dataset": dataset, "adapters": ["q-linear"], "background": True}, headers=READ)
    assert r.status_code == 202
    job_id = r.json()["job"]["id"]
    for _ in range(600):
        job = httpx.get(f"{server}/jobs/{job_id}", headers=READ).json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded" and job["result"]["metrics"] == body["metrics"]
    # hybrid: the lexical row and every model's +hybrid row, the same on both sides to 1e-9
    cli = run_cli("eval", str(lyft_slice), "--adapter", str(adapters_dir / "q-linear"), "--mode", "hybrid", "--json", "--cache", str(tmp_path / "c.sqlite3"))
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    assert list(expected) == ["base", "q-linear", "lexical", "base+hybrid", "q-linear+hybrid"]
    r = httpx.post(f"{server}/eval", json={"dataset": dataset, "adapters": ["q-linear"], "mode": "hybrid"}, headers=READ, timeout=300)
    assert r.status_code == 200, r.text
    hybrid = r.json()
    assert hybrid["metrics"].keys() == expected.keys() and hybrid["models"]["q-linear+hybrid"] == "q-linear@1+hybrid"
    for name in expected:
        for metric, value in expected[name].items():
            assert hybrid["metrics"][name][metric] == pytest.approx(value, abs=1e-9), (name, metric)
    assert expected["base+hybrid"]["mrr@10"] > expected["base"]["mrr@10"]  # on the Lyft slice, BM25 helps the base


def test_eval_on_a_collection(server):
    httpx.put(f"{server}/collections/kb", headers=ADMIN)
    httpx.post(f"{server}/collections/kb/documents", json={"documents": DOCS}, headers=ADMIN)
    r = httpx.post(
        f"{server}/eval",
        json={"collection": "kb", "queries": {"q1": "Who bought the autonomous vehicle unit?", "q2": "How many active riders?"},
              "relevant_docs": {"q1": ["d5"], "q2": ["d2"]}, "k": [1, 3], "adapters": ["base", "q-linear"]},
        headers=READ,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["documents"] == len(DOCS) and body["metrics"]["base"]["hit_rate@3"] == 1.0
    assert set(body["metrics"]) == {"base", "q-linear"} and "hit_rate@5" not in body["metrics"]["base"]


def tar_of(directory: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(directory, arcname=".")
    return buf.getvalue()


@pytest.mark.slow
def test_adapter_registry_over_http(server, minilm, adapters_dir, tmp_path):
    make_adapter(minilm, tmp_path / "uploaded", seed=7)
    r = httpx.post(f"{server}/adapters?name=uploaded", content=tar_of(tmp_path / "uploaded"),
                   headers={"Content-Type": "application/x-tar", **ADMIN})
    assert r.status_code == 201, r.text
    assert r.json()["label"] == "uploaded@1"
    r = httpx.post(f"{server}/adapters", json={"name": "uploaded"}, headers=ADMIN)
    assert r.json()["label"] == "uploaded@2"  # registered again: next version
    assert httpx.post(f"{server}/adapters", json={"name": "../q-linear"}, headers=ADMIN).status_code == 400
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "uploaded", damaged)
    (damaged / "model.safetensors").write_bytes(b"\x00" * 64)
    r = httpx.post(f"{server}/adapters?name=q-linear", content=tar_of(damaged), headers={"Content-Type": "application/x-tar", **ADMIN})
    assert r.status_code == 400 and "damaged" in r.json()["detail"]
    assert httpx.get(f"{server}/adapters", headers=READ).json()["active"] == "q-linear@1"  # refused: nothing changed
    assert httpx.post(f"{server}/adapters/uploaded/activate", headers=ADMIN).json() == {"active": "uploaded@2"}
    assert httpx.post(f"{server}/embed", json={"input": "x"}, headers=READ).headers["x-embedlift-adapter"] == "uploaded@2"
    assert httpx.delete(f"{server}/adapters/uploaded", headers=ADMIN).status_code == 409  # the active one
    assert httpx.post(f"{server}/adapters/rollback", headers=ADMIN).json() == {"active": "q-linear@1"}
    assert httpx.delete(f"{server}/adapters/uploaded", headers=ADMIN).status_code == 204
    assert "uploaded" not in [a["name"] for a in httpx.get(f"{server}/adapters", headers=READ).json()["adapters"]]
    # a checkpoint dropped into the watched adapters directory appears without a call
    make_adapter(minilm, adapters_dir / "dropped", seed=8)
    deadline = time.time() + 20
    while time.time() < deadline:
        if "dropped" in [a["name"] for a in httpx.get(f"{server}/adapters", headers=READ).json()["adapters"]]:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the dropped checkpoint was not registered")


@pytest.mark.slow
def test_hot_swap_under_load(server, minilm, adapters_dir):
    """Swap the active adapter every few milliseconds while clients embed and search: no request fails,
    and each response's vectors (and hits) are exactly those of the adapter@version it names."""
    text = "How fast did revenue grow?"
    httpx.put(f"{server}/collections/kb", headers=ADMIN)
    httpx.post(f"{server}/collections/kb/documents", json={"documents": DOCS}, headers=ADMIN)
    names = ["q-linear", "both-linear", "base"]
    expected_vectors, expected_hits = {}, {}
    for name in names:
        r = httpx.post(f"{server}/embed", json={"input": text, "adapter": name}, headers=READ).json()
        expected_vectors[r["adapter"]] = np.array(r["data"][0]["embedding"])
        s = httpx.post(f"{server}/collections/kb/search", json={"query": text, "k": 3, "adapter": name}, headers=READ).json()
        expected_hits[s["adapter"]] = [(h["id"], h["score"]) for h in s["hits"]]
    failures, seen, stop = [], [], threading.Event()

    def swapper():
        i = 0
        with httpx.Client(headers=ADMIN) as c:
            while not stop.is_set():
                c.post(f"{server}/adapters/{names[i % 3]}/activate").raise_for_status()
                i += 1
                time.sleep(0.003)

    def client(kind):
        with httpx.Client(headers=READ, timeout=30) as c:
            for _ in range(25):
                if kind == "embed":
                    r = c.post(f"{server}/embed", json={"input": text})
                    if r.status_code != 200:
                        failures.append(r.text)
                        continue
                    label = r.json()["adapter"]
                    if not np.allclose(r.json()["data"][0]["embedding"], expected_vectors[label], atol=1e-5):
                        failures.append(f"embed vectors differ from {label}")
                else:
                    r = c.post(f"{server}/collections/kb/search", json={"query": text, "k": 3})
                    if r.status_code != 200:
                        failures.append(r.text)
                        continue
                    label = r.json()["adapter"]
                    got = [(h["id"], h["score"]) for h in r.json()["hits"]]
                    if [g[0] for g in got] != [e[0] for e in expected_hits[label]] or not np.allclose(
                        [g[1] for g in got], [e[1] for e in expected_hits[label]], atol=1e-5
                    ):
                        failures.append(f"search hits differ from {label}")
                seen.append(label)

    swap = threading.Thread(target=swapper)
    swap.start()
    workers = [threading.Thread(target=client, args=(k,)) for k in ["embed", "search"] * 3]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    swap.join()
    assert failures == []
    assert len(seen) == 150 and len(set(seen)) >= 2  # the swaps really interleaved with the requests
    httpx.post(f"{server}/adapters/q-linear/activate", headers=ADMIN).raise_for_status()


def test_metrics(server):
    text = httpx.get(f"{server}/metrics").text  # public by default
    assert "embedlift_cache_hit_ratio" in text
    info = next(line for line in text.splitlines() if line.startswith("embedlift_base_info{"))
    assert 'device="cpu"' in info and 'runtime="torch"' in info and 'precision="fp32"' in info and info.endswith(" 1.0")
    assert 'embedlift_active_adapter_version{adapter="q-linear"}' in text
    assert "embedlift_request_inputs_bucket" in text and "embedlift_requests_total" in text


def strip_scores(hit: dict) -> dict:
    return {k: v for k, v in hit.items() if k not in ("score", "scores")}


def all_scores(result: dict) -> list[float]:
    return [s if s is not None else np.nan for h in result["hits"] for s in (h["score"], h["scores"]["dense"], h["scores"]["lexical"])]


@pytest.mark.slow
def test_restart_keeps_collections_and_the_active_adapter(hashing, tmp_path):
    """Stopped and started again (a real server, on the model-free base: the stores are what is tested), it
    serves the same collections, the same search results and the same active adapter."""
    adapters = tmp_path / "adapters"
    make_adapter(hashing, adapters / "a")
    proc, url = start_server(tmp_path / "data", adapters, "--base", HASHING, "--watch-interval", "0")
    try:
        httpx.put(f"{url}/collections/kb", json={"index": "hnsw"}).raise_for_status()
        httpx.post(f"{url}/collections/kb/documents", json={"documents": DOCS}).raise_for_status()
        httpx.post(f"{url}/collections/kb/documents/delete", json={"ids": ["d0"]}).raise_for_status()
        httpx.post(f"{url}/adapters/a/activate").raise_for_status()
        before = httpx.post(f"{url}/collections/kb/search", json={"query": "rider growth", "k": 5}).json()
    finally:
        assert stop_server(proc) == 0
    proc, url = start_server(tmp_path / "data", adapters, "--base", HASHING, "--watch-interval", "0")
    try:
        assert httpx.get(f"{url}/adapters").json()["active"] == "a@1"
        after = httpx.post(f"{url}/collections/kb/search", json={"query": "rider growth", "k": 5}).json()
        assert before["adapter"] == after["adapter"] == "a@1" and before["mode_used"] == after["mode_used"]
        assert [strip_scores(h) for h in after["hits"]] == [strip_scores(h) for h in before["hits"]]
        # The HNSW graph is rebuilt from the stored vectors at start: a score may move by a float32 ulp (the summation
        # order of a SIMD dot product; seen on an AMD EPYC), never more.
        assert np.allclose(all_scores(after), all_scores(before), rtol=0, atol=1e-6, equal_nan=True)
        assert httpx.get(f"{url}/collections/kb").json()["documents"] == len(DOCS) - 1
    finally:
        assert stop_server(proc) == 0


def test_openapi_spec_has_not_drifted():
    from embedlift.service.cli import spec_bytes

    committed = (REPO / "openapi" / "openapi.json").read_bytes()
    assert spec_bytes() == spec_bytes(), "the spec must be deterministic (no generated examples)"
    assert spec_bytes() == committed, "openapi/openapi.json is stale: run `embedlift openapi --out openapi/openapi.json`"
