"""Retrieval quality and training time on the Lyft 10-K data: embedlift vs LlamaIndex's adapter engine.

Run: ``make bench-quality`` (installs the LlamaIndex peer in .venv-bench, then runs this file), or
``python benchmarks/quality.py --skip-peer`` in the development venv.

Splits (of ``../shared/data/lyft_2021_10k/train_dataset.json``):
- A, same corpus, new questions: each chunk's first question (file order) trains, its second tests.
- B, unseen documents: 80/20 split by chunk, seed 0; each side searches only its own chunks.

Rows: the base truncated by the model (what a plain encoder and every peer does), the base with windows,
embedlift's linear and mlp adapters (default settings, windows), a full fine-tune of the base
(``embedlift finetune`` defaults: MultipleNegativesRankingLoss, 1 epoch, batch 32, lr 2e-5, 10% warmup, best
epoch on a 10% validation split by document), the same with hard negatives mined from the base
(``embedlift data mine-negatives`` defaults, one negative column), and the peer with its tutorial settings
(linear: 4 epochs; two-layer: ``TwoLayerNN(384, 1024, 384, bias=True, add_residual=True)``, 25 epochs),
on the same base (the packaged all-MiniLM-L6-v2). Every row is scored by the same exact metric code.

Hybrid rows (``--skip-hybrid`` leaves them out): BM25 alone over each document's best window (English analyzer),
the base fused with it at ``DEFAULT_ALPHA`` (weighted, each side's top 100 min-max normalised) and with RRF
(k=60), and each adapter or fine-tuned model fused at the alpha its training fitted on its own validation split;
the test split never chooses anything. ``base alpha`` lines report the alpha the base's own training split
would pick: the evidence behind ``DEFAULT_ALPHA``.
``train s`` is wall time from dataset to trained adapter, base embeddings included (embedlift starts from
an empty cache; the peer embeds inside its training loop).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from embedlift.models.cache import CachedEncoder, EmbeddingCache  # noqa: E402
from embedlift.models.encoders import LocalEncoder, default_model_path  # noqa: E402
from embedlift.training.dataset import QADataset, load_dataset, split, subset  # noqa: E402
from embedlift.training.fit import FitSettings, evaluate_adapter, fit_adapter  # noqa: E402
from embedlift.training.metrics import mean_metrics, per_query_metrics  # noqa: E402
from embedlift.training.retrieval import embed_dataset  # noqa: E402
from embedlift.models.fusion import DEFAULT_ALPHA  # noqa: E402
from embedlift.models.lexical import LexicalSettings  # noqa: E402
from embedlift.training.fit import SELECTION_METRIC  # noqa: E402
from embedlift.training.hybrid import fit_alpha, hybrid_scores, with_lexical  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lyft_2021_10k" / "train_dataset.json"
SHOWN = ("hit_rate@5", "mrr@5", "hit_rate@10", "mrr@10")


@dataclass
class Row:
    split: str
    system: str
    model: str
    metrics: dict[str, float]
    train_seconds: float | None = None


def lyft_splits(ds: QADataset) -> dict[str, tuple[QADataset, QADataset]]:
    seen: set[str] = set()
    first, second = [], []
    for q, docs in ds.relevant_docs.items():
        (second if docs[0] in seen else first).append(q)
        seen.add(docs[0])
    return {
        "A (new questions)": (subset(ds, first), subset(ds, second)),
        "B (unseen documents)": split(ds, 0.2, by="document", seed=0),
    }


def lexical_of(data, ds: QADataset):
    """The dataset's BM25 scores beside its dense ones (each document by its best window)."""
    return with_lexical(data, ds.corpus, [ds.queries[q] for q in data.query_ids], LexicalSettings())


def hybrid_metrics(data, dense: np.ndarray, alpha: float, fusion: str = "weighted") -> dict[str, float]:
    return mean_metrics(per_query_metrics(hybrid_scores(dense, data.lexical, fusion, alpha), data.doc_ids, data.relevant))


