"""Adapters: small torch modules applied to frozen base embeddings.

Both kinds start as the identity, so an untrained adapter serves exactly the base model, and training moves
away from the base only as far as the data asks:

- ``linear``: ``y = W x (+ b)``, ``W`` initialised to the identity.
- ``mlp``: ``y = x + W2 relu(W1 x + b1) + b2`` (sentence-transformers' ``Dense`` with a residual), the output
  layer zero-initialised.

``apply_to`` says which side the adapter transforms. ``query`` (default) leaves documents in base space, so
an index never needs rebuilding when an adapter changes; ``both`` transforms documents too.

Custom architectures: a package registers a subclass of ``Adapter`` under the entry-point group
``embedlift.adapters`` (the entry point's name is the kind). Its ``__init__(config)`` reads its settings from
``config.options`` (JSON values, recorded in the checkpoint); it must map ``(n, dim)`` to ``(n, dim)``. Such a
kind trains (``embedlift train --kind NAME --option key=value``), saves, loads and serves like the built-in
ones, wherever the package is installed. Only installed entry points are ever imported: a checkpoint names a
kind, never code.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from embedlift.models.errors import InvalidInputError

logger = logging.getLogger(__name__)

#: The entry-point group custom adapter kinds are registered under.
ENTRY_POINT_GROUP = "embedlift.adapters"
ApplyTo = Literal["query", "both"]
APPLY_TO: tuple[ApplyTo, ...] = ("query", "both")


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Everything needed to rebuild an adapter's architecture (the weights live in safetensors).

    Attributes:
        kind: A key of ``adapter_kinds()``: a built-in kind or a registered custom one.
        dim: Base embedding dimension (input and output).
        apply_to: ``query`` or ``both``.
        bias: Learn a bias (``linear`` only; ``mlp`` always has biases).
        hidden_dim: Hidden width of ``mlp``; ``None`` means ``dim``.
        options: Settings of a custom kind (JSON values); the built-in kinds take none.
    """

    kind: str
    dim: int
    apply_to: ApplyTo = "query"
    bias: bool = False
    hidden_dim: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kinds = adapter_kinds()
        if self.kind not in kinds:
            raise InvalidInputError(
                f"adapter kind must be one of {sorted(kinds)}, got {self.kind!r} (a custom kind is found through an "
                f"installed package's {ENTRY_POINT_GROUP!r} entry point)"
            )
        if self.options and self.kind in ADAPTER_KINDS:
            raise InvalidInputError(f"the built-in {self.kind!r} adapter takes no options, got {sorted(self.options)}")
        if self.apply_to not in APPLY_TO:
            raise InvalidInputError(f"apply_to must be one of {list(APPLY_TO)}, got {self.apply_to!r}")
        if self.dim < 1 or (self.hidden_dim is not None and self.hidden_dim < 1):
            raise InvalidInputError(f"dim and hidden_dim must be >= 1, got {self.dim} and {self.hidden_dim}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Adapter(nn.Module):
    """Base class: maps ``(n, dim)`` base vectors to ``(n, dim)`` adapted ones (not normalised)."""

    kind: ClassVar[str]

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.inference_mode()
    def transform(self, vectors: np.ndarray, *, normalize: bool = True) -> np.ndarray:
        """Apply to numpy vectors and (by default) L2-normalise, the way the service and evaluation use it."""
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        y = self(x)
        return (torch.nn.functional.normalize(y, dim=-1) if normalize else y).numpy()

    def transform_query(self, vectors: np.ndarray, *, normalize: bool = True) -> np.ndarray:
        return self.transform(vectors, normalize=normalize)

    def transform_document(self, vectors: np.ndarray, *, normalize: bool = True) -> np.ndarray:
        """Documents are transformed only by ``apply_to: both`` adapters; otherwise returned as they are."""
        return self.transform(vectors, normalize=normalize) if self.config.apply_to == "both" else vectors


class LinearAdapter(Adapter):
    """``y = W x (+ b)`` with ``W`` starting at the identity."""

    kind = "linear"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        self.linear = nn.Linear(config.dim, config.dim, bias=config.bias)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(config.dim))
            if config.bias:
                self.linear.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)  # (n, dim) -> (n, dim)


class MLPAdapter(Adapter):
    """``y = x + W2 relu(W1 x + b1) + b2`` with ``W2, b2`` zero, so it starts as the identity."""

    kind = "mlp"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_dim or config.dim
        self.hidden = nn.Linear(config.dim, hidden)
        self.output = nn.Linear(hidden, config.dim)
        with torch.no_grad():
            self.output.weight.zero_()
            self.output.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.output(torch.relu(self.hidden(x)))  # (n, dim) -> (n, hidden) -> (n, dim)


#: The built-in adapter architectures by ``kind``.
ADAPTER_KINDS: dict[str, type[Adapter]] = {"linear": LinearAdapter, "mlp": MLPAdapter}


@cache
def _registered() -> dict[str, type[Adapter]]:
    """Custom kinds from installed entry points; one that fails to import or is not an ``Adapter`` is
    logged and left out (the others still load)."""
    found: dict[str, type[Adapter]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in ADAPTER_KINDS:
            logger.warning("entry point %s = %s is ignored: %r is a built-in adapter kind", ep.name, ep.value, ep.name)
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the service down
            logger.warning("adapter kind %r (%s) cannot be imported: %s", ep.name, ep.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            logger.warning("adapter kind %r (%s) is not a subclass of embedlift.models.adapters.Adapter; ignored", ep.name, ep.value)
            continue
        found[ep.name] = cls
    return found


def adapter_kinds() -> dict[str, type[Adapter]]:
    """Every adapter kind: the built-in ones and those registered through entry points.
    Only these are ever built from a checkpoint's config."""
    return {**ADAPTER_KINDS, **_registered()}


def build_adapter(config: AdapterConfig) -> Adapter:
    """A fresh adapter of ``config.kind`` (the built-in kinds start as the identity).

    Raises:
        InvalidInputError: the kind's constructor refused ``config.options``, or the module does not map
            ``dim`` to ``dim``.
    """
    cls = adapter_kinds()[config.kind]
    try:
        adapter = cls(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"adapter kind {config.kind!r} refused its config (options {config.options}): {exc}") from exc
    if config.kind not in ADAPTER_KINDS:
        with torch.no_grad():
            out = adapter(torch.zeros(2, config.dim))
        if tuple(out.shape) != (2, config.dim):
            raise InvalidInputError(f"adapter kind {config.kind!r} maps (n, {config.dim}) to {tuple(out.shape)}; it must keep the shape (n, {config.dim})")
    return adapter
