"""Import a LlamaIndex adapter checkpoint (``config.json`` + ``pytorch_model.bin``, as
``llama_index.embeddings.adapter.utils.BaseAdapter.save`` writes it) as an embedlift checkpoint.

LlamaIndex's two built-in kinds map exactly onto embedlift's:

- ``LinearLayer(in, out, bias)``: ``y = W x (+ b)`` -> ``linear`` with the same ``W`` (and ``b``).
- ``TwoLayerNN(in, hidden, out, activation_fn_str="relu", add_residual=True)``:
  ``y = r (W2 relu(W1 x + b1) + b2) + x`` -> ``mlp`` with ``W2, b2`` scaled by the residual weight ``r``.

A ``TwoLayerNN`` without the residual, or with another activation, has no embedlift equivalent and is refused
with that reason. The weights file is a torch pickle; it is read with ``torch.load(weights_only=True)``, which
unpickles tensors and plain containers only, never arbitrary objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from embedlift.models.adapters import Adapter, AdapterConfig, ApplyTo, LinearAdapter, MLPAdapter, build_adapter
from embedlift.models.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "pytorch_model.bin"


def read_llamaindex_adapter(path: str | os.PathLike[str], *, apply_to: ApplyTo = "query") -> Adapter:
    """The embedlift adapter computing the same function as the LlamaIndex checkpoint in ``path``."""
    folder = Path(path)
    config = _read_config(folder)
    try:
        state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{folder / WEIGHTS} is missing: a LlamaIndex adapter directory holds {CONFIG} + {WEIGHTS}") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for a damaged or unsafe file
        raise CheckpointError(f"{folder / WEIGHTS} cannot be read as tensors only ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{folder / WEIGHTS} is not a state dict of tensors")
    if "hidden_features" in config:
        return _two_layer(folder, config, state, apply_to)
    return _linear(folder, config, state, apply_to)


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder / CONFIG} is missing: pass the directory LlamaIndex's adapter.save() wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder / CONFIG} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or "in_features" not in config or "out_features" not in config:
        raise CheckpointError(f"{folder / CONFIG} is not a LlamaIndex LinearLayer or TwoLayerNN config (no in_features/out_features)")
    if config["in_features"] != config["out_features"]:
        raise CheckpointError(
            f"{folder / CONFIG}: in_features {config['in_features']} != out_features {config['out_features']}; "
            "embedlift adapters keep the base's dimension"
        )
    return config


def _take(folder: Path, state: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{folder / WEIGHTS} has no tensor {key!r} (has {sorted(state)})")
    t = state[key].to(torch.float32)
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{folder / WEIGHTS}: {key!r} has shape {tuple(t.shape)}, expected {shape} from {CONFIG}")
    if not torch.isfinite(t).all():
        raise CheckpointError(f"{folder / WEIGHTS}: {key!r} contains NaN or infinite values")
    return t


def _linear(folder: Path, config: dict, state: dict[str, torch.Tensor], apply_to: ApplyTo) -> Adapter:
    dim, bias = int(config["in_features"]), bool(config.get("bias", False))
    adapter = build_adapter(AdapterConfig(kind="linear", dim=dim, apply_to=apply_to, bias=bias))
    assert isinstance(adapter, LinearAdapter)
    with torch.no_grad():
        adapter.linear.weight.copy_(_take(folder, state, "linear.weight", (dim, dim)))
        if bias:
            adapter.linear.bias.copy_(_take(folder, state, "linear.bias", (dim,)))
    return adapter


def _two_layer(folder: Path, config: dict, state: dict[str, torch.Tensor], apply_to: ApplyTo) -> Adapter:
    if not config.get("add_residual", False) or config.get("activation_fn_str", "relu") != "relu":
        raise CheckpointError(
            f"{folder / CONFIG}: a TwoLayerNN with add_residual={config.get('add_residual')} and activation "
            f"{config.get('activation_fn_str')!r} has no embedlift equivalent (embedlift's mlp is residual with relu)"
        )
    dim, hidden = int(config["in_features"]), int(config["hidden_features"])
    adapter = build_adapter(AdapterConfig(kind="mlp", dim=dim, apply_to=apply_to, hidden_dim=hidden))
    assert isinstance(adapter, MLPAdapter)
    residual = _take(folder, state, "residual_weight", (1,))
    with torch.no_grad():
        adapter.hidden.weight.copy_(_take(folder, state, "linear1.weight", (hidden, dim)))
        adapter.hidden.bias.copy_(_take(folder, state, "linear1.bias", (hidden,)))
        adapter.output.weight.copy_(residual * _take(folder, state, "linear2.weight", (dim, hidden)))
        adapter.output.bias.copy_(residual * _take(folder, state, "linear2.bias", (dim,)))
    return adapter
