"""Fitting an adapter on cached base vectors.

Two losses on (query, relevant document) pairs, a document scoring by its best window:

- ``ranking`` (default): cross-entropy over temperature-scaled cosine scores of each pair against candidate
  documents (sentence-transformers' MultipleNegativesRankingLoss, with more negatives). Candidates are the
  whole corpus while it has at most ``max_candidate_docs`` documents; beyond that, the batch's positives
  (in-batch negatives), each query's hard negatives from the dataset and a random sample.
- ``triplet``: a margin loss, ``max(0, margin - cos(q, positive) + cos(q, negative))``, against the query's hard
  negatives from the dataset (``embedlift data mine-negatives``), or, for a query without any, against the
  highest-scoring non-relevant candidate (batch-hard).

A query's other relevant documents are masked: positives are never negatives. Labelled ``{text, label}``
data trains with sentence-transformers' ``BatchSemiHardTripletLoss`` (cosine distance) over batches that
hold several texts of each label.

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from embedlift.models.adapters import Adapter, AdapterConfig, ApplyTo, build_adapter
from embedlift.models.errors import InvalidInputError
from embedlift.training.metrics import mean_metrics, per_query_metrics
from embedlift.training.retrieval import EmbeddedDataset, EmbeddedLabelled

logger = logging.getLogger(__name__)

#: The metric early stopping and the base-vs-adapter guard look at.
SELECTION_METRIC = "mrr@10"

Loss = Literal["ranking", "triplet"]
LOSSES: tuple[Loss, ...] = ("ranking", "triplet")


@dataclass(frozen=True, kw_only=True)
class FitSettings:
    """Every training setting; recorded in the checkpoint.

    Attributes:
        kind: ``linear``, ``mlp``, or a registered custom kind.
        apply_to: ``query`` or ``both``.
        bias: Learn a bias (linear).
        hidden_dim: Hidden width (mlp); ``None`` = the base dimension.
        options: Settings of a custom adapter kind (its config's ``options``).
        loss: ``ranking`` or ``triplet`` (query/passage data; labelled data always uses a batch triplet loss).
        margin: Cosine margin of the triplet losses.
        epochs: Maximum passes over the training pairs.
        batch_size: Pairs per step.
        lr: AdamW learning rate.
        temperature: Cosine scores are divided by this before the softmax (0.05 = scale 20, as
            sentence-transformers' MultipleNegativesRankingLoss).
        anchor: Weight of the squared distance of the parameters from their identity start.
        patience: Epochs without a better validation score before stopping.
        max_candidate_docs: Corpus size up to which every document is a candidate in every step.
        seed: Seeds shuffling, sampling and initialisation.
    """

    kind: str = "linear"
    apply_to: ApplyTo = "query"
    bias: bool = False
    hidden_dim: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    loss: Loss = "ranking"
    margin: float = 0.2
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    temperature: float = 0.05
    anchor: float = 0.1
    patience: int = 5
    max_candidate_docs: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "max_candidate_docs"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.anchor < 0 or self.margin < 0:
            raise InvalidInputError(f"anchor and margin must be >= 0, got {self.anchor} and {self.margin}")
        if self.loss not in LOSSES:
            raise InvalidInputError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")

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


class _Candidates:
    """Which documents a step scores against: all of them, or a sample for a large corpus."""

    def __init__(self, data: EmbeddedDataset, settings: FitSettings, rng: np.random.Generator) -> None:
        self.n_docs = data.docs.n_docs
        self.owner = data.docs.owner
        self.sample = self.n_docs > settings.max_candidate_docs
        self.settings, self.rng = settings, rng
        self.negatives = data.negatives
        self.window_start = data.docs.bounds()

    def pick(self, query_idx: np.ndarray, positives: np.ndarray) -> np.ndarray:
        if not self.sample:
            return np.arange(self.n_docs)
        chosen = [positives, self.rng.choice(self.n_docs, self.settings.max_candidate_docs, replace=False)]
        if self.negatives:
            chosen += [np.asarray(self.negatives[int(q)], dtype=np.int64) for q in query_idx]
        return np.unique(np.concatenate(chosen))

    def windows_of(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window indices of ``docs`` and, for each, its document's position in ``docs``."""
        starts, stops = self.window_start[docs], self.window_start[docs + 1]
        counts = stops - starts
        windows = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
        return windows, np.repeat(np.arange(len(docs)), counts)


class _PairObjective:
    """Batches of (query, relevant document) pairs; the ranking or the triplet loss over their candidates."""

    def __init__(self, data: EmbeddedDataset, settings: FitSettings, rng: np.random.Generator) -> None:
        self.data, self.settings, self.rng = data, settings, rng
        self.pairs = np.array([(qi, d) for qi, rel in enumerate(data.relevant) for d in sorted(rel)], dtype=np.int64)
        if len(self.pairs) == 0:
            raise InvalidInputError("no (query, relevant document) pairs to train on")
        self.queries = torch.from_numpy(data.queries)
        self.windows = torch.from_numpy(data.docs.vectors)
        self.candidates = _Candidates(data, settings, rng)

    def batches(self) -> Iterator[np.ndarray]:
        order = self.rng.permutation(len(self.pairs))
        for i in range(0, len(order), self.settings.batch_size):
            yield self.pairs[order[i : i + self.settings.batch_size]]

    def loss(self, adapter: Adapter, batch: np.ndarray) -> torch.Tensor:
        """The loss of each (query, positive) pair against the candidate documents' best-window scores."""
        data, settings, candidates = self.data, self.settings, self.candidates
        query_idx, positives = batch[:, 0], batch[:, 1]
        docs = candidates.pick(query_idx, positives)  # (n_cand,) corpus columns
        window_idx, window_owner = candidates.windows_of(docs) if candidates.sample else (None, None)
        w = self.windows if window_idx is None else self.windows[torch.from_numpy(window_idx)]
        owner = torch.from_numpy(data.docs.owner if window_owner is None else window_owner)
        q = torch.nn.functional.normalize(adapter(self.queries[torch.from_numpy(query_idx)]), dim=-1)  # (B, d)
        if settings.apply_to == "both":
            w = torch.nn.functional.normalize(adapter(w), dim=-1)  # (n_windows, d)
        window_scores = q @ w.T  # (B, n_windows) cosines
        doc_scores = torch.full((len(batch), len(docs)), float("-inf")).scatter_reduce(
            1, owner.expand(len(batch), -1), window_scores, reduce="amax", include_self=True
        )  # (B, n_cand): each document's best window
        col = {int(d): j for j, d in enumerate(docs)}
        targets = torch.tensor([col[int(p)] for p in positives])
        relevant = torch.zeros_like(doc_scores, dtype=torch.bool)  # every relevant document of the row's query
        for row, qi in enumerate(query_idx):
            for other in data.relevant[int(qi)]:
                if other in col:
                    relevant[row, col[other]] = True
        if settings.loss == "ranking":
            others = relevant.clone()
            others[torch.arange(len(batch)), targets] = False  # another relevant document: not a negative
            return torch.nn.functional.cross_entropy((doc_scores / settings.temperature).masked_fill(others, float("-inf")), targets)
        return self._triplet(doc_scores, targets, relevant, query_idx, col)

    def _triplet(self, doc_scores: torch.Tensor, targets: torch.Tensor, relevant: torch.Tensor, query_idx: np.ndarray, col: dict[int, int]) -> torch.Tensor:
        """Margin loss against the dataset's hard negatives of each query, or its hardest candidate."""
        negative = torch.zeros_like(relevant)
        for row, qi in enumerate(query_idx):
            for d in self.data.negatives[int(qi)] if self.data.negatives else ():
                if d in col:
                    negative[row, col[d]] = True
        hardest = doc_scores.masked_fill(relevant, float("-inf")).argmax(dim=1)  # (B,) batch-hard fallback
        none = ~negative.any(dim=1)
        negative[none, hardest[none]] = True
        positive = doc_scores.gather(1, targets[:, None])  # (B, 1)
        violation = torch.relu(self.settings.margin - positive + doc_scores.masked_fill(~negative, 0.0))  # (B, n_cand)
        return ((violation * negative).sum(dim=1) / negative.sum(dim=1)).mean()


class _LabelledObjective:
    """Batches holding several texts of each label; sentence-transformers' ``BatchSemiHardTripletLoss``."""

    def __init__(self, data: EmbeddedLabelled, settings: FitSettings, rng: np.random.Generator) -> None:
        from sentence_transformers.sentence_transformer.losses import BatchHardTripletLossDistanceFunction, BatchSemiHardTripletLoss

        self.data, self.settings, self.rng = data, settings, rng
        self.vectors, self.labels = torch.from_numpy(data.vectors), torch.from_numpy(data.labels)
        # the loss's batch function only: the adapter, not a SentenceTransformer, produces the embeddings
        self.semi_hard = BatchSemiHardTripletLoss(None, distance_metric=BatchHardTripletLossDistanceFunction.cosine_distance, margin=settings.margin)  # type: ignore[arg-type]

    def batches(self) -> Iterator[np.ndarray]:
        """Texts grouped by label in pairs, pairs shuffled: every batch has positives for its anchors (what
        sentence-transformers' GroupByLabelBatchSampler does for the same loss)."""
        pairs = []
        for label in np.unique(self.data.labels):
            members = self.rng.permutation(np.flatnonzero(self.data.labels == label))
            pairs += [members[i : i + 2] for i in range(0, len(members) - 1, 2)]
        order = self.rng.permutation(len(pairs))
        per_batch = max(1, self.settings.batch_size // 2)
        for i in range(0, len(order), per_batch):
            yield np.concatenate([pairs[j] for j in order[i : i + per_batch]])

    def loss(self, adapter: Adapter, batch: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(batch)
        return self.semi_hard.batch_semi_hard_triplet_loss(self.labels[idx], adapter(self.vectors[idx]))


def fit_adapter(
    train: EmbeddedDataset | EmbeddedLabelled, val: EmbeddedDataset, settings: FitSettings, *, progress: bool = True
) -> FitResult:
    """Train an adapter on base vectors of ``train``, selecting epochs by MRR@10 on ``val``.

    Args:
        train: Embedded training dataset (its corpus supplies the negatives), or embedded labelled texts.
        val: Embedded validation dataset, ideally of documents not in ``train`` (for labelled data, the
            retrieval task of held-out texts: ``LabelledDataset.to_retrieval``).
        settings: Training settings.
        progress: Show a progress bar on stderr.
    """
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    dim = train.vectors.shape[1] if isinstance(train, EmbeddedLabelled) else train.queries.shape[1]
    adapter = build_adapter(
        AdapterConfig(kind=settings.kind, dim=dim, apply_to=settings.apply_to, bias=settings.bias,
                      hidden_dim=settings.hidden_dim, options=settings.options)
    )
    objective = _LabelledObjective(train, settings, rng) if isinstance(train, EmbeddedLabelled) else _PairObjective(train, settings, rng)
    start_params = [p.detach().clone() for p in adapter.parameters()]
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=settings.lr, weight_decay=0.0)

    base_val = evaluate_adapter(val, None)
    best_score, best_epoch, best_state = base_val[SELECTION_METRIC], 0, copy.deepcopy(adapter.state_dict())
    best_val = base_val
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, settings.epochs + 1), desc=f"training {settings.kind}", unit="epoch", file=sys.stderr, disable=not progress)
    for epoch in bar:
        adapter.train()
        losses = []
        for batch in objective.batches():
            loss = objective.loss(adapter, batch)
            if settings.anchor:
                drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(adapter.parameters(), start_params, strict=True))
                loss = loss + settings.anchor * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        adapter.eval()
        metrics = evaluate_adapter(val, adapter)
        mean_loss = float(np.mean(losses)) if losses else 0.0
        history.append({"epoch": epoch, "loss": mean_loss, SELECTION_METRIC: metrics[SELECTION_METRIC]})
        bar.set_postfix(loss=f"{mean_loss:.4f}", val=f"{metrics[SELECTION_METRIC]:.4f}")
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
