"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from embedlift.models.adapters import AdapterConfig, build_adapter
from embedlift.models.checkpoint import base_info, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def make_adapter(minilm, out: Path, apply_to: str = "query", seed: int = 0) -> Path:
    """A real checkpoint for the real base, with weights moved off the identity."""
    torch.manual_seed(seed)
    adapter = build_adapter(AdapterConfig(kind="linear", dim=minilm.dim, apply_to=apply_to))
    with torch.no_grad():
        adapter.linear.weight.add_(0.05 * torch.randn_like(adapter.linear.weight))
    save_checkpoint(adapter, out, base=base_info(minilm))
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
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not become ready in {timeout} s")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (what a container runtime sends) and the exit code after the drain."""
    proc.terminate()
    return proc.wait(timeout=30)
