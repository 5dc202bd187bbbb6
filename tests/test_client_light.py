"""The client as a RAG app installs it: ``embedlift-client`` with its two extras into a fresh virtual environment
(nothing of this one), where torch, FAISS, the model and the server's packages are absent, and the client's own
tests (``tests/client``) run there against a real server started here. Also: the client's retries carry a
request through a server that is still loading."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def light_env(tmp_path_factory) -> Path:
    """A virtual environment with ``./client[langchain,llamaindex]`` and pytest only (from the package index)."""
    env = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, f"{REPO / 'client'}[langchain,llamaindex]", "pytest"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return env


def test_client_installs_without_torch_and_passes_its_tests_there(light_env, minilm, tmp_path):
    python = str(light_env / "bin" / "python")
    absent = ("torch", "faiss", "sentence_transformers", "transformers", "embedlift.service", "embedlift.models")
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m.split('.')[0]) and u.find_spec(m)])"
    found = subprocess.run([python, "-c", probe, *absent], capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[]", f"the light environment has {found}"
    requires = subprocess.run([python, "-m", "pip", "show", "embedlift-client"], capture_output=True, text=True, check=True).stdout
    assert "Requires: httpx, msgspec" in requires, requires

    sys.path.insert(0, str(REPO / "tests" / "client"))
    try:
        from conftest import start_client_test_server  # tests/client/conftest.py: the server its tests expect
    finally:
        sys.path.pop(0)
    server, proc = start_client_test_server(minilm, tmp_path, start_server)
    try:
        ran = subprocess.run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--confcutdir", str(REPO / "tests" / "client"), str(REPO / "tests" / "client")],
            cwd=REPO, env={**os.environ, "EMBEDLIFT_TEST_SERVER": server.to_env()}, capture_output=True, text=True, timeout=600,
        )
    finally:
        assert stop_server(proc) == 0
    assert ran.returncode == 0, ran.stdout[-6000:] + ran.stderr[-2000:]
    assert " passed" in ran.stdout and "skipped" not in ran.stdout, ran.stdout[-2000:]


def test_client_retries_through_a_server_that_is_still_loading(tmp_path):
    """While the server loads it answers 503 with Retry-After: a client without retries raises
    ``ServiceUnavailableError`` saying so; one with retries gets its answer once the model is loaded."""
    from embedlift.client import Client, ServiceUnavailableError

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedlift.service.cli", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--adapters-dir", str(tmp_path / "adapters")],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with Client(url, max_retries=0) as impatient:
            deadline = time.time() + 60
            while True:  # until it listens and answers 503 while loading
                try:
                    impatient.embed("Lyft rides")
                    pytest.fail("the server answered before it had loaded; nothing was retried")
                except ServiceUnavailableError as exc:
                    assert exc.retry_after == 1 and "still loading" in exc.message
                    break
                except Exception:
                    assert time.time() < deadline
                    time.sleep(0.05)
        with Client(url, max_retries=200) as patient:
            answer = patient.embed(["Lyft rides", "Drivers are contractors"], input_type="document")
        assert len(answer.data) == 2 and len(answer.data[0].embedding) == 384
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_client_retries_429_honouring_retry_after(tmp_path):
    """A server admitting one request at a time answers the others 429 with Retry-After: a client without retries
    raises ``RateLimitError`` carrying it; with retries every request gets its answer."""
    import asyncio

    from embedlift.client import AsyncClient, RateLimitError

    proc, url = start_server(tmp_path / "data", tmp_path / "adapters", "--watch-interval", "0", env={"EMBEDLIFT_MAX_CONCURRENT": "1"})
    texts = [f"Passage {i}: " + "drivers, riders and the marketplace that connects them " * 20 for i in range(32)]

    async def burst(max_retries: int) -> list:
        async with AsyncClient(url, max_retries=max_retries) as client:
            return await asyncio.gather(*(client.embed(texts, input_type="document") for _ in range(6)), return_exceptions=True)

    try:
        refused = [r for r in asyncio.run(burst(0)) if isinstance(r, Exception)]
        assert refused and all(isinstance(r, RateLimitError) and r.retry_after == 1 and r.code == "overloaded" for r in refused), refused
        answers = asyncio.run(burst(20))
        assert all(not isinstance(a, Exception) and len(a.data) == len(texts) for a in answers), answers
    finally:
        assert stop_server(proc) == 0
