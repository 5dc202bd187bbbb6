"""Datasets, fitting and evaluation of adapters on cached base vectors, as a library.

The pipeline the CLI runs, callable from Python (``pipeline.py``): ``train_adapter``, ``evaluate``,
``finetune`` and ``mine_negatives``, each over a dataset (any format, a path or one already read) and a
``BaseSpec``. The pieces below them: ``dataset`` and ``formats`` (reading, validating, splitting), ``retrieval``
(windowed base embeddings and exact scores), ``fit`` (adapter training), ``finetune`` (the whole model),
``negatives`` (hard-negative mining), ``metrics``, ``evaluate`` (comparisons with bootstrap intervals),
``report`` (tables and curves), ``generate`` (datasets written by an LLM).

The names below are imported on first use, so ``import embedlift.training.dataset`` (``embedlift data
convert``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedlift.models.spec import BaseSpec
    from embedlift.training.finetuning import FinetuneResult, FinetuneSettings
    from embedlift.training.fit import FitResult, FitSettings
    from embedlift.training.negatives import MiningReport, MiningSettings
    from embedlift.training.pipeline import TrainedAdapter, Validation, evaluate, finetune, mine_negatives, open_base, train_adapter

_WHERE = {
    "BaseSpec": "embedlift.models.spec",
    "FinetuneResult": "embedlift.training.finetuning", "FinetuneSettings": "embedlift.training.finetuning",
    "FitResult": "embedlift.training.fit", "FitSettings": "embedlift.training.fit",
    "MiningReport": "embedlift.training.negatives", "MiningSettings": "embedlift.training.negatives",
    **dict.fromkeys(
        ["TrainedAdapter", "Validation", "evaluate", "finetune", "mine_negatives", "open_base", "train_adapter"],
        "embedlift.training.pipeline",
    ),
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