def run_embedlift(split_name: str, train_ds: QADataset, test_ds: QADataset, encoder: LocalEncoder, workdir: Path, *, hybrid: bool) -> list[Row]:
    """Base (truncated and windowed) and both adapter kinds; each kind timed from an empty cache. With
    ``hybrid``: BM25 alone, the base fused (default alpha, RRF) and each adapter fused at its validation alpha."""
    rows = []
    warm = CachedEncoder(encoder, EmbeddingCache(workdir / f"{split_name[0]}-warm.sqlite3"), progress=False)
    test = embed_dataset(warm, test_ds)
    test_truncated = embed_dataset(warm, test_ds, windows=False)
    rows.append(Row(split_name, "base", "truncated", evaluate_adapter(test_truncated, None)))
    rows.append(Row(split_name, "base", "windows", evaluate_adapter(test, None)))
    if hybrid:
        test = lexical_of(test, test_ds)
        base_scores = test.scores(None)
        rows.append(Row(split_name, "lexical", "BM25 (best window)", mean_metrics(per_query_metrics(test.lexical, test.doc_ids, test.relevant))))
        rows.append(Row(split_name, "base", f"hybrid (alpha {DEFAULT_ALPHA})", hybrid_metrics(test, base_scores, DEFAULT_ALPHA)))
        rows.append(Row(split_name, "base", "hybrid (rrf)", hybrid_metrics(test, base_scores, DEFAULT_ALPHA, "rrf")))
        train = lexical_of(embed_dataset(warm, train_ds), train_ds)
        learned = fit_alpha(train, train.scores(None), SELECTION_METRIC)
        print(f"base alpha on the training split of {split_name}: {learned.alpha} ({SELECTION_METRIC} "
              f"{learned.validation['dense'][SELECTION_METRIC]:.4f} dense -> {learned.validation['hybrid'][SELECTION_METRIC]:.4f})", file=sys.stderr)
    for kind in ("linear", "mlp"):
        cold = CachedEncoder(encoder, EmbeddingCache(workdir / f"{split_name[0]}-{kind}-cold.sqlite3"), progress=False)
        started = time.perf_counter()
        fit_ds, val_ds = split(train_ds, 0.1, by="document", seed=0)  # embedlift train's default validation
        val = embed_dataset(cold, val_ds)
        result = fit_adapter(embed_dataset(cold, fit_ds), val, FitSettings(kind=kind), progress=False)
        seconds = time.perf_counter() - started
        rows.append(Row(split_name, "embedlift", kind, evaluate_adapter(test, result.adapter), seconds))
        if hybrid:  # as embedlift train fits it: on the validation split, with the adapter's scores
            alpha = fit_alpha(lexical_of(val, val_ds), val.scores(result.adapter), SELECTION_METRIC).alpha
            rows.append(Row(split_name, "embedlift", f"{kind} + hybrid (alpha {alpha})", hybrid_metrics(test, test.scores(result.adapter), alpha)))
    return rows


def run_finetune(split_name: str, train_ds: QADataset, test_ds: QADataset, workdir: Path, *, negatives: bool, hybrid: bool) -> list[Row]:
    """`embedlift finetune` with its defaults (and, with ``negatives``, on the dataset `data mine-negatives`
    writes); timed from the dataset to the written model, mining included."""
    from embedlift.models.spec import BaseSpec
    from embedlift.training.finetuning import FinetuneSettings, finetune_model
    from embedlift.training.negatives import MiningSettings, mine

    started = time.perf_counter()
    fit_ds, val_ds = split(train_ds, 0.1, by="document", seed=0)  # embedlift finetune's default validation
    if negatives:
        base = CachedEncoder(LocalEncoder(), EmbeddingCache(workdir / f"{split_name[0]}-mine.sqlite3"), progress=False)
        fit_ds, _ = mine(fit_ds, embed_dataset(base, fit_ds), MiningSettings())
    out = workdir / f"ft-{split_name[0]}-{negatives}"
    result = finetune_model(BaseSpec(), fit_ds, val_ds, out, FinetuneSettings(), progress=False)
    seconds = time.perf_counter() - started
    tuned = LocalEncoder(out)
    name = "full fine-tune" + (" + mined negatives" if negatives else "")
    test = embed_dataset(tuned, test_ds)
    rows = [Row(split_name, "embedlift", name, evaluate_adapter(test, None), seconds)]
    if hybrid and result.fusion is not None:
        test = lexical_of(test, test_ds)
        alpha = result.fusion.alpha
        rows.append(Row(split_name, "embedlift", f"{name} + hybrid (alpha {alpha})", hybrid_metrics(test, test.scores(None), alpha)))
    return rows


