"""The container image, built from nothing (debootstrap base, buildah) and run here the way a user runs it.

Skipped unless ``EMBEDLIFT_CONTAINER_TEST=1`` (CI sets it): building the image takes a few minutes and needs
root, buildah and debootstrap (``scripts/build-image.sh`` installs them with apt when missing). buildah runs
the image with chroot isolation in the host's network namespace, so the server is reached on loopback; it is
started with the image's own entrypoint, environment, user and volumes, as ``docker run`` would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, free_port, make_adapter

IMAGE = os.environ.get("EMBEDLIFT_IMAGE", "localhost/embedlift:test")
ADMIN_KEY = "container-admin"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("EMBEDLIFT_CONTAINER_TEST") != "1", reason="set EMBEDLIFT_CONTAINER_TEST=1 to build and run the image"
)]


def buildah(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["buildah", *args], check=True, text=True, capture_output=True, **kwargs)


@pytest.fixture(scope="module")
def image() -> dict:
    """Build the image with the script the README gives; its config as buildah records it."""
    start = time.monotonic()
    subprocess.run([str(REPO / "scripts" / "build-image.sh")], check=True, env={**os.environ, "IMAGE": IMAGE})
    built = time.monotonic() - start
    config = json.loads(buildah("inspect", "--type", "image", IMAGE).stdout)["Docker"]["config"]
    size = buildah("images", "--format", "{{.Size}}", IMAGE).stdout.strip()
    print(f"\nimage {IMAGE}: {size}, built in {built:.0f} s")
    return config


@pytest.fixture
def container(image):
    name = buildah("from", "--name", f"embedlift-test-{os.getpid()}", IMAGE).stdout.strip()
    # `buildah run` mounts its own directories over the image's VOLUMEs, on top of `-v` binds to the same paths;
    # dropping them from this working container (not the image) lets the binds through, as `docker run -v` does.
    buildah("config", "--volume", "/data-", "--volume", "/adapters-", name)
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True)


def server_pid(root: int) -> int:
    """The embedlift process under ``buildah run`` (what a runtime signals as the container's PID 1)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        todo = [root]
        while todo:
            pid = todo.pop()
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if Path(f"/proc/{pid}").exists() else []
            # the Python interpreter running the `embedlift` script, not buildah's chroot helper around it
            if len(args) > 2 and Path(args[0].decode()).name.startswith("python") and args[1].endswith(b"/embedlift") and args[2] == b"serve":
                return pid
            todo += map(int, subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split())
        time.sleep(0.1)
    raise RuntimeError("no embedlift process under buildah run")


def test_the_image_serves_swaps_adapters_and_stops_cleanly(image, container, minilm, tmp_path):
    # the image as built: non-root, volumes, port, health check on /ready, the server as entrypoint
    assert image["User"] not in ("", "root", "0")
    assert set(image["Volumes"]) == {"/data", "/adapters"} and "8080/tcp" in image["ExposedPorts"]
    assert "/ready" in " ".join(image["Healthcheck"]["Test"]) and image["Entrypoint"] == ["embedlift", "serve"]
    assert "EMBEDLIFT_HOST=0.0.0.0" in image["Env"]

    data, adapters = tmp_path / "data", tmp_path / "adapters"
    for d in (data, adapters):
        d.mkdir()
        d.chmod(0o777)  # the image's user (uid 10001) writes there, as with a named volume
    port = free_port()
    start = time.monotonic()
    proc = subprocess.Popen(
        ["buildah", "run", "--isolation", "chroot", "-v", f"{data}:/data", "-v", f"{adapters}:/adapters",
         "--env", f"EMBEDLIFT_PORT={port}", "--env", f"EMBEDLIFT_ADMIN_KEY={ADMIN_KEY}",
         "--env", "EMBEDLIFT_WATCH_INTERVAL=0.5", container, "--", *image["Entrypoint"]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url, admin = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        while time.monotonic() - start < 180:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        ready = time.monotonic() - start
        print(f"\nfirst /ready after {ready:.1f} s")

        # the image's HEALTHCHECK command, run inside the container, passes
        check = image["Healthcheck"]["Test"][1:]
        env = ["--env", f"EMBEDLIFT_PORT={port}"]
        assert subprocess.run(["buildah", "run", "--isolation", "chroot", *env, container, "--", *check]).returncode == 0

        r = httpx.post(f"{url}/embed", json={"input": ["What drives Lyft's revenue?"]})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
        assert r.headers["x-embedlift-adapter"] == "base"
        assert httpx.put(f"{url}/collections/filings", headers=admin).status_code == 201
        docs = [{"id": "rev", "text": "Revenue grew as riders returned."}, {"id": "ins", "text": "Insurance reserves may be inadequate."}]
        assert httpx.post(f"{url}/collections/filings/documents", json={"documents": docs}, headers=admin).status_code == 200
        hits = httpx.post(f"{url}/collections/filings/search", json={"query": "how did revenue change", "k": 1}).json()["hits"]
        assert hits[0]["id"] == "rev"

        # a checkpoint dropped into the mounted adapters directory is picked up, then activated over HTTP
        make_adapter(minilm, adapters / "dropped")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not httpx.get(f"{url}/adapters").json()["adapters"]:
            time.sleep(0.2)
        assert httpx.post(f"{url}/adapters/dropped/activate", headers=admin).json() == {"active": "dropped@1"}
        r = httpx.post(f"{url}/embed", json={"input": "What drives Lyft's revenue?"})
        assert r.headers["x-embedlift-adapter"] == "dropped@1"
    finally:
        # SIGTERM to the server process, as a container runtime stops PID 1: a drained, clean exit
        os.kill(server_pid(proc.pid), signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "Application shutdown complete" in output
    assert (data / "collections" / "filings").is_dir()  # state landed in the volume
