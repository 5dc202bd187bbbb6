"""A custom embedlift adapter kind: a low-rank residual, ``y = x + B A x``.

``A`` is ``(rank, dim)``, ``B`` is ``(dim, rank)`` and starts at zero, so the adapter starts as the identity
(serving exactly the base) like the built-in kinds. ``rank`` comes from the config's ``options``
(``embedlift train --kind lowrank --option rank=8``) and is saved in the checkpoint's ``config.json``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from embedlift.models.adapters import Adapter, AdapterConfig


class LowRankAdapter(Adapter):
    kind = "lowrank"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        unknown = set(config.options) - {"rank"}
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; lowrank takes: rank")
        rank = config.options.get("rank", 16)
        if not isinstance(rank, int) or not 1 <= rank <= config.dim:
            raise ValueError(f"rank must be an integer in [1, {config.dim}], got {rank!r}")
        self.down = nn.Linear(config.dim, rank, bias=False)
        self.up = nn.Linear(rank, config.dim, bias=False)
        with torch.no_grad():
            self.up.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.down(x))  # (n, dim) -> (n, rank) -> (n, dim)