def fit_time_cached(ds: QADataset, encoder: LocalEncoder, workdir: Path) -> tuple[float, float]:
    """Seconds to train a linear adapter on all pairs once base vectors are cached (and to embed them cold)."""
    cached = CachedEncoder(encoder, EmbeddingCache(workdir / "all.sqlite3"), progress=False)
    fit_ds, val_ds = split(ds, 0.1, by="document", seed=0)
    started = time.perf_counter()
    embed_dataset(cached, fit_ds), embed_dataset(cached, val_ds)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    fit_adapter(embed_dataset(cached, fit_ds), embed_dataset(cached, val_ds), FitSettings(kind="linear"), progress=False)
    return time.perf_counter() - started, cold


def run_llamaindex(split_name: str, train_ds: QADataset, test_ds: QADataset, workdir: Path) -> list[Row]:
    """LlamaIndex's EmbeddingAdapterFinetuneEngine with its tutorial settings, same base, same metrics."""
    from llama_index.finetuning.embeddings.common import EmbeddingQAFinetuneDataset
    from llama_index.embeddings.adapter import AdapterEmbeddingModel
    from llama_index.embeddings.adapter.utils import TwoLayerNN
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.finetuning.embeddings.adapter import EmbeddingAdapterFinetuneEngine

    base = HuggingFaceEmbedding(model_name=str(default_model_path()), device="cpu")
    li_train = EmbeddingQAFinetuneDataset(queries=train_ds.queries, corpus=train_ds.corpus, relevant_docs=train_ds.relevant_docs)
    doc_ids = list(test_ds.corpus)
    docs = _unit(np.array(base.get_text_embedding_batch([test_ds.corpus[d] for d in doc_ids], show_progress=False)))
    query_ids = list(test_ds.queries)
    col = {d: i for i, d in enumerate(doc_ids)}
    relevant = [{col[d] for d in test_ds.relevant_docs[q]} for q in query_ids]

    rows = []
    for model, make_adapter, epochs in (
        ("linear", lambda: None, 4),
        ("two-layer", lambda: TwoLayerNN(384, 1024, 384, bias=True, add_residual=True), 25),
    ):
        out = workdir / f"li-{split_name[0]}-{model}"
        started = time.perf_counter()
        engine = EmbeddingAdapterFinetuneEngine(
            li_train, base, model_output_path=str(out), adapter_model=make_adapter(), epochs=epochs, verbose=False
        )
        engine.finetune()
        seconds = time.perf_counter() - started
        adapted = engine.get_finetuned_model(adapter_cls=type(engine.model))
        assert isinstance(adapted, AdapterEmbeddingModel)
        queries = _unit(np.array([adapted.get_query_embedding(test_ds.queries[q]) for q in query_ids]))
        metrics = mean_metrics(per_query_metrics(queries @ docs.T, doc_ids, relevant))
        rows.append(Row(split_name, "llamaindex", model, metrics, seconds))
    return rows


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--skip-peer", action="store_true", help="do not run LlamaIndex")
    parser.add_argument("--skip-finetune", action="store_true", help="do not run the full fine-tunes (the slow rows)")
    parser.add_argument("--skip-hybrid", action="store_true", help="leave out the lexical and hybrid rows")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    ds = load_dataset(args.data)
    encoder = LocalEncoder()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="embedlift-bench-") as tmp:
        workdir = Path(tmp)
        for name, (train_ds, test_ds) in lyft_splits(ds).items():
            print(f"split {name}: train {train_ds.summary()}, test {test_ds.summary()}", file=sys.stderr)
            rows += run_embedlift(name, train_ds, test_ds, encoder, workdir, hybrid=not args.skip_hybrid)
            if not args.skip_finetune:
                for n in (False, True):
                    rows += run_finetune(name, train_ds, test_ds, workdir, negatives=n, hybrid=not args.skip_hybrid)
            if not args.skip_peer:
                rows += run_llamaindex(name, train_ds, test_ds, workdir)
        fit_s, embed_s = fit_time_cached(ds, encoder, workdir)

    table = Table(title=f"Retrieval on {args.data.name} (base all-MiniLM-L6-v2, exact search)")
    for col in ("split", "system", "model", *SHOWN, "train s"):
        table.add_column(col, justify="left" if col in ("split", "system", "model") else "right")
    for r in rows:
        t = "" if r.train_seconds is None else f"{r.train_seconds:.1f}"
        table.add_row(r.split, r.system, r.model, *(f"{r.metrics[m]:.4f}" for m in SHOWN), t)
    console = Console(width=150)
    console.print(table)
    console.print(
        f"linear adapter on all {len(ds.queries)} pairs: {fit_s:.2f} s to train once base vectors are cached "
        f"({embed_s:.1f} s to embed them into an empty cache)"
    )
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
