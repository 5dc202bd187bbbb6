"""Fitting an adapter on cached base vectors.

The loss is a contrastive ranking loss: cross-entropy over temperature-scaled cosine scores of each
(query, relevant document) pair against candidate documents, a document scoring by its best window.
Candidates are the whole corpus (full-corpus negatives, which contain every in-batch negative) while it has
at most ``max_candidate_docs`` documents; beyond that, the batch's positives (in-batch negatives), each
query's mined hard negatives and a random sample. A query's other relevant documents are masked: positives
are never negatives.

Two things keep an adapter from over-fitting the training documents, which matters because it will be
judged on documents it never saw: a penalty on the distance of the weights from their identity start (the
adapter moves only as far as the data pays for), and early stopping on a held-out split's MRR. If no epoch
beats the base on that split, the identity is kept and the result says so.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from embedlift.models.adapters import Adapter, AdapterConfig, ApplyTo, build_adapter
from embedlift.models.errors import InvalidInputError
from embedlift.training.metrics import mean_metrics, per_query_metrics
from embedlift.training.retrieval import EmbeddedDataset

logger = logging.getLogger(__name__)

#: The metric early stopping and the base-vs-adapter guard look at.
SELECTION_METRIC = "mrr@10"


@dataclass(frozen=True, kw_only=True)
class FitSettings:
    """Every training setting; recorded in the checkpoint.

    Attributes:
        kind: ``linear`` or ``mlp``.
        apply_to: ``query`` or ``both``.
        bias: Learn a bias (linear).
        hidden_dim: Hidden width (mlp); ``None`` = the base dimension.
        epochs: Maximum passes over the training pairs.
        batch_size: Pairs per step.
        lr: AdamW learning rate.
        temperature: Cosine scores are divided by this before the softmax (0.05 = scale 20, as
            sentence-transformers' MultipleNegativesRankingLoss).
        anchor: Weight of the squared distance of the parameters from their identity start.
        patience: Epochs without a better validation score before stopping.
        hard_negatives: Per query, this many top-ranked non-relevant documents of the base ranking are
            always among the candidates (only matters once the corpus is sampled).
        max_candidate_docs: Corpus size up to which every document is a candidate in every step.
        seed: Seeds shuffling, sampling and initialisation.
    """

    kind: str = "linear"
    apply_to: ApplyTo = "query"
    bias: bool = False
    hidden_dim: int | None = None
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    temperature: float = 0.05
    anchor: float = 0.1
    patience: int = 5
    hard_negatives: int = 0
    max_candidate_docs: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "max_candidate_docs"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.anchor < 0 or self.hard_negatives < 0:
            raise InvalidInputError("anchor and hard_negatives must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """The adapter to keep and how it was chosen.

    Attributes:
        adapter: The best adapter (the identity when nothing beat the base on validation).
        improved: Whether it beats the base on the validation split.
        best_epoch: Epoch of the kept weights (0 = the identity start).
        base_val: The base's validation metrics.
        val: The kept adapter's validation metrics.
        history: Per epoch: mean loss and the validation selection metric.
        seconds: Wall time of fitting (base vectors already embedded).
    """

    adapter: Adapter
    improved: bool
    best_epoch: int
    base_val: dict[str, float]
    val: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        b, a = self.base_val[SELECTION_METRIC], self.val[SELECTION_METRIC]
        if not self.improved:
            return (
                f"the adapter did not beat the base on validation ({SELECTION_METRIC} base {b:.4f}); "
                "kept the identity adapter, which serves exactly the base"
            )
        return f"validation {SELECTION_METRIC}: base {b:.4f} -> adapter {a:.4f} (epoch {self.best_epoch})"


def evaluate_adapter(data: EmbeddedDataset, adapter: Adapter | None) -> dict[str, float]:
    """Exact metrics of ``adapter`` (or the base, for ``None``) on an embedded dataset."""
    return mean_metrics(per_query_metrics(data.scores(adapter), data.doc_ids, data.relevant))


def mine_hard_negatives(data: EmbeddedDataset, n: int) -> np.ndarray:
    """``(n_queries, n)`` column indices of each query's top-ranked non-relevant documents under the base."""
    scores = data.scores(None)
    for i, rel in enumerate(data.relevant):
        scores[i, list(rel)] = -np.inf
    n = min(n, scores.shape[1] - 1)
    return np.argsort(-scores, axis=1, kind="stable")[:, :n]


class _Candidates:
    """Which documents a step scores against: all of them, or a sample for a large corpus."""

    def __init__(self, data: EmbeddedDataset, settings: FitSettings, rng: np.random.Generator) -> None:
        self.n_docs = data.docs.n_docs
        self.owner = data.docs.owner
        self.sample = self.n_docs > settings.max_candidate_docs
        self.settings, self.rng = settings, rng
        self.hard = mine_hard_negatives(data, settings.hard_negatives) if settings.hard_negatives and self.sample else None
        self.window_start = np.searchsorted(self.owner, np.arange(self.n_docs + 1))

    def pick(self, query_idx: np.ndarray, positives: np.ndarray) -> np.ndarray:
        if not self.sample:
            return np.arange(self.n_docs)
        chosen = [positives, self.rng.choice(self.n_docs, self.settings.max_candidate_docs, replace=False)]
        if self.hard is not None:
            chosen.append(self.hard[query_idx].ravel())
        return np.unique(np.concatenate(chosen))

    def windows_of(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window indices of ``docs`` and, for each, its document's position in ``docs``."""
        starts, stops = self.window_start[docs], self.window_start[docs + 1]
        counts = stops - starts
        windows = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
        return windows, np.repeat(np.arange(len(docs)), counts)


def fit_adapter(train: EmbeddedDataset, val: EmbeddedDataset, settings: FitSettings, *, progress: bool = True) -> FitResult:
    """Train an adapter on base vectors of ``train``, selecting epochs by MRR@10 on ``val``.

    Args:
        train: Embedded training dataset (its corpus supplies the negatives).
        val: Embedded validation dataset, ideally of documents not in ``train``.
        settings: Training settings.
        progress: Show a progress bar on stderr.
    """
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    dim = train.queries.shape[1]
    adapter = build_adapter(
        AdapterConfig(kind=settings.kind, dim=dim, apply_to=settings.apply_to, bias=settings.bias, hidden_dim=settings.hidden_dim)
    )
    start_params = [p.detach().clone() for p in adapter.parameters()]
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=settings.lr, weight_decay=0.0)

    pairs = np.array([(qi, d) for qi, rel in enumerate(train.relevant) for d in sorted(rel)], dtype=np.int64)
    if len(pairs) == 0:
        raise InvalidInputError("no (query, relevant document) pairs to train on")
    queries = torch.from_numpy(train.queries)
    windows = torch.from_numpy(train.docs.vectors)
    candidates = _Candidates(train, settings, rng)

    base_val = evaluate_adapter(val, None)
    best_score, best_epoch, best_state = base_val[SELECTION_METRIC], 0, copy.deepcopy(adapter.state_dict())
    best_val = base_val
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, settings.epochs + 1), desc=f"training {settings.kind}", unit="epoch", file=sys.stderr, disable=not progress)
    for epoch in bar:
        adapter.train()
        order = rng.permutation(len(pairs))
        losses = []
        for i in range(0, len(order), settings.batch_size):
            batch = pairs[order[i : i + settings.batch_size]]
            loss = _batch_loss(adapter, queries, windows, train, candidates, batch, settings)
            if settings.anchor:
                drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(adapter.parameters(), start_params, strict=True))
                loss = loss + settings.anchor * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        adapter.eval()
        metrics = evaluate_adapter(val, adapter)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), SELECTION_METRIC: metrics[SELECTION_METRIC]})
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", val=f"{metrics[SELECTION_METRIC]:.4f}")
        if metrics[SELECTION_METRIC] > best_score:
            best_score, best_epoch, best_val = metrics[SELECTION_METRIC], epoch, metrics
            best_state = copy.deepcopy(adapter.state_dict())
        elif epoch - best_epoch >= settings.patience:
            break
    adapter.load_state_dict(best_state)
    adapter.eval()
    return FitResult(
        adapter=adapter,
        improved=best_epoch > 0,
        best_epoch=best_epoch,
        base_val=base_val,
        val=best_val,
        history=history,
        seconds=time.perf_counter() - started,
    )


