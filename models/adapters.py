"""Adapters: small torch modules applied to frozen base embeddings.

Both kinds start as the identity, so an untrained adapter serves exactly the base model, and training moves
away from the base only as far as the data asks:

- ``linear``: ``y = W x (+ b)``, ``W`` initialised to the identity.
- ``mlp``: ``y = x + W2 relu(W1 x + b1) + b2`` (sentence-transformers' ``Dense`` with a residual), the output
  layer zero-initialised.

``apply_to`` says which side the adapter transforms. ``query`` (default) leaves documents in base space, so
an index never needs rebuilding when an adapter changes; ``both`` transforms documents too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from embedlift.models.errors import InvalidInputError

ApplyTo = Literal["query", "both"]
APPLY_TO: tuple[ApplyTo, ...] = ("query", "both")


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Everything needed to rebuild an adapter's architecture (the weights live in safetensors).

    Attributes:
        kind: A key of ``ADAPTER_KINDS``.
        dim: Base embedding dimension (input and output).
        apply_to: ``query`` or ``both``.
        bias: Learn a bias (``linear`` only; ``mlp`` always has biases).
        hidden_dim: Hidden width of ``mlp``; ``None`` means ``dim``.
    """

    kind: str
    dim: int
    apply_to: ApplyTo = "query"
    bias: bool = False
    hidden_dim: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise InvalidInputError(f"adapter kind must be one of {sorted(ADAPTER_KINDS)}, got {self.kind!r}")
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


#: Adapter architectures by ``kind``. Only these are ever built from a checkpoint's config.
ADAPTER_KINDS: dict[str, type[Adapter]] = {"linear": LinearAdapter, "mlp": MLPAdapter}


def build_adapter(config: AdapterConfig) -> Adapter:
    """A fresh (identity) adapter of ``config.kind``."""
    return ADAPTER_KINDS[config.kind](config)
