"""(question, passage) datasets in LlamaIndex's ``EmbeddingQAFinetuneDataset`` JSON, validated, and split.

``{"queries": {qid: text}, "corpus": {doc_id: text}, "relevant_docs": {qid: [doc_id, ...]}}``; LlamaIndex
also writes ``"mode": "text"``, which is accepted. embedlift adds one optional key, ``"hard_negatives":
{qid: [doc_id, ...]}`` (mined or given negatives, written out so a run can be repeated); it is left out of
the file when empty, so a file without negatives stays exactly LlamaIndex's format. Every problem found is
reported with the first offenders, so a user fixes the file in one pass. Other formats (JSONL, CSV,
labelled data) are read and written by ``embedlift.training.formats``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import msgspec

from embedlift.models.errors import DatasetError

SplitBy = Literal["query", "document"]
_SHOW = 5  # offenders listed per problem


class QADataset(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Queries, a corpus, which documents answer each query, and (optionally) documents that look relevant
    to a query but are not (``hard_negatives``: training pushes them away; ``eval`` reports triplet accuracy)."""

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant_docs: dict[str, list[str]]
    mode: str = "text"
    hard_negatives: dict[str, list[str]] = msgspec.field(default_factory=dict)

    def to_builtins(self) -> dict[str, Any]:
        """LlamaIndex's keys (``mode`` included), plus ``hard_negatives`` only when there are some."""
        body: dict[str, Any] = {"queries": self.queries, "corpus": self.corpus, "relevant_docs": self.relevant_docs, "mode": self.mode}
        return body | ({"hard_negatives": self.hard_negatives} if self.hard_negatives else {})

    def to_json(self) -> bytes:
        return msgspec.json.encode(self.to_builtins())

    def summary(self) -> str:
        return f"{len(self.queries)} queries, {len(self.corpus)} documents"


def _first(items: Iterable[str]) -> str:
    items = list(items)
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(repr(i) for i in items[:_SHOW]) + more


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    dupes = []
    for key, value in pairs:
        if key in seen:
            dupes.append(key)
        seen[key] = value
    if dupes:
        raise DatasetError(f"duplicate ids: {_first(dict.fromkeys(dupes))}")
    return seen


def validate(ds: QADataset, source: str = "dataset") -> QADataset:
    """Check ids and texts; raise ``DatasetError`` listing every kind of problem with its first offenders."""
    problems: list[str] = []
    if not ds.queries:
        problems.append("it has no queries")
    if not ds.corpus:
        problems.append("it has no documents in corpus")
    if empty := [q for q, t in ds.queries.items() if not t.strip()]:
        problems.append(f"empty query texts: {_first(empty)}")
    if empty := [d for d, t in ds.corpus.items() if not t.strip()]:
        problems.append(f"empty document texts: {_first(empty)}")
    if unknown := [q for q in ds.relevant_docs if q not in ds.queries]:
        problems.append(f"relevant_docs names queries not in queries: {_first(unknown)}")
    if unanswered := [q for q in ds.queries if not ds.relevant_docs.get(q)]:
        problems.append(f"queries without relevant documents: {_first(unanswered)}")
    bad_docs = [f"{q} -> {d}" for q, docs in ds.relevant_docs.items() for d in docs if d not in ds.corpus]
    if bad_docs:
        problems.append(f"relevant_docs names documents not in corpus: {_first(bad_docs)}")
    dup_rel = [q for q, docs in ds.relevant_docs.items() if len(set(docs)) != len(docs)]
    if dup_rel:
        problems.append(f"relevant_docs lists a document twice for: {_first(dup_rel)}")
    if unknown := [q for q in ds.hard_negatives if q not in ds.queries]:
        problems.append(f"hard_negatives names queries not in queries: {_first(unknown)}")
    bad_docs = [f"{q} -> {d}" for q, docs in ds.hard_negatives.items() for d in docs if d not in ds.corpus]
    if bad_docs:
        problems.append(f"hard_negatives names documents not in corpus: {_first(bad_docs)}")
    both = [f"{q} -> {d}" for q, docs in ds.hard_negatives.items() for d in docs if d in ds.relevant_docs.get(q, ())]
    if both:
        problems.append(f"a hard negative is also a relevant document of the same query: {_first(both)}")
    if problems:
        raise DatasetError(f"{source} fails validation: " + "; ".join(problems))
    return ds


