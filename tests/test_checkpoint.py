"""Adapters start as the identity; checkpoints round-trip and every damaged or foreign one is refused."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from embedlift.models.adapters import AdapterConfig, build_adapter
from embedlift.models.checkpoint import BaseInfo, load_checkpoint, save_checkpoint
from embedlift.models.errors import BaseMismatchError, CheckpointError, InvalidInputError

BASE = BaseInfo(name="toy", fingerprint="toy:0123", dim=8)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_new_adapter_is_identity(kind):
    adapter = build_adapter(AdapterConfig(kind=kind, dim=8))
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(adapter.transform(x), x, atol=1e-6)


def test_config_validation_lists_valid_values():
    with pytest.raises(InvalidInputError, match=r"\['linear', 'mlp'\]"):
        AdapterConfig(kind="conv", dim=8)
    with pytest.raises(InvalidInputError, match="apply_to"):
        AdapterConfig(kind="linear", dim=8, apply_to="docs")


def _trained(kind="mlp", apply_to="query"):
    torch.manual_seed(0)
    adapter = build_adapter(AdapterConfig(kind=kind, dim=8, apply_to=apply_to, hidden_dim=16))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return adapter


@pytest.mark.parametrize("kind,apply_to", [("linear", "query"), ("mlp", "both")])
def test_round_trip(tmp_path, kind, apply_to):
    adapter = _trained(kind, apply_to)
    save_checkpoint(adapter, tmp_path / "a", base=BASE, training={"lr": 0.1}, metrics={"val": {"mrr@10": 0.5}})
    loaded = load_checkpoint(tmp_path / "a", expected=BASE)
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(loaded.adapter.transform(x), adapter.transform(x), atol=1e-6)
    assert loaded.name == "a" and loaded.config.apply_to == apply_to and loaded.config.training == {"lr": 0.1}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]
    # readable by other users: a container's service user reads what training on the host wrote
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "a").iterdir()} == {"0o644"}


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    save_checkpoint(_trained(), tmp_path / "a", base=BASE, name="first")
    save_checkpoint(_trained("linear"), tmp_path / "a", base=BASE, name="second")
    assert load_checkpoint(tmp_path / "a").config.kind == "linear"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(_trained(), tmp_path / "a", base=BASE)
    import embedlift.models.checkpoint as ck

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(_trained("linear"), tmp_path / "a", base=BASE)
    assert load_checkpoint(tmp_path / "a").config.kind == "mlp"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


@pytest.fixture
def ckpt(tmp_path):
    save_checkpoint(_trained(), tmp_path / "a", base=BASE)
    return tmp_path / "a"


def test_wrong_base_is_refused(ckpt):
    with pytest.raises(BaseMismatchError, match="trained on base toy"):
        load_checkpoint(ckpt, expected=BaseInfo(name="other", fingerprint="other:999", dim=8))


def test_damaged_weights_name_the_file(ckpt):
    w = ckpt / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        load_checkpoint(ckpt)


def test_damaged_config_names_the_file(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_checkpoint(ckpt)


def test_missing_files(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nothing")


def _edit_weights(ckpt, edit):
    """Rewrite the checkpoint's safetensors file with ``edit(state)`` applied."""
    w = ckpt / "model.safetensors"
    state = load_file(str(w))
    edit(state)
    save_file(state, str(w))


def test_unexpected_and_missing_tensors(ckpt):
    def edit(state):
        state["extra.weight"] = torch.zeros(2)
        del state["hidden.bias"]

    _edit_weights(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"missing tensors \['hidden.bias'\], unexpected tensors \['extra.weight'\]"):
        load_checkpoint(ckpt)


def test_wrong_shape(ckpt):
    _edit_weights(ckpt, lambda state: state.update({"hidden.weight": torch.zeros(4, 8)}))
    with pytest.raises(CheckpointError, match=r"'hidden.weight' has shape \(4, 8\), expected \(16, 8\)"):
        load_checkpoint(ckpt)


def test_non_finite_weights(ckpt):
    _edit_weights(ckpt, lambda state: state["output.bias"].__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(ckpt)


def test_unknown_config_fields_and_kinds(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "kind": "conv"}))
    with pytest.raises(CheckpointError, match="unknown adapter kind 'conv'"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "surprise": 1}))
    with pytest.raises(CheckpointError, match="surprise"):
        load_checkpoint(ckpt)
