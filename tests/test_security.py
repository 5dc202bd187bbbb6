"""Security: every route behind its scope (found by walking the route table, so a new route cannot be left
open by mistake), keys never in logs or reprs, no pickle anywhere, CORS off unless configured, body limits.

The route walk and the limits run against the app in process (the model-free base: the model is not what is
tested); the log check runs a real `embedlift serve` with uvicorn's access log on."""

from __future__ import annotations

import re

import httpx
import pytest
from embedlift.models.spec import BaseSpec
from embedlift.service.http import create_app
from embedlift.service.settings import Settings

from tests.helpers import (
    HASHING,
    REPO,
    app_client,
    make_adapter,
    start_server,
    stop_server,
)

READ_KEY, ADMIN_KEY = "sec-read-3f9c1a", "sec-admin-77d2e0"
# Routes anyone may call: liveness, readiness, the spec and its page, metrics (public by default).
PUBLIC = {"/health", "/ready", "/metrics"}
PUBLIC_PREFIXES = ("/schema", "/ui")  # the playground's static files (it calls the API with the user's keys)


@pytest.fixture(scope="module")
def secured(hashing, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("sec-adapters")
    make_adapter(hashing, adapters / "a")
    with app_client(tmp_path_factory.mktemp("sec-data"), adapters, api_key=READ_KEY, admin_key=ADMIN_KEY) as client:
        yield client


def operations() -> list[tuple[str, str, str]]:
    """(method, path, scope) for every route handler of the app as built, with its path parameters filled."""
    app = create_app(Settings())
    found = []
    for route in app.routes:
        for method, handler in getattr(route, "route_handler_map", {}).items():
            if method in ("OPTIONS", "HEAD"):
                continue
            handler = handler[0] if isinstance(handler, tuple) else handler
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            found.append((method, path, handler.opt.get("auth", "public")))
    return found


def test_every_route_needs_its_key(secured):
    ops = operations()
    assert len(ops) >= 20  # the walk saw the whole table
    for method, path, scope in ops:
        public = path in PUBLIC or path.startswith(PUBLIC_PREFIXES) or path == "/"
        if scope == "public" or scope == "metrics":
            assert public, f"{method} {path} has no auth scope: give it opt=READ or opt=ADMIN"
            continue
        assert scope in ("read", "admin"), f"{method} {path}: unknown scope {scope!r}"
        anonymous = secured.request(method, path, json={})
        assert anonymous.status_code == 401, f"{method} {path} answered {anonymous.status_code} without a key"
        wrong = secured.request(method, path, json={}, headers={"Authorization": "Bearer not-a-key"})
        assert wrong.status_code == 403, f"{method} {path} answered {wrong.status_code} to a wrong key"
        as_reader = secured.request(method, path, json={}, headers={"Authorization": f"Bearer {READ_KEY}"})
        if scope == "admin":
            assert as_reader.status_code == 403, f"{method} {path} let the read key through"
        else:
            assert as_reader.status_code not in (401, 403), f"{method} {path} refused the read key"


def test_cors_is_off_unless_configured(secured, tmp_path):
    origin = {"Origin": "https://evil.example"}
    r = secured.get("/health", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    assert "access-control-allow-origin" not in secured.options("/embed", headers=preflight).headers

    from litestar.testing import TestClient

    settings = Settings(cors_origins="https://rag.example", data_dir=tmp_path, base=BaseSpec(model=HASHING))
    with TestClient(create_app(settings)) as client:
        ok = client.options("/embed", headers={**preflight, "Origin": "https://rag.example"})
        assert ok.headers["access-control-allow-origin"] == "https://rag.example"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-origin" not in client.get("/health", headers=origin).headers


def test_oversized_bodies_are_refused_before_parsing(secured):
    big = b'{"input": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    r = secured.post("/embed", content=big, headers={"Authorization": f"Bearer {READ_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413


def test_keys_never_reach_logs_or_reprs(hashing, tmp_path):
    """A server with the access log on, called with the right key, a near miss and a read key on an admin
    route: after it stops, neither key appears anywhere in what it printed."""
    make_adapter(hashing, tmp_path / "adapters" / "a")
    proc, url = start_server(
        tmp_path / "data", tmp_path / "adapters", "--base", HASHING, "--access-log", "--watch-interval", "0",
        env={"EMBEDLIFT_API_KEY": READ_KEY, "EMBEDLIFT_ADMIN_KEY": ADMIN_KEY},
    )
    read = {"Authorization": f"Bearer {READ_KEY}"}
    try:
        assert httpx.post(f"{url}/embed", json={"input": "x"}, headers=read).status_code == 200
        assert httpx.post(f"{url}/embed", json={"input": "x"}, headers={"Authorization": f"Bearer {ADMIN_KEY}x"}).status_code == 403
        assert httpx.put(f"{url}/collections/c", headers=read).status_code == 403
        assert httpx.post(f"{url}/adapters", json={"name": "../a"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 400
    finally:
        assert stop_server(proc) == 0
    log = proc.stdout.read()
    assert "POST /embed" in log  # the access log was on
    assert READ_KEY not in log and ADMIN_KEY not in log
    settings = Settings(api_key=READ_KEY, admin_key=ADMIN_KEY, openai_api_key="sk-secret")
    assert READ_KEY not in repr(settings) and ADMIN_KEY not in repr(settings) and "sk-secret" not in repr(settings)


def test_no_pickle_is_loaded_anywhere():
    """Weights are safetensors, configs JSON, vectors SQLite blobs: nothing executes code when read. The one
    torch pickle read (a LlamaIndex checkpoint being imported) goes through ``weights_only=True``."""
    risky = re.compile(
        r"^\s*(import|from)\s+(pickle|cPickle|joblib|dill|cloudpickle)\b|pickle\.loads?\(|joblib\.load\(|torch\.load\(|allow_pickle\s*=\s*True"
    )
    for folder in ("models", "training", "service"):
        for path in (REPO / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                tensors_only = "torch.load(" in code and "weights_only=True" in code  # LlamaIndex import: tensors only
                if risky.search(code) and not tensors_only:
                    pytest.fail(f"{path.relative_to(REPO)}:{n} may load pickle: {line.strip()}")
