"""Adapter checkpoints: a directory with ``config.json`` + ``model.safetensors``.

Writing goes to a temporary sibling directory which is then renamed into place, so a crash mid-write leaves
the previous checkpoint (or none), never a half-written one. Loading is strict: a missing or unexpected
tensor, a wrong shape, non-finite weights, a damaged file or a checkpoint for another base raise an error
that names the file and what to do. No pickle is ever loaded: weights are safetensors, config is JSON.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from embedlift.models.adapters import APPLY_TO, ENTRY_POINT_GROUP, Adapter, AdapterConfig, adapter_kinds, build_adapter
from embedlift.models.encoders import Encoder
from embedlift.models.errors import BaseMismatchError, CheckpointError, InvalidInputError
from embedlift.models.fusion import LearnedFusion
from embedlift.models.spec import INT8_REMOVED, BaseSpec, mismatch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class BaseInfo(msgspec.Struct, kw_only=True, frozen=True):
    """The base model an adapter was trained on.

    Attributes:
        name: The model's name.
        fingerprint: What the adapter is matched on (see ``models/encoders.py``).
        dim: The vectors' dimension.
        details: The encoder's own description (kept for checkpoints read by older embedlift versions).
        spec: The resolved base specification (prompts and sequence limit as the model ran), so a server can
            take the identity settings from the adapter and a mismatch can name what differs. ``None`` in
            checkpoints written before specs were recorded (``base_spec`` reads ``details`` then).
    """

    name: str
    fingerprint: str
    dim: int
    details: dict[str, Any] = {}
    spec: BaseSpec | None = None

    def base_spec(self) -> BaseSpec | None:
        """The spec the adapter was trained on, from ``spec`` or, for older checkpoints, ``details``."""
        if self.spec is not None:
            return self.spec
        return BaseSpec.from_details(self.details) if self.details else None


def base_info(encoder: Encoder) -> BaseInfo:
    """What a checkpoint (or a registry) records about the base in use."""
    return BaseInfo(name=encoder.name, fingerprint=encoder.fingerprint, dim=encoder.dim, details=encoder.describe(), spec=encoder.spec)


class CheckpointConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``config.json`` of a checkpoint. New fields get defaults so older checkpoints stay readable."""

    format_version: int
    name: str
    kind: str
    dim: int
    apply_to: str
    bias: bool = False
    hidden_dim: int | None = None
    options: dict[str, Any] = {}
    base: BaseInfo
    created: str
    embedlift_version: str = ""
    training: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    fusion: LearnedFusion | None = None  # the hybrid dense weight fitted in training

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(
            kind=self.kind, dim=self.dim, apply_to=self.apply_to, bias=self.bias, hidden_dim=self.hidden_dim,  # type: ignore[arg-type]
            options=self.options,
        )


@dataclass(frozen=True)
class Checkpoint:
    """A loaded adapter with its config."""

    adapter: Adapter
    config: CheckpointConfig
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.config.name


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("embedlift")
    except Exception:  # running from a source tree without an install
        return ""


