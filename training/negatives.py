"""Hard negatives mined from the base ranking, written into the dataset so a run can be repeated.

A hard negative is a document the base ranks high for a query although it does not answer it: the
examples a ranking loss learns most from. Mining them carelessly teaches the wrong thing, because the
highest-ranked "non-relevant" documents of LLM-written or scraped data are often unlabelled positives. So a
candidate is skipped when it is a known positive, when it is a near-duplicate of a positive (its best window
is that close to a positive's), when it scores above ``max_score``, or when it does not score at least a
margin below the query's weakest positive (sentence-transformers' ``mine_hard_negatives`` names these
``range_min``, ``range_max``, ``max_score``, ``absolute_margin`` and ``relative_margin``; so do we).

The mining scores come from the same windowed base ranking that ``eval`` reports, so it works for any base,
local or remote, through the embedding cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from embedlift.models.errors import InvalidInputError
from embedlift.training.dataset import QADataset, validate
from embedlift.training.retrieval import EmbeddedDataset


@dataclass(frozen=True, kw_only=True)
class MiningSettings:
    """Which documents of the base ranking become a query's hard negatives.

    Attributes:
        num_negatives: Negatives kept per query (the best-ranked that pass every filter).
        range_min: Ranks skipped at the top (after removing positives): the very top is where unlabelled
            positives hide.
        range_max: Only the first ``range_max`` ranks are candidates.
        max_score: Candidates scoring above this cosine are skipped (``None``: no limit).
        absolute_margin: If set, a candidate must score at most the weakest positive's score minus this
            (``0``: no negative above a positive).
        relative_margin: If set, a candidate must score at most the weakest positive's score times
            ``1 - relative_margin``.
        near_duplicate: A candidate whose best window has at least this cosine with a positive's window is
            skipped as a near-duplicate of the positive.
    """

    num_negatives: int = 5
    range_min: int = 0
    range_max: int = 50
    max_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    near_duplicate: float = 0.95

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise InvalidInputError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if not 0 <= self.range_min < self.range_max:
            raise InvalidInputError(f"need 0 <= range_min < range_max, got {self.range_min} and {self.range_max}")
        if (self.absolute_margin is not None and self.absolute_margin < 0) or (
            self.relative_margin is not None and not 0 <= self.relative_margin < 1
        ):
            raise InvalidInputError("absolute_margin must be >= 0 and relative_margin in [0, 1)")
        if not -1 <= self.near_duplicate <= 1:
            raise InvalidInputError(f"near_duplicate is a cosine in [-1, 1], got {self.near_duplicate}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MiningReport:
    """What mining kept and why it skipped the rest (counts over all queries)."""

    queries: int = 0
    with_negatives: int = 0
    negatives: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"near_duplicate": 0, "max_score": 0, "margin": 0})

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in self.skipped.items())
        return (
            f"{self.negatives} hard negatives for {self.with_negatives} of {self.queries} queries "
            f"(candidates skipped: {skipped})"
        )


def mine(ds: QADataset, data: EmbeddedDataset, settings: MiningSettings) -> tuple[QADataset, MiningReport]:
    """``ds`` with mined hard negatives added to each query's (negatives already in ``ds`` are kept first).

    Args:
        ds: The dataset.
        data: ``ds`` embedded by the base the negatives are mined with (same queries and documents).
        settings: Ranks, margins and filters.
    """
    if data.query_ids != list(ds.queries) or data.doc_ids != list(ds.corpus):
        raise InvalidInputError("the embedded dataset does not match the dataset being mined")
    scores = data.scores(None)  # (n_queries, n_docs)
    report = MiningReport(queries=len(data.query_ids))
    negatives: dict[str, list[str]] = {q: list(n) for q, n in ds.hard_negatives.items()}
    window_start = data.docs.bounds()

    def windows(doc: int) -> np.ndarray:
        return data.docs.vectors[window_start[doc] : window_start[doc + 1]]

    for i, qid in enumerate(data.query_ids):
        positives = sorted(data.relevant[i])
        floor = float(scores[i, positives].min())  # the weakest positive: a negative must stay below it
        limit = min(
            floor - settings.absolute_margin if settings.absolute_margin is not None else np.inf,
            floor * (1 - settings.relative_margin) if settings.relative_margin is not None else np.inf,
        )
        positive_windows = np.concatenate([windows(p) for p in positives])
        order = [int(d) for d in np.argsort(-scores[i], kind="stable") if int(d) not in data.relevant[i]]
        kept = negatives.setdefault(qid, [])
        added = 0
        for doc in order[settings.range_min : settings.range_max]:
            if added == settings.num_negatives:
                break
            score = float(scores[i, doc])
            if settings.max_score is not None and score > settings.max_score:
                report.skipped["max_score"] += 1
            elif score > limit:
                report.skipped["margin"] += 1
            elif float((windows(doc) @ positive_windows.T).max()) >= settings.near_duplicate:
                report.skipped["near_duplicate"] += 1
            elif (doc_id := data.doc_ids[doc]) not in kept:
                kept.append(doc_id)
                added += 1
        report.negatives += added
        report.with_negatives += bool(kept)
    mined = QADataset(
        queries=ds.queries, corpus=ds.corpus, relevant_docs=ds.relevant_docs, mode=ds.mode,
        hard_negatives={q: n for q, n in negatives.items() if n},
    )
    return validate(mined, "mined dataset"), report
