"""Fine-tuning the whole base model, for a team that outgrows an adapter.

sentence-transformers' ``SentenceTransformerTrainer`` does the training:

- Query/passage data: ``MultipleNegativesRankingLoss`` (every other pair of the batch is a negative), with the
  ``NO_DUPLICATES`` batch sampler so a batch never holds one text twice (a duplicate would be a false
  negative), and the dataset's hard negatives as extra columns (``embedlift data mine-negatives``).
- Labelled ``{text, label}`` data: ``BatchSemiHardTripletLoss`` (cosine distance) with the
  ``GROUP_BY_LABEL`` sampler, so each batch has positives for its anchors.

A passage longer than the model's window would be truncated by the trainer, silently; instead each pair
trains on the passage's window that the base ranks best for the query (the window the served scoring would
match), and a negative likewise. Warmup is linear over ``warmup_ratio`` of the steps.

Evaluation during training uses ``embedlift eval``'s own metrics and windowed scoring (``EmbedliftEvaluator``)
on the held-out split; the best step by MRR@10 is kept (``load_best_model_at_end``). If no step beats the
base on that split, the base itself is written and the result says so, as adapter training does. The
output is a plain sentence-transformers model directory, written atomically, usable as ``--base`` anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from embedlift.models.checkpoint import replace_dir
from embedlift.models.encoders import LocalEncoder
from embedlift.models.errors import InvalidInputError
from embedlift.models.fusion import LearnedFusion
from embedlift.models.lexical import LexicalSettings
from embedlift.models.spec import BaseSpec, load_base
from embedlift.training.dataset import QADataset
from embedlift.training.fit import SELECTION_METRIC, evaluate_adapter
from embedlift.training.formats import LabelledDataset
from embedlift.training.hybrid import fit_alpha, with_lexical
from embedlift.training.retrieval import EmbeddedDataset, embed_dataset

logger = logging.getLogger(__name__)

#: Written beside the model: how it was trained and what it scored.
INFO_FILE = "embedlift_finetune.json"
EVALUATOR_NAME = "embedlift"


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """Training settings; recorded in ``embedlift_finetune.json``.

    Attributes:
        epochs: Passes over the training pairs (fractions allowed).
        lr: Peak learning rate (AdamW).
        batch_size: Pairs per batch (each pair's in-batch negatives are the other pairs).
        warmup_ratio: Fraction of the steps with linearly rising learning rate.
        eval_steps: Evaluate (and keep the best) every this many steps; ``None``: once per epoch.
        max_negatives: Hard negatives per pair from the dataset, as extra columns (``0``: in-batch only).
        margin: Cosine margin of the labelled-data triplet loss.
        seed: Seeds the trainer (shuffling, dropout).
    """

    epochs: float = 1.0
    lr: float = 2e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    eval_steps: int | None = None
    max_negatives: int = 1
    margin: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.epochs > 0 or not self.lr > 0:
            raise InvalidInputError(f"epochs and lr must be > 0, got {self.epochs} and {self.lr}")
        if self.batch_size < 2:
            raise InvalidInputError(f"batch_size must be >= 2 (in-batch negatives need other pairs), got {self.batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidInputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise InvalidInputError(f"eval_steps must be >= 1, got {self.eval_steps}")
        if self.max_negatives < 0 or self.margin < 0:
            raise InvalidInputError("max_negatives and margin must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    """What was written and how it compares with the base on the validation split."""

    improved: bool
    base_val: dict[str, float]
    val: dict[str, float]
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    train_rows: int = 0
    negatives_per_row: int = 0
    fusion: LearnedFusion | None = None

    def summary(self) -> str:
        b, a = self.base_val[SELECTION_METRIC], self.val[SELECTION_METRIC]
        if not self.improved:
            return f"no step beat the base on validation ({SELECTION_METRIC} {b:.4f}); wrote the base unchanged"
        return f"validation {SELECTION_METRIC}: base {b:.4f} -> fine-tuned {a:.4f} (step {self.best_step}, {self.train_rows} training rows)"


def _require_training_packages() -> None:
    try:
        import accelerate  # noqa: F401
        import datasets  # noqa: F401
    except ImportError as exc:
        raise InvalidInputError(
            f"embedlift finetune needs sentence-transformers' training packages ({exc.name} is missing): "
            "pip install 'embedlift[finetune]'"
        ) from None


def windowed_metrics(encoder: LocalEncoder, val: QADataset) -> dict[str, float]:
    """``embedlift eval``'s metrics of ``encoder``'s current weights on ``val`` (no cache: the weights move)."""
    return evaluate_adapter(embed_dataset(encoder, val), None)


def _evaluator(encoder: LocalEncoder, val: QADataset) -> Any:
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator

    class EmbedliftEvaluator(SentenceEvaluator):
        """The validation split scored exactly as ``embedlift eval`` scores it (windows, best window per
        document), so the step kept is the one ``eval`` would rank first."""

        def __init__(self) -> None:
            super().__init__()
            self.name = EVALUATOR_NAME
            self.primary_metric = SELECTION_METRIC
            self.history: list[dict[str, float]] = []

        def __call__(self, model: Any, output_path: str | None = None, epoch: float = -1, steps: int = -1) -> dict[str, float]:
            metrics = windowed_metrics(encoder, val)  # encoder.model is the model being trained
            self.history.append({"step": steps, "epoch": epoch, **metrics})
            return self.prefix_name_to_metrics(metrics, self.name)

    return EmbedliftEvaluator()


def _best_window(data: EmbeddedDataset, bounds: np.ndarray, texts: dict[str, str], query: int, doc: int) -> str:
    """The text of the window of document ``doc`` that scores best against query ``query`` under the base."""
    scores = data.docs.vectors[bounds[doc] : bounds[doc + 1]] @ data.queries[query]
    a, b = data.docs.spans[bounds[doc] + int(np.argmax(scores))]
    return texts[data.doc_ids[doc]][a:b]


def pair_rows(train: QADataset, data: EmbeddedDataset, max_negatives: int) -> tuple[dict[str, list[str]], int]:
    """Columns ``anchor``, ``positive``, ``negative_1..k``: one row per (query, relevant document), each
    passage as its best window. ``k`` is ``max_negatives`` when every query has that many hard negatives,
    else the fewest any query has (a column must be filled on every row)."""
    k = min([max_negatives, *(len(n) for n in data.negatives)]) if max_negatives else 0
    columns: dict[str, list[str]] = {"anchor": [], "positive": [], **{f"negative_{j + 1}": [] for j in range(k)}}
    bounds = data.docs.bounds()
    for i, rel in enumerate(data.relevant):
        for doc in sorted(rel):
            columns["anchor"].append(train.queries[data.query_ids[i]])
            columns["positive"].append(_best_window(data, bounds, train.corpus, i, doc))
            for j in range(k):
                columns[f"negative_{j + 1}"].append(_best_window(data, bounds, train.corpus, i, data.negatives[i][j]))
    return columns, k


def local_base(base: BaseSpec) -> LocalEncoder:
    """The sentence-transformers model a fine-tune trains (a remote or model-free base cannot be fine-tuned)."""
    encoder = load_base(base)
    if not isinstance(encoder, LocalEncoder):
        raise InvalidInputError(f"only a local sentence-transformers base can be fine-tuned, not {encoder.name} ({base.as_flags()})")
    return encoder


def finetune_model(
    base: BaseSpec,
    train: QADataset | LabelledDataset,
    val: QADataset,
    out: str | os.PathLike[str],
    settings: FinetuneSettings,
    *,
    lexical: LexicalSettings | None = LexicalSettings(),
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``base`` on ``train``, keep the best step on ``val``, write the model to ``out`` (with the hybrid
    dense weight fitted for it on ``val`` under ``lexical``, used when it serves as the base without an adapter).

    Args:
        base: The base specification (a local model; its prompts are the training columns' prompts, as they
            are at serving time, and its ``max_seq_length`` the training token limit).
        train: Query/passage pairs (with optional hard negatives) or labelled texts.
        val: The validation split as a retrieval task (labelled data: ``LabelledDataset.to_retrieval``).
        out: Model directory to write (replaced atomically).
        settings: Training settings.
        progress: Show the trainer's progress bar.
    """
    _require_training_packages()
    from datasets import Dataset
    from sentence_transformers.sentence_transformer import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import (
        BatchHardTripletLossDistanceFunction,
        BatchSemiHardTripletLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    started = time.perf_counter()
    encoder = local_base(base)
    model = encoder.model
    rows: dict[str, list[Any]]
    loss: Any
    if isinstance(train, LabelledDataset):
        names = sorted(set(train.labels))
        rows = {"text": train.texts, "label": [names.index(label) for label in train.labels]}
        loss = BatchSemiHardTripletLoss(model, distance_metric=BatchHardTripletLossDistanceFunction.cosine_distance, margin=settings.margin)
        sampler, k = BatchSamplers.GROUP_BY_LABEL, 0
    else:
        rows, k = pair_rows(train, embed_dataset(encoder, train), settings.max_negatives)
        loss, sampler = MultipleNegativesRankingLoss(model), BatchSamplers.NO_DUPLICATES
    n_rows = len(next(iter(rows.values())))
    if n_rows < 2:
        raise InvalidInputError(f"fine-tuning needs at least 2 training rows, got {n_rows}")

    base_val = windowed_metrics(encoder, val)
    evaluator = _evaluator(encoder, val)
    work = Path(tempfile.mkdtemp(prefix=".finetune-", dir=Path(out).resolve().parent))
    try:
        strategy = "steps" if settings.eval_steps else "epoch"
        args = SentenceTransformerTrainingArguments(
            output_dir=str(work / "checkpoints"),
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=min(settings.batch_size, n_rows),
            learning_rate=settings.lr,
            warmup_steps=settings.warmup_ratio,  # a float below 1 is a ratio of the steps (transformers 5)
            batch_sampler=sampler,
            eval_strategy=strategy,
            save_strategy=strategy,
            eval_steps=settings.eval_steps,
            save_steps=settings.eval_steps or 500,  # read only with the "steps" strategy
            save_total_limit=2,
            load_best_model_at_end=True,
            metric_for_best_model=f"eval_{EVALUATOR_NAME}_{SELECTION_METRIC}",
            greater_is_better=True,
            seed=settings.seed,
            use_cpu=True,
            report_to="none",
            logging_steps=max(1, settings.eval_steps or 10),
            disable_tqdm=not progress,
            prompts=_column_prompts(encoder, k, isinstance(train, LabelledDataset)),
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(rows), loss=loss, evaluator=evaluator,
        )
        trainer.train()
        encoder.model = trainer.model  # the best step's weights (load_best_model_at_end)
        best_step = _best_step(trainer.state.best_model_checkpoint)
        val_metrics = windowed_metrics(encoder, val)  # the best step's weights, reloaded by the trainer
        improved = val_metrics[SELECTION_METRIC] > base_val[SELECTION_METRIC]
        if not improved:
            encoder = local_base(base)
            val_metrics = base_val
        fusion = None
        if lexical is not None:  # the hybrid dense weight for this model, fitted on the validation split
            val_data = embed_dataset(encoder, val)
            val_data = with_lexical(val_data, val.corpus, [val.queries[q] for q in val_data.query_ids], lexical)
            fusion = fit_alpha(val_data, val_data.scores(None), SELECTION_METRIC)
        result = FinetuneResult(
            improved=improved, base_val=base_val, val=val_metrics, best_step=best_step if improved else 0,
            history=evaluator.history, seconds=time.perf_counter() - started, train_rows=n_rows, negatives_per_row=k,
            fusion=fusion,
        )
        staged = work / "model"
        encoder.model.save(str(staged))
        info = {
            "base": encoder.source, "spec": msgspec.to_builtins(encoder.spec), "settings": settings.to_dict(),
            "labelled": isinstance(train, LabelledDataset), "train_rows": n_rows, "negatives_per_row": k,
            "improved": improved, "best_step": result.best_step, "seconds": result.seconds,
            "base_val": base_val, "val": val_metrics, "history": evaluator.history,
            **({"fusion": msgspec.to_builtins(fusion)} if fusion is not None else {}),
        }
        (staged / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(staged, Path(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _column_prompts(encoder: LocalEncoder, negatives: int, labelled: bool) -> dict[str, str] | None:
    """Each training column's prompt (queries the query prompt, passages the document prompt), so the model
    trains on the inputs it will serve; ``None`` when the base has no prompts."""
    query, document = encoder.prompt("query"), encoder.prompt("document")
    if not (query or document):
        return None
    if labelled:
        return {"text": document}
    return {"anchor": query, "positive": document, **{f"negative_{j + 1}": document for j in range(negatives)}}


def _best_step(checkpoint: str | None) -> int:
    """The step of ``.../checkpoint-<step>`` (0 when the trainer kept none)."""
    try:
        return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0
    except (IndexError, ValueError):
        return 0


def base_fusion(spec: BaseSpec) -> LearnedFusion | None:
    """The hybrid dense weight ``embedlift finetune`` fitted for a model it wrote (``None`` for any other base)."""
    if spec.model is None or not (info := Path(spec.model).expanduser() / INFO_FILE).is_file():
        return None
    try:
        recorded = json.loads(info.read_text()).get("fusion")
        return msgspec.convert(recorded, LearnedFusion) if recorded else None
    except (OSError, ValueError, msgspec.ValidationError):
        logger.warning("%s: cannot read its fusion weight; the default applies", info)
        return None