def save_checkpoint(
    adapter: Adapter,
    out_dir: str | os.PathLike[str],
    *,
    base: BaseInfo,
    name: str | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    fusion: LearnedFusion | None = None,
) -> CheckpointConfig:
    """Write ``adapter`` to ``out_dir`` atomically.

    Args:
        adapter: The module to save.
        out_dir: Target directory; replaced if it exists.
        base: The base model the adapter was trained on (its fingerprint is checked at load).
        name: Display and registry name; defaults to the directory's name.
        training: Settings the adapter was trained with.
        metrics: Training and validation metrics.
        fusion: The hybrid fusion weight fitted on validation.

    Returns:
        The config that was written.
    """
    out = Path(out_dir)
    c = adapter.config
    if base.dim != c.dim:
        raise InvalidInputError(f"adapter dim {c.dim} does not match base {base.name} dim {base.dim}")
    config = CheckpointConfig(
        format_version=FORMAT_VERSION,
        name=name or out.resolve().name,
        kind=c.kind,
        dim=c.dim,
        apply_to=c.apply_to,
        bias=c.bias,
        hidden_dim=c.hidden_dim,
        options=c.options,
        base=base,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        embedlift_version=_version(),
        training=training or {},
        metrics=metrics or {},
        fusion=fusion,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "kind": c.kind})
        (tmp / CONFIG_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(config), indent=2) + b"\n")
        for f in (tmp / WEIGHTS_FILE, tmp / CONFIG_FILE):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            # safetensors writes 0600: a service running as another user (the container's) could not read it
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``. A new ``dst`` appears in one rename; an existing one is first moved aside
    (two renames, then the old copy is deleted), so ``dst`` is at every moment a complete checkpoint or,
    for the instant between the renames, absent with the old copy beside it."""
    if not dst.exists():
        os.replace(src, dst)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / "ckpt")
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new content, never a mix
    (temp sibling, fsync, ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_base(config: CheckpointConfig, ckpt: Path, expected: BaseInfo) -> None:
    """Refuse an adapter trained on another base than ``expected``, in the user's terms: each identity setting
    that differs with both values (``query_prompt: 'query: ' vs ''``) and the flags that would serve it."""
    trained, serving = config.base.fingerprint, expected.fingerprint
    if trained.endswith("+int8"):  # trained on vectors of the removed --backend int8
        raise BaseMismatchError(f"adapter {config.name!r} ({ckpt}) was trained on int8 vectors of {config.base.name}. {INT8_REMOVED}")
    trained_spec, serving_spec = config.base.base_spec(), expected.base_spec()
    differs = f"fingerprint {trained} vs {serving}"
    fix = "pass the --base options it was trained with, or re-train the adapter on this base"
    if trained_spec is not None and serving_spec is not None:
        differs = mismatch(trained_spec, trained, serving_spec, serving)
        flags = trained_spec.as_flags(trained_spec.differing(serving_spec))
        fix = (
            f"serve it on its own base ({'start the server with ' + flags + ', or ' if flags else ''}start the server "
            f"with no base options so it takes them from the adapter it activates), or re-train it on this one"
        )
    raise BaseMismatchError(
        f"adapter {config.name!r} ({ckpt}) was trained on base {config.base.name}, not on the base in use "
        f"({expected.name}): {differs} (the adapter's value first); {fix}"
    )


def read_config(path: str | os.PathLike[str]) -> CheckpointConfig:
    """Read and validate ``config.json`` of the checkpoint directory ``path``."""
    ckpt = Path(path)
    cfg_file = ckpt / CONFIG_FILE
    if not ckpt.is_dir():
        raise CheckpointError(f"adapter checkpoint {ckpt} is not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: {ckpt} is not an embedlift adapter checkpoint")
    try:
        config = msgspec.json.decode(cfg_file.read_bytes(), type=CheckpointConfig)
    except msgspec.ValidationError as exc:
        raise CheckpointError(f"{cfg_file} is invalid: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc}); the checkpoint is damaged, re-train or re-copy it") from exc
    if config.format_version > FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file} has format_version {config.format_version}, newer than this embedlift reads "
            f"({FORMAT_VERSION}); upgrade embedlift"
        )
    if config.kind not in (kinds := adapter_kinds()):
        raise CheckpointError(
            f"{cfg_file}: unknown adapter kind {config.kind!r}; known: {sorted(kinds)}. A custom kind needs the package "
            f"that registers it (entry point group {ENTRY_POINT_GROUP!r}) installed where the checkpoint is loaded"
        )
    if config.apply_to not in APPLY_TO:
        raise CheckpointError(f"{cfg_file}: apply_to must be one of {list(APPLY_TO)}, got {config.apply_to!r}")
    if config.dim != config.base.dim:
        raise CheckpointError(f"{cfg_file}: dim {config.dim} differs from its base's dim {config.base.dim}")
    return config


def load_checkpoint(path: str | os.PathLike[str], *, expected: BaseInfo | None = None) -> Checkpoint:
    """Load a checkpoint strictly.

    Args:
        path: The checkpoint directory.
        expected: The base it will run on; a checkpoint trained on another is refused, naming each base setting
            that differs.

    Raises:
        CheckpointError: Missing, damaged or inconsistent files (the message names the file).
        BaseMismatchError: The checkpoint was trained on another base.
    """
    ckpt = Path(path)
    config = read_config(ckpt)
    if expected is not None and config.base.fingerprint != expected.fingerprint:
        check_base(config, ckpt, expected)
    weights = ckpt / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete, re-train or re-copy it")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is damaged ({exc}); re-train or re-copy the checkpoint") from exc
    try:
        adapter = build_adapter(config.adapter_config())
    except InvalidInputError as exc:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: {exc.message}") from exc
    wanted = adapter.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match a {config.kind} adapter of dim {config.dim}: "
            f"missing tensors {missing}, unexpected tensors {unexpected}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(wanted[key].shape):
            raise CheckpointError(
                f"{weights}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(wanted[key].shape)} for a {config.kind} adapter of dim {config.dim}"
            )
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights}: tensor {key!r} contains NaN or infinite values")
    adapter.load_state_dict(state, strict=True)
    adapter.eval()
    return Checkpoint(adapter=adapter, config=config, path=ckpt)
