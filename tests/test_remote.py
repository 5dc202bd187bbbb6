"""A remote base over the OpenAI embeddings protocol, through the real openai SDK.

The remote is a real HTTP server on 127.0.0.1: embedlift's own `/v1/embeddings` serving the packaged MiniLM
(behaviour as a real server), and a small scripted server speaking the same protocol for what a real server
will not show on demand (429 with Retry-After, 500s, a slow answer, a wrong key, an unknown model).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from embedlift.models.cache import CachedEncoder, EmbeddingCache
from embedlift.models.checkpoint import load_checkpoint
from embedlift.models.errors import RemoteError
from embedlift.models.remote import OpenAIEncoder, normalize_base_url, plan_char_windows

from tests.helpers import Ran, run_cli, start_server, stop_server


# ------------------------------------------------------------------------------- embedlift as the remote
def remote_calls(url: str) -> float:
    """How many /v1/embeddings requests the remote has answered (from its Prometheus metrics)."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(m) for m in re.findall(r'embedlift_requests_total\{[^}]*path="/v1/embeddings"[^}]*\} ([0-9.e+]+)', text))


@pytest.mark.slow
def test_remote_vectors_equal_the_local_model(remote, minilm):
    enc = OpenAIEncoder("base", base_url=f"{remote}/v1", api_key="unused")
    texts = ["How many riders did Lyft have?", "Revenue grew in 2021."]
    np.testing.assert_allclose(enc.encode(texts, "query"), minilm.encode(texts, "query"), atol=1e-5)
    assert enc.dim == 384 and enc.name == "openai:base"


def test_fingerprint_names_the_server_model_and_dimensions():
    a = OpenAIEncoder("base", base_url="http://127.0.0.1:1/v1/", api_key="k")
    b = OpenAIEncoder("base", base_url="HTTP://127.0.0.1:1/v1", api_key="other key")
    c = OpenAIEncoder("base", base_url="http://127.0.0.1:2/v1", api_key="k")
    d = OpenAIEncoder("base", base_url="http://127.0.0.1:1/v1", api_key="k", dimensions=64)
    assert a.fingerprint == b.fingerprint  # same server, the key is not part of it
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3
    assert "other key" not in json.dumps(b.describe()) + b.fingerprint  # a key is never recorded
    assert b.describe()["base_url"] == "http://127.0.0.1:1/v1"
    assert normalize_base_url("https://API.openai.com:443/v1/") == "https://api.openai.com/v1"


def test_character_windows_cover_the_text_within_budget():
    text = " ".join(f"word{i}" for i in range(3000))
    spans = plan_char_windows(text, 1000, 750)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(b - a <= 1000 for a, b in spans)
    assert all(nxt[0] <= cur[1] for cur, nxt in zip(spans, spans[1:]))  # overlapping or touching: nothing lost
    enc = OpenAIEncoder("m", base_url="http://127.0.0.1:1/v1", api_key="k", max_input_tokens=500)
    assert len(enc.split([text], "document")[0]) > 1 and enc.split(["short"], "query") == [[(0, 5)]]


@pytest.mark.slow
def test_train_eval_serve_on_a_remote_base_and_a_second_run_pays_nothing(remote, lyft_slice, minilm, tmp_path):
    cache = tmp_path / "cache.sqlite3"
    base = ["--base", "openai:base", "--base-url", f"{remote}/v1", "--cache", str(cache)]
    def env_run(*args: str) -> Ran:
        return run_cli(*args, env={"OPENAI_API_KEY": "unused"})

    first = env_run("train", str(lyft_slice), "--kind", "linear", "--epochs", "3", "--out", str(tmp_path / "a1"), *base)
    assert first.returncode == 0, first.stderr
    calls = remote_calls(remote)
    second = env_run("train", str(lyft_slice), "--kind", "linear", "--epochs", "3", "--out", str(tmp_path / "a2"), *base)
    assert second.returncode == 0, second.stderr
    assert " 0 computed" in second.stderr and remote_calls(remote) == calls  # every text came from the cache
    ckpt = load_checkpoint(tmp_path / "a2")
    assert ckpt.config.base.name == "openai:base" and ckpt.config.base.details["base_url"] == f"{remote}/v1"
    # eval without --base uses the base recorded in the adapter (URL included), still without remote calls
    ev = env_run("eval", str(lyft_slice), "--adapter", str(tmp_path / "a2"), "--json", "--cache", str(cache))
    assert ev.returncode == 0, ev.stderr
    assert set(json.loads(ev.stdout)) == {"base", "a2"} and remote_calls(remote) == calls
    # serve over the remote base: cache misses go to the remote, the adapter is applied here
    (tmp_path / "adapters").mkdir()
    (tmp_path / "a2").rename(tmp_path / "adapters" / "a2")
    proc, url = start_server(tmp_path / "data", tmp_path / "adapters", "--base", "openai:base", "--base-url", f"{remote}/v1",
                             "--adapter", "a2", env={"OPENAI_API_KEY": "unused"})
    try:
        r = httpx.post(f"{url}/embed", json={"input": "Who are Lyft's competitors?"})
        assert r.status_code == 200 and r.json()["adapter"] == "a2@1" and r.json()["model"] == "openai:base"
        expected = ckpt.adapter.transform(minilm.encode(["Who are Lyft's competitors?"], "query"))
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected[0], atol=1e-5)
    finally:
        assert stop_server(proc) == 0


