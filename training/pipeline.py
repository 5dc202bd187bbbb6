"""The training pipeline as functions over datasets and a base specification.

What ``embedlift train``, ``eval``, ``data mine-negatives`` and ``finetune`` run, callable from Python (a
notebook, a server job) with the same behaviour: the validation split policy, the cached windowed base
embeddings, fitting, the checkpoint's record of how it was made, evaluation against the base with bootstrap
intervals. The CLI only parses options, calls these and prints.

    from embedlift.training import BaseSpec, FitSettings, train_adapter, evaluate
    trained = train_adapter("train.json", BaseSpec(query_prompt="query: "), FitSettings(kind="linear"))
    trained.save("adapters/lyft-linear")
    print(evaluate("test.json", BaseSpec(), adapters=["adapters/lyft-linear"]).to_json())
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from embedlift.models.cache import CachedEncoder, EmbeddingCache, default_cache_path
from embedlift.models.checkpoint import BaseInfo, Checkpoint, CheckpointConfig, base_info, load_checkpoint, read_config, save_checkpoint
from embedlift.models.encoders import Encoder
from embedlift.models.errors import BaseMismatchError, InvalidInputError
from embedlift.models.fusion import Fusion, LearnedFusion
from embedlift.models.lexical import LexicalSettings
from embedlift.models.spec import BaseSpec, load_base
from embedlift.training.dataset import QADataset, SplitBy, split
from embedlift.training.evaluate import BASE, Comparison, Hybrid, compare_runs
from embedlift.training.finetuning import FinetuneResult, FinetuneSettings, base_fusion, finetune_model
from embedlift.training.fit import SELECTION_METRIC, FitResult, FitSettings, fit_adapter
from embedlift.training.hybrid import fit_alpha, with_lexical
from embedlift.training.formats import AnyDataset, Format, LabelledDataset, read_dataset, read_qa_dataset
from embedlift.training.metrics import DEFAULT_KS
from embedlift.training.negatives import MiningReport, MiningSettings, mine
from embedlift.training.retrieval import EmbeddedDataset, embed_dataset, embed_labelled

logger = logging.getLogger(__name__)

Log = Callable[[str], None]
DatasetLike = AnyDataset | str | os.PathLike[str]
#: ``cache=DEFAULT_CACHE``: ``$EMBEDLIFT_CACHE`` or ``~/.cache/embedlift/``; ``None``: no cache.
DEFAULT_CACHE = "default"


def _dataset(data: DatasetLike, fmt: Format | None = None) -> AnyDataset:
    return data if isinstance(data, (QADataset, LabelledDataset)) else read_dataset(data, fmt)


def _name(data: DatasetLike) -> str:
    return "the dataset" if isinstance(data, (QADataset, LabelledDataset)) else str(data)


def open_base(base: BaseSpec | Encoder, cache: EmbeddingCache | str | os.PathLike[str] | None = DEFAULT_CACHE, *, api_key: str | None = None) -> CachedEncoder:
    """The base encoder behind the persistent base-embedding cache (each text embedded once, ever)."""
    encoder = load_base(base, api_key=api_key, progress=True) if isinstance(base, BaseSpec) else base
    if isinstance(encoder, CachedEncoder):
        return encoder
    if cache == DEFAULT_CACHE:
        cache = default_cache_path()
    store = cache if isinstance(cache, EmbeddingCache) or cache is None else EmbeddingCache(cache)
    return CachedEncoder(encoder, store)


def embed_reported(encoder: CachedEncoder, ds: QADataset, label: str, log: Log, *, windows: bool = True) -> EmbeddedDataset:
    """Embed a dataset and say what it cost and how long documents were handled."""
    before = (encoder.stats.cached, encoder.stats.computed)
    data = embed_dataset(encoder, ds, windows=windows)
    cached, computed = encoder.stats.cached - before[0], encoder.stats.computed - before[1]
    how = (
        f"{data.docs.n_windowed} of {data.docs.n_docs} documents longer than the model's window were split "
        f"into windows ({len(data.docs.spans)} windows)"
        if windows
        else "documents embedded whole: the model TRUNCATES those longer than its window (--truncate)"
    )
    log(f"{label}: {ds.summary()}; base embeddings: {cached} cached, {computed} computed; {how}")
    return data


# ------------------------------------------------------------------------------------------- validation
@dataclass(frozen=True, kw_only=True)
class Validation:
    """How the validation split is chosen.

    Attributes:
        dataset: A validation dataset of its own (then nothing is held out).
        fraction: Otherwise, the share of the training data held out.
        by: Hold out by ``document`` (unseen documents, the default) or by ``query``.
        seed: Seeds the split.
    """

    dataset: DatasetLike | None = None
    fraction: float = 0.1
    by: SplitBy = "document"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise InvalidInputError(f"the validation fraction must be between 0 and 1, got {self.fraction}")


def hold_out(ds: AnyDataset, validation: Validation, name: str = "the dataset", fmt: Format | None = None) -> tuple[AnyDataset, QADataset, str]:
    """``(train, validation, how it was chosen)``; labelled data is split by label and validated as the retrieval
    task its held-out texts define."""
    v = validation
    if v.dataset is not None:
        val_ds = _dataset(v.dataset, fmt)
        val_how = f"file {_name(v.dataset)}"
        if type(val_ds) is not type(ds):
            raise InvalidInputError(f"the validation data and {name} must both be labelled data, or both queries and passages")
        train_ds: AnyDataset = ds
    elif isinstance(ds, LabelledDataset):
        train_ds, val_ds = ds.split(v.fraction, seed=v.seed)
        val_how = f"{v.fraction:.0%} of each label of {name} held out"
    else:
        train_ds, val_ds = split(ds, v.fraction, by=v.by, seed=v.seed)
        val_how = f"{v.fraction:.0%} of {name} held out by {v.by}"
        if not train_ds.queries or not val_ds.queries:
            raise InvalidInputError(
                f"{name} is too small to hold out {v.fraction:.0%} by {v.by} for validation; pass --val FILE or a larger --val-fraction"
            )
    if isinstance(val_ds, LabelledDataset):
        val_ds = val_ds.to_retrieval(seed=v.seed)
        if not val_ds.queries:
            raise InvalidInputError(f"the validation texts ({val_how}) have no label with two texts; pass --val FILE or a larger --val-fraction")
    return train_ds, val_ds, val_how


# ------------------------------------------------------------------------------------------------ train
@dataclass
class TrainedAdapter:
    """A fitted adapter with everything its checkpoint records; ``save`` writes it.

    Attributes:
        fusion: The hybrid dense weight fitted on the validation split (with the adapter's dense scores).
    """

    result: FitResult
    base: BaseInfo
    settings: FitSettings
    training: dict[str, Any] = field(default_factory=dict)
    fusion: LearnedFusion | None = None

    def save(self, out: str | os.PathLike[str], name: str | None = None) -> CheckpointConfig:
        """Write the checkpoint directory atomically (``config.json`` with the base spec, settings and metrics)."""
        r = self.result
        return save_checkpoint(
            r.adapter, out, base=self.base, name=name, training={**self.settings.to_dict(), **self.training},
            metrics={"improved": r.improved, "best_epoch": r.best_epoch, "seconds": r.seconds,
                     "base_val": r.base_val, "val": r.val, "history": r.history},
            fusion=self.fusion,
        )


def train_adapter(
    dataset: DatasetLike,
    base: BaseSpec | Encoder,
    settings: FitSettings | None = None,
    validation: Validation | None = None,
    *,
    fmt: Format | None = None,
    lexical: LexicalSettings | None = LexicalSettings(),
    cache: EmbeddingCache | str | os.PathLike[str] | None = DEFAULT_CACHE,
    log: Log = logger.info,
    progress: bool = True,
) -> TrainedAdapter:
    """Train an adapter on ``dataset``'s base embeddings, early-stopped on a validation split.

    Args:
        dataset: A dataset of any format (a path or one already read).
        base: The base specification (or an encoder already loaded).
        settings: Adapter kind, loss and optimisation (``apply_to`` defaults to ``both`` for labelled data).
        validation: How the validation split is chosen (default: 10% of the documents held out).
        fmt: The dataset file's format (default: detected).
        lexical: The lexical settings to fit the hybrid fusion weight under (``None``: no fit).
        cache: The base-embedding cache (a file, an open cache, or ``None``).
        log: Where progress lines go (the CLI: stderr).
        progress: Show the training progress bar.
    """
    settings = settings or FitSettings()
    validation = validation or Validation()
    name = _name(dataset)
    ds = _dataset(dataset, fmt)
    train_ds, val_ds, val_how = hold_out(ds, validation, name, fmt)
    labelled = isinstance(train_ds, LabelledDataset)
    encoder = open_base(base, cache)
    if isinstance(train_ds, LabelledDataset):
        train: Any = embed_labelled(encoder, train_ds)
        log(f"train: {train_ds.summary()} (labelled: batch semi-hard triplet loss, margin {settings.margin})")
    else:
        train = embed_reported(encoder, train_ds, "train", log)
        if settings.loss == "triplet" and not train_ds.hard_negatives:
            log("train: the dataset has no hard negatives; the triplet loss uses each query's hardest candidate "
                "(embedlift data mine-negatives writes them into the dataset)")
    val = embed_reported(encoder, val_ds, f"validation ({val_how})", log)
    result = fit_adapter(train, val, settings, progress=progress)
    log(f"trained in {result.seconds:.1f}s: {result.summary()}")
    fusion = None
    if lexical is not None:
        val_lexical = with_lexical(val, val_ds.corpus, [val_ds.queries[q] for q in val.query_ids], lexical)
        fusion = fit_alpha(val_lexical, val.scores(result.adapter), SELECTION_METRIC)
        h, d = fusion.validation["hybrid"][SELECTION_METRIC], fusion.validation["dense"][SELECTION_METRIC]
        log(f"hybrid on validation ({lexical.language} BM25): alpha {fusion.alpha}, {SELECTION_METRIC} dense {d:.4f} -> hybrid {h:.4f}")
    training = {
        "dataset": name, "validation": val_how, "labelled": labelled,
        "train_size": len(train_ds.texts) if isinstance(train_ds, LabelledDataset) else len(train_ds.queries),
        "val_queries": len(val_ds.queries),
    }
    return TrainedAdapter(result=result, base=base_info(encoder), settings=settings, training=training, fusion=fusion)


# --------------------------------------------------------------------------------------------- evaluate
def evaluation_dataset(dataset: DatasetLike, log: Log = logger.info, fmt: Format | None = None) -> QADataset:
    """A dataset to evaluate on; labelled data as the retrieval task it defines."""
    ds = _dataset(dataset, fmt)
    if isinstance(ds, LabelledDataset):
        log(f"{_name(dataset)}: labelled data ({ds.summary()}): each label's held-out half searches for its other half")
        return ds.to_retrieval()
    return ds


def adapters_base(base: BaseSpec, adapters: Sequence[str | os.PathLike[str]]) -> BaseSpec:
    """``base`` with the identity settings it leaves unset taken from the adapters' recorded base (which must
    be one base for all of them)."""
    configs = [read_config(p) for p in adapters]
    if not configs:
        return base
    fingerprints = {c.base.fingerprint for c in configs}
    if len(fingerprints) > 1:
        listing = ", ".join(f"{p} -> {c.base.name} ({c.base.fingerprint})" for p, c in zip(adapters, configs, strict=True))
        raise BaseMismatchError(f"the adapters were trained on different bases ({listing}); compare adapters of one base, or pass --base")
    recorded = configs[0].base.base_spec()
    return base.fill_from(recorded) if recorded is not None else base


def evaluate(
    dataset: DatasetLike,
    base: BaseSpec,
    adapters: Sequence[str | os.PathLike[str]] = (),
    *,
    finetuned: Sequence[str | os.PathLike[str]] = (),
    ks: Sequence[int] = DEFAULT_KS,
    truncate: bool = False,
    mode: Literal["dense", "hybrid"] = "dense",
    fusion: Fusion = "weighted",
    lexical: LexicalSettings = LexicalSettings(),
    fmt: Format | None = None,
    cache: EmbeddingCache | str | os.PathLike[str] | None = DEFAULT_CACHE,
    log: Log = logger.info,
) -> Comparison:
    """The base, each adapter and each fine-tuned model on one dataset, every query ranked exactly against the
    whole corpus, with deltas against the base and paired bootstrap intervals.

    Args:
        dataset: A dataset of any format (labelled data: the retrieval task it defines).
        base: The base specification; identity settings it leaves unset come from the adapters' record.
        adapters: Checkpoint directories.
        finetuned: Model directories written by ``embedlift finetune`` (rows of their own, same other settings).
        ks: Cut-offs.
        truncate: Embed documents whole, truncated by the model (to measure what windows buy).
        mode: ``hybrid`` adds the ``lexical`` row (BM25 alone) and a ``<row>+hybrid`` row per dense row, fused by
            ``fusion`` with each model's learned alpha where it was fitted under ``lexical``, else the default.
        fusion: ``weighted`` or ``rrf``.
        lexical: The lexical side's analyzer settings.
        fmt: The dataset file's format (default: detected).
        cache: The base-embedding cache.
        log: Where progress lines go.
    """
    ds = evaluation_dataset(dataset, log, fmt)
    base = adapters_base(base, adapters)
    encoder = open_base(base, cache)
    store = encoder.cache if isinstance(encoder.cache, EmbeddingCache) else None
    runs: list[tuple[str, CachedEncoder]] = [("", encoder)]
    checkpoints: list[Checkpoint] = [load_checkpoint(p, expected=base_info(encoder)) for p in adapters]
    embedded = [(label, embed_reported(enc, ds, f"eval [{label or 'torch'}]", log, windows=not truncate)) for label, enc in runs]
    models, alphas = [], {}
    for path in finetuned:  # a fine-tuned base: its own encoder, every other setting as for the base
        spec = msgspec.structs.replace(base, model=str(path))
        tuned = open_base(spec, store)
        name = Path(path).resolve().name
        models.append((name, embed_reported(tuned, ds, f"eval [{name}]", log, windows=not truncate)))
        alphas[name] = learned_alpha(base_fusion(spec), lexical)
    hybrid = None
    if mode == "hybrid":
        label, first = embedded[0]
        embedded[0] = (label, with_lexical(first, ds.corpus, [ds.queries[q] for q in first.query_ids], lexical))
        alphas |= {BASE: learned_alpha(base_fusion(base), lexical), **{c.name: learned_alpha(c.config.fusion, lexical) for c in checkpoints}}
        hybrid = Hybrid(fusion=fusion, alphas={k: v for k, v in alphas.items() if v is not None})
    return compare_runs(embedded, checkpoints, ks, models=models, hybrid=hybrid)


def learned_alpha(learned: LearnedFusion | None, lexical: LexicalSettings | None) -> float | None:
    """A learned dense weight, where it was fitted under these lexical settings (``None``: the default applies)."""
    return learned.alpha if learned is not None and learned.lexical == lexical else None


# ------------------------------------------------------------------------------------------------- mine
def mine_negatives(
    dataset: DatasetLike,
    base: BaseSpec | Encoder,
    settings: MiningSettings | None = None,
    *,
    fmt: Format | None = None,
    cache: EmbeddingCache | str | os.PathLike[str] | None = DEFAULT_CACHE,
    log: Log = logger.info,
) -> tuple[QADataset, MiningReport]:
    """The dataset with hard negatives mined from the base's own windowed ranking (written into it, so training
    on it can be repeated exactly)."""
    ds = dataset if isinstance(dataset, QADataset) else read_qa_dataset(dataset, fmt)  # type: ignore[arg-type]
    data = embed_reported(open_base(base, cache), ds, "mining", log)
    return mine(ds, data, settings or MiningSettings())


# --------------------------------------------------------------------------------------------- finetune
def finetune(
    dataset: DatasetLike,
    base: BaseSpec,
    out: str | os.PathLike[str],
    settings: FinetuneSettings | None = None,
    validation: Validation | None = None,
    *,
    fmt: Format | None = None,
    lexical: LexicalSettings | None = LexicalSettings(),
    log: Log = logger.info,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the whole base model on ``dataset`` (sentence-transformers' trainer), keep the best step on a
    validation split, and write a model directory usable as ``--base`` (``embedlift_finetune.json`` beside it)."""
    train_ds, val_ds, val_how = hold_out(_dataset(dataset, fmt), validation or Validation(), _name(dataset), fmt)
    log(f"validation: {val_how} ({val_ds.summary()})")
    result = finetune_model(base, train_ds, val_ds, out, settings or FinetuneSettings(), lexical=lexical, progress=progress)
    if result.fusion is not None:
        log(f"hybrid on validation: alpha {result.fusion.alpha} (recorded beside the model, used when it serves as the base)")
    return result
