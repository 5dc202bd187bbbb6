"""The adapter registry: versions, the active adapter across restarts, rollback, delete, uploads and the
watched directory; every refusal leaves the active adapter as it was."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from embedlift.models.errors import BaseMismatchError, CheckpointError, ConflictError, InvalidInputError, NotFoundError
from embedlift.models.checkpoint import base_info
from embedlift.service.registry import AdapterRegistry, RegistryFile
from tests.helpers import make_adapter


def registry(tmp_path: Path, minilm, adapters: Path | None = None) -> AdapterRegistry:
    r = AdapterRegistry(adapters or tmp_path / "adapters", RegistryFile(tmp_path / "data" / "registry.json"), base_info(minilm))
    return r


def tar_of(directory: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(directory, arcname=".")
    return buf.getvalue()


def test_versions_active_and_rollback_survive_restart(tmp_path, minilm):
    make_adapter(minilm, tmp_path / "adapters" / "a")
    make_adapter(minilm, tmp_path / "adapters" / "b", seed=1)
    r = registry(tmp_path, minilm)
    r.load()
    assert r.active is None and [a.label for a in r.all()] == ["a@1", "b@1"]
    r.activate("a")
    r.activate("b")
    assert r.register_name("b").label == "b@2"  # registering a name again: the next version
    assert r.active.label == "b@2"  # ...and the active one is swapped in place
    again = registry(tmp_path, minilm)
    again.load()
    assert again.active.label == "b@2" and [a.label for a in again.all()] == ["a@1", "b@2"]
    assert again.rollback().name == "a"
    assert again.rollback() is None  # back to the base
    with pytest.raises(ConflictError, match="no previously active"):
        again.rollback()
    override = registry(tmp_path, minilm)
    override.load("a")  # serve --adapter wins over the remembered one
    assert override.active.name == "a"


def test_delete_refuses_the_active_one(tmp_path, minilm):
    make_adapter(minilm, tmp_path / "adapters" / "a")
    make_adapter(minilm, tmp_path / "adapters" / "b", seed=1)
    r = registry(tmp_path, minilm)
    r.load("a")
    with pytest.raises(ConflictError, match="is active"):
        r.delete("a")
    r.delete("b")
    assert not (tmp_path / "adapters" / "b").exists() and [a.name for a in r.all()] == ["a"]
    with pytest.raises(NotFoundError, match=r"available: \['base', 'a'\]"):
        r.activate("b")


def test_registration_stays_inside_the_adapters_directory(tmp_path, minilm):
    outside = make_adapter(minilm, tmp_path / "outside")
    (tmp_path / "adapters").mkdir()
    os.symlink(outside, tmp_path / "adapters" / "link")
    r = registry(tmp_path, minilm)
    r.load()
    for name in ["../outside", "/etc", "a/b", ".."]:
        with pytest.raises(InvalidInputError):
            r.register_name(name)
    with pytest.raises(InvalidInputError, match="outside the adapters directory"):
        r.register_name("link")
    with pytest.raises(NotFoundError, match="no checkpoint directory 'missing'"):
        r.register_name("missing")


def test_tar_upload_registers_and_bad_uploads_change_nothing(tmp_path, minilm):
    r = registry(tmp_path, minilm)
    r.load()
    good = make_adapter(minilm, tmp_path / "src" / "up")
    loaded = r.register_tar(tar_of(good))
    assert loaded.label == "up@1" and (tmp_path / "adapters" / "up" / "model.safetensors").is_file()
    r.activate("up")
    # a damaged checkpoint, one for another base, a path-traversal member, not a tar: refused, nothing changes
    damaged = tmp_path / "src" / "damaged"
    shutil.copytree(good, damaged)
    (damaged / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="damaged"):
        r.register_tar(tar_of(damaged), "up")
    other = tmp_path / "src" / "other"
    shutil.copytree(good, other)
    cfg = (other / "config.json").read_text().replace(minilm.fingerprint, "other:0000")
    (other / "config.json").write_text(cfg)
    with pytest.raises(BaseMismatchError):
        r.register_tar(tar_of(other), "up")
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(InvalidInputError, match="points outside the checkpoint"):
        r.register_tar(evil.getvalue())
    with pytest.raises(InvalidInputError, match="tar archive"):
        r.register_tar(b"not a tar at all")
    assert not (tmp_path / "escaped.txt").exists()
    assert r.active.label == "up@1" and [a.label for a in r.all()] == ["up@1"]
    assert not [p for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".")]  # no temp left over


def test_watched_directory_picks_up_new_and_changed_checkpoints(tmp_path, minilm):
    r = registry(tmp_path, minilm)
    r.load()
    r.watch(interval=0.1)
    try:
        make_adapter(minilm, tmp_path / "adapters" / "dropped")
        deadline = time.time() + 10
        while not r.all() and time.time() < deadline:
            time.sleep(0.05)
        assert [a.label for a in r.all()] == ["dropped@1"]
        make_adapter(minilm, tmp_path / "adapters" / "dropped", seed=5)  # rewritten (atomically) in place
        while r.all()[0].version == 1 and time.time() < deadline:
            time.sleep(0.05)
        assert r.all()[0].label == "dropped@2"
    finally:
        r.stop()