# ------------------------------------------------------------------------- a scripted protocol server
class Scripted(ThreadingHTTPServer):
    """Answers POST /v1/embeddings like OpenAI, or with the next scripted failure."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list[tuple[int, dict, dict]] = []  # (status, headers, body) to answer before succeeding
        self.key = "good-key"
        self.delay = 0.0
        self.times: list[float] = []
        self.batches: list[int] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with s.lock:
            s.times.append(time.monotonic())
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
        try:
            if s.delay:
                time.sleep(s.delay)
            if self.headers.get("authorization") != f"Bearer {s.key}":
                return self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}})
            if body["model"] != "tiny":
                return self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist", "type": "invalid_request_error", "code": "model_not_found"}})
            with s.lock:
                step = s.script.pop(0) if s.script else None
            if step is not None:
                return self._send(step[0], step[2], step[1])
            s.batches.append(len(body["input"]))
            data = [{"object": "embedding", "index": i, "embedding": vector(t).tolist()} for i, t in enumerate(body["input"])]
            self._send(200, {"object": "list", "data": data, "model": "tiny", "usage": {"prompt_tokens": 1, "total_tokens": 1}})
        finally:
            with s.lock:
                s.in_flight -= 1


def vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).normal(size=8)


@pytest.fixture
def scripted():
    server = Scripted()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_batches_and_bounded_concurrency(scripted):
    scripted.delay = 0.05
    enc = OpenAIEncoder("tiny", base_url=scripted.url, api_key="good-key", max_batch=100, max_concurrency=3, progress=False)
    texts = [f"text {i}" for i in range(1000)]
    out = enc.encode(texts, "document")
    assert out.shape == (1000, 8) and sorted(scripted.batches) == [100] * 10
    assert 1 < scripted.max_in_flight <= 3
    expected = np.stack([vector(t) for t in texts])
    np.testing.assert_allclose(out, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)


def test_retry_after_is_honoured(scripted):
    scripted.script = [(429, {"retry-after": "1"}, {"error": {"message": "Rate limit reached", "type": "requests"}})]
    enc = OpenAIEncoder("tiny", base_url=scripted.url, api_key="good-key")
    enc.encode(["x"], "query")
    assert len(scripted.times) == 2 and scripted.times[1] - scripted.times[0] >= 0.95


def test_server_errors_are_retried(scripted):
    scripted.script = [(500, {}, {"error": {"message": "boom"}}), (503, {}, {"error": {"message": "busy"}})]
    enc = OpenAIEncoder("tiny", base_url=scripted.url, api_key="good-key", max_retries=3)
    assert enc.encode(["x"], "query").shape == (1, 8) and len(scripted.times) == 3


def test_persistent_failure_is_a_clear_error_not_a_hang(scripted):
    scripted.script = [(500, {}, {"error": {"message": "boom"}})] * 10
    enc = OpenAIEncoder("tiny", base_url=scripted.url, api_key="good-key", max_retries=1)
    with pytest.raises(RemoteError, match=r"failed after retries \(500\): boom"):
        enc.encode(["x"], "query")
    assert len(scripted.times) == 2


def test_wrong_key_and_unknown_model_fail_at_once(scripted):
    with pytest.raises(RemoteError, match="refused the API key"):
        OpenAIEncoder("tiny", base_url=scripted.url, api_key="bad-key").encode(["x"], "query")
    with pytest.raises(RemoteError, match="has no model 'nope'"):
        OpenAIEncoder("nope", base_url=scripted.url, api_key="good-key").encode(["x"], "query")
    assert len(scripted.times) == 2  # no retries of 401/404


def test_slow_remote_times_out_with_a_clear_error(scripted):
    scripted.delay = 2.0
    enc = OpenAIEncoder("tiny", base_url=scripted.url, api_key="good-key", timeout=0.3, max_retries=1)
    with pytest.raises(RemoteError, match="cannot reach"):
        enc.encode(["x"], "query")


def test_cache_makes_each_text_one_call(scripted, tmp_path):
    enc = OpenAIEncoder("tiny", base_url=scripted.url, api_key="good-key")
    cached = CachedEncoder(enc, EmbeddingCache(tmp_path / "c.sqlite3"), progress=False)
    cached.encode(["a", "b", "a"], "query")
    n = len(scripted.times)
    again = CachedEncoder(OpenAIEncoder("tiny", base_url=scripted.url, api_key="good-key"), EmbeddingCache(tmp_path / "c.sqlite3"), progress=False)
    assert again.dim == 8  # known from the cache: no probe call
    again.encode(["b", "a"], "query")
    assert len(scripted.times) == n == 1 and again.stats.computed == 0