def parse_dataset(data: bytes | str, source: str = "dataset") -> QADataset:
    """Decode and validate dataset JSON (duplicate ids inside an object are an error, not a silent overwrite)."""
    try:
        raw = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except DatasetError as exc:
        raise DatasetError(f"{source}: {exc.message}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{source} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise DatasetError(f"{source} is not a dataset: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python's digit limit
        raise DatasetError(f"{source} is not valid JSON: {exc}") from exc
    try:
        ds = msgspec.convert(raw, QADataset)
    except msgspec.ValidationError as exc:
        raise DatasetError(
            f"{source} is not an EmbeddingQAFinetuneDataset ({{queries, corpus, relevant_docs}}): {exc}"
        ) from exc
    return validate(ds, source)


def read_dataset_file(path: Path, what: str = "the JSON file") -> bytes:
    """A dataset file's bytes; a missing file, a directory or an unreadable file is a ``DatasetError``
    naming the path (``what`` says what to pass instead of a directory)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"dataset file {path} does not exist") from None
    except IsADirectoryError:
        raise DatasetError(f"dataset path {path} is a directory; pass {what}") from None
    except OSError as exc:
        raise DatasetError(f"cannot read dataset file {path}: {exc.strerror}") from exc


def load_dataset(path: str | os.PathLike[str]) -> QADataset:
    """Read and validate a dataset file."""
    p = Path(path)
    return parse_dataset(read_dataset_file(p), str(p))


def subset(ds: QADataset, query_ids: Iterable[str], doc_ids: Iterable[str] | None = None) -> QADataset:
    """The dataset restricted to some queries (and, optionally, a sub-corpus).

    Relevant documents outside the sub-corpus are dropped from a query's list; queries left with none are
    dropped. Callers report sizes, so nothing disappears unseen.
    """
    corpus = ds.corpus if doc_ids is None else {d: ds.corpus[d] for d in doc_ids}
    queries, relevant, negatives = {}, {}, {}
    for q in query_ids:
        docs = [d for d in ds.relevant_docs[q] if d in corpus]
        if docs:
            queries[q], relevant[q] = ds.queries[q], docs
            if negs := [d for d in ds.hard_negatives.get(q, ()) if d in corpus]:
                negatives[q] = negs
    return QADataset(queries=queries, corpus=corpus, relevant_docs=relevant, mode=ds.mode, hard_negatives=negatives)


def split(ds: QADataset, fraction: float, *, by: SplitBy = "document", seed: int = 0) -> tuple[QADataset, QADataset]:
    """Seeded split into (train, held-out).

    ``by="query"``: a ``fraction`` of the queries is held out; both sides search the whole corpus (new
    questions about known documents). ``by="document"``: a ``fraction`` of the documents is held out with
    the queries they answer, and each side searches only its own documents (unseen documents: the harder
    and more honest test of generalisation). A query goes to the held-out side when its first relevant
    document is held out.
    """
    if not 0 < fraction < 1:
        raise DatasetError(f"split fraction must be between 0 and 1, got {fraction}")
    rng = random.Random(seed)
    if by == "query":
        qids = sorted(ds.queries)
        rng.shuffle(qids)
        n_held = max(1, round(len(qids) * fraction))
        return subset(ds, sorted(qids[n_held:])), subset(ds, sorted(qids[:n_held]))
    if by != "document":
        raise DatasetError(f"split by must be 'query' or 'document', got {by!r}")
    dids = sorted(ds.corpus)
    rng.shuffle(dids)
    n_held = max(1, round(len(dids) * fraction))
    held = set(dids[:n_held])
    train_q = [q for q in ds.queries if ds.relevant_docs[q][0] not in held]
    held_q = [q for q in ds.queries if ds.relevant_docs[q][0] in held]
    return (
        subset(ds, train_q, [d for d in ds.corpus if d not in held]),
        subset(ds, held_q, [d for d in ds.corpus if d in held]),
    )