def _batch_loss(
    adapter: Adapter,
    queries: torch.Tensor,
    windows: torch.Tensor,
    data: EmbeddedDataset,
    candidates: _Candidates,
    batch: np.ndarray,
    settings: FitSettings,
) -> torch.Tensor:
    """Cross-entropy of each (query, positive) pair over the candidate documents' best-window scores."""
    query_idx, positives = batch[:, 0], batch[:, 1]
    docs = candidates.pick(query_idx, positives)  # (n_cand,) corpus columns
    window_idx, window_owner = candidates.windows_of(docs) if candidates.sample else (None, None)
    w = windows if window_idx is None else windows[torch.from_numpy(window_idx)]
    owner = torch.from_numpy(data.docs.owner if window_owner is None else window_owner)
    q = torch.nn.functional.normalize(adapter(queries[torch.from_numpy(query_idx)]), dim=-1)  # (B, d)
    if settings.apply_to == "both":
        w = torch.nn.functional.normalize(adapter(w), dim=-1)  # (n_windows, d)
    window_scores = q @ w.T / settings.temperature  # (B, n_windows)
    doc_scores = torch.full((len(batch), len(docs)), float("-inf")).scatter_reduce(
        1, owner.expand(len(batch), -1), window_scores, reduce="amax", include_self=True
    )  # (B, n_cand): each document's best window
    col = {int(d): j for j, d in enumerate(docs)}
    targets = torch.tensor([col[int(p)] for p in positives])
    mask = torch.zeros_like(doc_scores, dtype=torch.bool)
    for row, (qi, p) in enumerate(zip(query_idx, positives, strict=True)):
        for other in data.relevant[int(qi)]:
            if other != p and other in col:
                mask[row, col[other]] = True  # another relevant document: not a negative
    return torch.nn.functional.cross_entropy(doc_scores.masked_fill(mask, float("-inf")), targets)
