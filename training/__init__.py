"""Datasets, fitting and evaluation of adapters on cached base vectors, as a library.

The pipeline the CLI runs, callable from Python (``pipeline.py``): ``train_adapter``, ``evaluate``,
``finetune`` and ``mine_negatives``, each over a dataset (any format, a path or one already read) and a
``BaseSpec``. The pieces below them: ``dataset`` and ``formats`` (reading, validating, splitting), ``retrieval``
(windowed base embeddings and exact scores), ``fit`` (adapter training), ``finetune`` (the whole model),
``negatives`` (hard-negative mining), ``metrics``, ``evaluate`` (comparisons with bootstrap intervals),
``report`` (tables and curves), ``generate`` (datasets written by an LLM).
"""

from embedlift.models.spec import BaseSpec
from embedlift.training.finetune import FinetuneResult, FinetuneSettings
from embedlift.training.fit import FitResult, FitSettings
from embedlift.training.negatives import MiningReport, MiningSettings
from embedlift.training.pipeline import TrainedAdapter, Validation, evaluate, finetune, mine_negatives, open_base, train_adapter

__all__ = [
    "BaseSpec", "FinetuneResult", "FinetuneSettings", "FitResult", "FitSettings", "MiningReport", "MiningSettings",
    "TrainedAdapter", "Validation", "evaluate", "finetune", "mine_negatives", "open_base", "train_adapter",
]
