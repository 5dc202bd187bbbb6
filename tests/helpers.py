"""Helpers shared by test modules (fixtures live in conftest.py).

Three tiers, as the README's Tests section says: the engine and stores in process; the HTTP layer in process
(``app_client``: Litestar's ``TestClient`` over the real app, usually on the model-free hashing base); and real
``embedlift serve`` processes on loopback (``start_server``) for what only a real server shows (SIGTERM and
SIGKILL, the access log, the real model end to end). ``run_cli`` runs the real CLI entry point in this process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from embedlift.models.adapters import AdapterConfig, build_adapter
from embedlift.models.checkpoint import base_info, save_checkpoint
from embedlift.models.encoders import Encoder

REPO = Path(__file__).resolve().parents[1]
#: The model-free base (hashed character n-grams) for tests where the model is not the subject.
HASHING = "hashing:64"


def make_adapter(encoder: Encoder, out: Path, apply_to: str = "query", seed: int = 0) -> Path:
    """A real checkpoint for ``encoder``'s base, with weights moved off the identity."""
    torch.manual_seed(seed)
    adapter = build_adapter(AdapterConfig(kind="linear", dim=encoder.dim, apply_to=apply_to))  # type: ignore[arg-type]
    with torch.no_grad():
        adapter.linear.weight.add_(0.05 * torch.randn_like(adapter.linear.weight))
    save_checkpoint(adapter, out, base=base_info(encoder))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, adapters_dir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    """`embedlift serve` as a user starts it, on a free loopback port; returns (process, url) once /ready."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedlift.service.cli", "serve", "--port", str(port),
         "--data-dir", str(data_dir), "--adapters-dir", str(adapters_dir), *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not become ready in {timeout} s")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (what a container runtime sends) and the exit code after the drain."""
    proc.terminate()
    return proc.wait(timeout=30)


@contextlib.contextmanager
def app_client(data_dir: Path, adapters_dir: Path, *, base: str | Any = HASHING, headers: dict[str, str] | None = None,
               **settings: Any) -> Iterator[Any]:
    """The real app (``create_app``: lifespan, engine loading from its settings, guards, error handler) in this
    process behind Litestar's ``TestClient`` (an ``httpx.Client``), ready to serve. ``base``: a model name or a
    whole ``BaseSpec``."""
    from embedlift.models.spec import BaseSpec
    from embedlift.service.http import create_app
    from embedlift.service.settings import Settings
    from litestar.testing import TestClient

    spec = base if isinstance(base, BaseSpec) else BaseSpec(model=base)
    config = Settings(base=spec, data_dir=data_dir, adapters_dir=adapters_dir, **{"watch_interval": 0, **settings})
    with TestClient(create_app(config), timeout=60) as client:
        client.headers.update(headers or {})
        deadline = time.time() + 60
        while (ready := client.get("/ready")).status_code == 503 and "loading" in ready.text and time.time() < deadline:
            time.sleep(0.02)
        yield client


@dataclass
class Ran:
    """What a command printed and returned (the shape of ``subprocess.CompletedProcess``)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, env: dict[str, str] | None = None) -> Ran:
    """``embedlift ARGS`` through the real entry point (``cli.main``: argument parsing, the library, the one-line
    errors), in this process: no interpreter start and imports per call. ``env`` is set for the call only."""
    from embedlift.service.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    warnings = logging.StreamHandler(err)  # a process's warnings reach stderr (logging's last resort)
    warnings.setLevel(logging.WARNING)
    logging.getLogger().addHandler(warnings)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse
                code = int(exc.code or 0)
    finally:
        logging.getLogger().removeHandler(warnings)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Ran(code, out.getvalue(), err.getvalue())
