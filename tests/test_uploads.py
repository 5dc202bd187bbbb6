"""Hostile and broken adapter uploads over HTTP: each refused with a 4xx that says why, nothing written outside
the adapters directory, the active adapter untouched, no temporary left behind. The app runs in process on the
model-free base: what is tested is the registry and the upload path, not the model."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.helpers import app_client, make_adapter

ADMIN_KEY = "upload-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TAR = {**ADMIN, "Content-Type": "application/x-tar"}


@pytest.fixture(scope="module")
def site(hashing, tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    adapters = root / "adapters"
    make_adapter(hashing, adapters / "live")
    good = make_adapter(hashing, root / "src" / "good", seed=3)
    with app_client(root / "data", adapters, admin_key=ADMIN_KEY, adapter="live", max_upload_bytes=4 << 20) as client:
        yield {"client": client, "root": root, "adapters": adapters, "good": good}


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tar_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=".")
    return buf.getvalue()


def member(name: str, data: bytes = b"x", **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, data if info.isfile() else None


def variant(site, name: str, change) -> bytes:
    """The good checkpoint with one thing changed by ``change(folder)``, as a tar."""
    folder = site["root"] / "variants" / name
    shutil.copytree(site["good"], folder)
    change(folder)
    return tar_of(folder)


def set_weights(scale: float | None = None, shape: tuple[int, int] | None = None, value: float | None = None):
    def change(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        key = next(iter(tensors))
        w = tensors[key]
        if shape is not None:
            w = np.zeros(shape, dtype=np.float32)
        if value is not None:
            w = w.copy()
            w[0, 0] = value
        tensors[key] = w
        save_file(tensors, folder / "model.safetensors")

    return change


def snapshot(site) -> set[str]:
    return {str(p.relative_to(site["root"])) for p in site["root"].rglob("*") if "variants" not in p.parts and "src" not in p.parts}


HOSTILE = {
    "absolute path": lambda s: tar_bytes([member("/tmp/evil.txt")]),
    "parent escape": lambda s: tar_bytes([member("../../evil.txt")]),
    "nested escape": lambda s: tar_bytes([member("ok/../../evil.txt")]),
    "symlink": lambda s: tar_bytes([member("config.json", type=tarfile.SYMTYPE, linkname="/etc/passwd")]),
    "hard link": lambda s: tar_bytes([member("config.json", type=tarfile.LNKTYPE, linkname="../../x")]),
    "device": lambda s: tar_bytes([member("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)]),
    "fifo": lambda s: tar_bytes([member("pipe", type=tarfile.FIFOTYPE)]),
    "truncated tar": lambda s: tar_of(s["good"])[:3000],
    "truncated gzip": lambda s: gzip.compress(tar_of(s["good"]))[:2000],
    "not an archive": lambda s: b"PK\x03\x04 a zip file, not a tar",
    "empty archive": lambda s: tar_bytes([]),
    "no config": lambda s: variant(s, "noconfig", lambda f: (f / "config.json").unlink()),
    "config not JSON": lambda s: variant(s, "badjson", lambda f: (f / "config.json").write_text("{not json")),
    "weights damaged": lambda s: variant(s, "damaged", lambda f: (f / "model.safetensors").write_bytes(b"\0" * 64)),
    "wrong shape": lambda s: variant(s, "shape", set_weights(shape=(10, 10))),
    "NaN weight": lambda s: variant(s, "nan", set_weights(value=float("nan"))),
    "inf weight": lambda s: variant(s, "inf", set_weights(value=float("inf"))),
    "other base": lambda s: variant(s, "otherbase", lambda f: (f / "config.json").write_text(
        (f / "config.json").read_text().replace(json.loads((f / "config.json").read_text())["base"]["fingerprint"], "other-model:0000"))),
}
EXPECTED = {
    "absolute path": "outside the checkpoint", "parent escape": "outside the checkpoint", "nested escape": "outside the checkpoint",
    "symlink": "is a link", "hard link": "is a link", "device": "device or special file",
    "fifo": "device or special file", "truncated tar": "tar archive", "truncated gzip": "tar archive",
    "not an archive": "tar archive", "empty archive": "config.json", "no config": "config.json",
    "config not JSON": "config.json", "weights damaged": "model.safetensors", "wrong shape": "shape",
    "NaN weight": "uploaded model.safetensors: tensor 'linear.weight' contains NaN or infinite",
    "inf weight": "uploaded model.safetensors: tensor 'linear.weight' contains NaN or infinite", "other base": "other-model:0000",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_broken_upload_is_refused_and_changes_nothing(site, case):
    body = HOSTILE[case](site)
    before = snapshot(site)
    r = site["client"].post("/adapters", content=body, headers=TAR, params={"name": "intruder"})
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    assert EXPECTED[case].lower() in r.json()["detail"].lower(), (case, r.json()["detail"])
    assert snapshot(site) == before  # nothing written, inside or outside the adapters directory
    listing = site["client"].get("/adapters").json()
    assert listing["active"] == "live@1" and [a["name"] for a in listing["adapters"]] == ["live"]
    assert not Path("/tmp/evil.txt").exists()


def test_oversized_upload_is_a_413_before_it_is_read(site):
    before = snapshot(site)
    r = site["client"].post("/adapters", content=b"\0" * (5 << 20), headers=TAR)
    assert r.status_code == 413 and "max_upload_bytes" in r.json()["detail"]
    assert snapshot(site) == before


def test_a_good_upload_still_registers(site):
    r = site["client"].post("/adapters", content=tar_of(site["good"]), headers=TAR, params={"name": "fresh"})
    assert r.status_code == 201 and r.json()["label"] == "fresh@1"
    assert site["client"].get("/adapters").json()["active"] == "live@1"  # registering is not activating
