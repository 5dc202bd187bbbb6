"""Dataset files in the formats retrieval teams already have, and conversion between them.

Formats (``FORMATS``):

- ``llamaindex``: LlamaIndex's ``EmbeddingQAFinetuneDataset`` JSON (``embedlift.training.dataset``), with
  embedlift's optional ``hard_negatives``.
- ``pairs``: JSONL, one ``{"query", "positive", "negatives"?}`` per line (a pair, or with ``"negative"`` /
  ``"negatives"`` a triplet), the shape of sentence-transformers' (anchor, positive, negative) data.
- ``cohere``: JSONL, one ``{"query", "relevant_passages", "hard_negatives"?}`` per line (Cohere's rerank and
  embed fine-tuning files).
- ``labelled``: JSONL, one ``{"text", "label"}`` per line: texts to be retrieved by category, trained with a
  batch triplet loss (``BatchSemiHardTripletLoss``).
- ``csv``: a header, then ``query,positive[,negative]`` rows or ``text,label`` rows.

Text formats carry texts, not ids: reading one gives every distinct text one id (``q1``, ``d1``... in order
of first appearance), and repeated lines of one query merge. Every problem is reported as
``FILE:LINE: field ...``, so a user can go straight to it. Writing checks first that nothing is lost: a
corpus document that no query names has no line of its own in a text format, and conversion refuses to drop
it unless asked (``drop_unreferenced``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from embedlift.models.checkpoint import atomic_write
from embedlift.models.errors import DatasetError
from embedlift.training.dataset import QADataset, load_dataset, read_dataset_file, validate

Format = Literal["llamaindex", "pairs", "cohere", "labelled", "csv"]
FORMATS: tuple[Format, ...] = ("llamaindex", "pairs", "cohere", "labelled", "csv")


class LabelledDataset(msgspec.Struct, kw_only=True, frozen=True):
    """Texts with a category each. Retrieval on it: a text's nearest neighbours should share its label."""

    texts: list[str]
    labels: list[str]

    def summary(self) -> str:
        return f"{len(self.texts)} texts in {len(set(self.labels))} labels"

    def split(self, fraction: float, *, seed: int = 0) -> tuple[LabelledDataset, LabelledDataset]:
        """Seeded split, stratified by label, into (train, held-out); a label's only text stays in train."""
        if not 0 < fraction < 1:
            raise DatasetError(f"split fraction must be between 0 and 1, got {fraction}")
        rng = random.Random(seed)
        train, held = [], []
        for items in _by_label(self).values():
            rng.shuffle(items)
            n_held = round(len(items) * fraction) if len(items) > 1 else 0
            held += items[:n_held]
            train += items[n_held:]
        pick = lambda idx: LabelledDataset(texts=[self.texts[i] for i in sorted(idx)], labels=[self.labels[i] for i in sorted(idx)])  # noqa: E731
        return pick(train), pick(held)

    def to_retrieval(self, *, seed: int = 0) -> QADataset:
        """The retrieval task the labels define, to evaluate with ``embedlift eval``'s metrics: per label, a
        seeded half of its texts (at least one text stays in the corpus) become queries, the rest the corpus,
        and a query's relevant documents are the corpus texts of its label. hit_rate@1 is then the accuracy of
        a nearest-neighbour classifier."""
        rng = random.Random(seed)
        queries, corpus, relevant = {}, {}, {}
        for items in _by_label(self).values():
            rng.shuffle(items)
            n_queries = len(items) // 2
            docs = [f"d{i + 1}" for i in items[n_queries:]]
            for i in items[n_queries:]:
                corpus[f"d{i + 1}"] = self.texts[i]
            for i in items[:n_queries]:
                queries[f"q{i + 1}"] = self.texts[i]
                relevant[f"q{i + 1}"] = docs
        return validate(QADataset(queries=queries, corpus=corpus, relevant_docs=relevant), "labelled dataset (as retrieval)")


def _by_label(ds: LabelledDataset) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(ds.labels):
        groups[label].append(i)
    return dict(sorted(groups.items()))


AnyDataset = QADataset | LabelledDataset


# ------------------------------------------------------------------------------------------- line schemas
class _PairLine(msgspec.Struct, forbid_unknown_fields=True):
    query: str
    positive: str
    negative: str | None = None
    negatives: list[str] = msgspec.field(default_factory=list)


class _CohereLine(msgspec.Struct, forbid_unknown_fields=True):
    query: str
    relevant_passages: list[str]
    hard_negatives: list[str] = msgspec.field(default_factory=list)


class _LabelledLine(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    label: str | int


LineT = TypeVar("LineT", _PairLine, _CohereLine, _LabelledLine)


class _QABuilder:
    """Collects (query, positives, negatives) texts into a ``QADataset``, one id per distinct text."""

    def __init__(self) -> None:
        self.queries: dict[str, str] = {}
        self.corpus: dict[str, str] = {}
        self.relevant: dict[str, list[str]] = {}
        self.negatives: dict[str, list[str]] = {}
        self._qid: dict[str, str] = {}
        self._did: dict[str, str] = {}

    def _doc(self, text: str) -> str:
        if text not in self._did:
            self._did[text] = f"d{len(self._did) + 1}"
            self.corpus[self._did[text]] = text
        return self._did[text]

    def add(self, query: str, positives: list[str], negatives: list[str], where: str) -> None:
        if query not in self._qid:
            self._qid[query] = f"q{len(self._qid) + 1}"
            self.queries[self._qid[query]] = query
        qid = self._qid[query]
        rel = self.relevant.setdefault(qid, [])
        neg = self.negatives.setdefault(qid, [])
        for text in positives:
            if (d := self._doc(text)) in neg:
                raise DatasetError(f"{where}: a positive is the same text as a negative of this query on an earlier line")
            if d not in rel:
                rel.append(d)
        for text in negatives:
            d = self._doc(text)
            if d in rel:
                raise DatasetError(f"{where}: a negative is the same text as a positive of this query")
            if d not in neg:
                neg.append(d)

    def build(self, source: str) -> QADataset:
        negatives = {q: n for q, n in self.negatives.items() if n}
        return validate(QADataset(queries=self.queries, corpus=self.corpus, relevant_docs=self.relevant, hard_negatives=negatives), source)


def _blank_field(value: object, field: str, where: str) -> None:
    texts = value if isinstance(value, list) else [value]
    for i, text in enumerate(texts):
        if isinstance(text, str) and not text.strip():
            at = f"{field}[{i}]" if isinstance(value, list) else field
            raise DatasetError(f"{where}: field {at!r} is empty")


# ------------------------------------------------------------------------------------------------ reading
def detect_format(path: Path) -> Format:
    """The format of ``path`` from its extension and, for ``.jsonl``, the keys of its first line."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "llamaindex"
    if suffix == ".csv":
        return "csv"
    if suffix not in (".jsonl", ".ndjson"):
        raise DatasetError(f"cannot tell the format of {path} from its extension; name it .json, .jsonl or .csv, or pass --format ({', '.join(FORMATS)})")
    for number, line in _lines(path):
        try:
            keys = set(json.loads(line))
        except (json.JSONDecodeError, TypeError):
            raise DatasetError(f"{path}:{number}: not a JSON object") from None
        if "relevant_passages" in keys:
            return "cohere"
        if "label" in keys or "text" in keys:
            return "labelled"
        return "pairs"
    raise DatasetError(f"{path} has no lines")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers."""
    for number, line in enumerate(read_dataset_file(path, "the file").splitlines(), start=1):
        if line.strip():
            yield number, line


def _decode_line(line: bytes, kind: type[LineT], where: str) -> LineT:
    try:
        record = msgspec.json.decode(line, type=kind)
    except msgspec.ValidationError as exc:
        raise DatasetError(f"{where}: {_field_message(exc, kind)}") from None
    except msgspec.DecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc})") from None
    for field in kind.__struct_fields__:
        _blank_field(getattr(record, field), field, where)
    return record


def _field_message(exc: msgspec.ValidationError, kind: type[msgspec.Struct]) -> str:
    """msgspec's message with the field named first (``field 'query': Expected `str`, got `int```), or with the
    fields a line may have when one is missing or unknown."""
    text = str(exc)
    if " - at `$." in text:
        message, path = text.rsplit(" - at `$.", 1)
        return f"field {path.rstrip('`')!r}: {message}"
    if "unknown field" in text or "missing required field" in text:
        return f"{text}; a line has the fields {', '.join(kind.__struct_fields__)}"
    return text


def read_dataset(path: str | os.PathLike[str], fmt: Format | None = None) -> AnyDataset:
    """Read and validate a dataset file of any supported format (detected unless ``fmt`` is given).

    Raises:
        DatasetError: naming the file, the line and the field of the first bad record.
    """
    p = Path(path)
    fmt = fmt or detect_format(p)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "llamaindex":
        return load_dataset(p)
    if fmt == "csv":
        return _read_csv(p)
    if fmt == "labelled":
        texts, labels = [], []
        for number, line in _lines(p):
            text = _decode_line(line, _LabelledLine, f"{p}:{number}")
            texts.append(text.text)
            labels.append(str(text.label))
        return _labelled(texts, labels, str(p))
    builder = _QABuilder()
    for number, line in _lines(p):
        where = f"{p}:{number}"
        if fmt == "pairs":
            pair = _decode_line(line, _PairLine, where)
            negatives = [*([pair.negative] if pair.negative is not None else []), *pair.negatives]
            builder.add(pair.query, [pair.positive], negatives, where)
        else:
            cohere = _decode_line(line, _CohereLine, where)
            if not cohere.relevant_passages:
                raise DatasetError(f"{where}: field 'relevant_passages' is empty: a query needs at least one relevant passage")
            builder.add(cohere.query, cohere.relevant_passages, cohere.hard_negatives, where)
    if not builder.queries:
        raise DatasetError(f"{p} has no lines")
    return builder.build(str(p))


def _labelled(texts: list[str], labels: list[str], source: str) -> LabelledDataset:
    if not texts:
        raise DatasetError(f"{source} has no lines")
    counts: defaultdict[str, int] = defaultdict(int)
    for label in labels:
        counts[label] += 1
    if len(counts) < 2:
        raise DatasetError(f"{source}: every text has label {labels[0]!r}; a triplet loss needs at least two labels")
    if all(n < 2 for n in counts.values()):
        raise DatasetError(f"{source}: no label has two texts; a triplet loss needs pairs of one label")
    return LabelledDataset(texts=texts, labels=labels)


_CSV_COLUMNS = ({"query", "positive"}, {"query", "positive", "negative"}, {"text", "label"})


def _read_csv(path: Path) -> AnyDataset:
    try:
        text = read_dataset_file(path, "the file").decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text: {exc}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise DatasetError(f"{path}:1: {exc}") from None
    columns = {c.strip() for c in header}
    if columns not in _CSV_COLUMNS:
        raise DatasetError(
            f"{path}:1: the header has columns {sorted(columns)}; expected query,positive[,negative] or text,label"
        )
    reader.fieldnames = [c.strip() for c in header]
    builder, texts, labels = _QABuilder(), [], []
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                n = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                raise DatasetError(f"{where}: the row has {n} values, not {len(columns)} like the header")
            if "label" in columns:
                _blank_field(row["text"], "text", where)
                _blank_field(row["label"], "label", where)
                texts.append(row["text"])
                labels.append(row["label"].strip())
                continue
            _blank_field(row["query"], "query", where)
            _blank_field(row["positive"], "positive", where)
            negative = row.get("negative") or ""
            builder.add(row["query"], [row["positive"]], [negative] if negative.strip() else [], where)
    except csv.Error as exc:
        raise DatasetError(f"{path}:{reader.line_num}: {exc}") from None
    if "label" in columns:
        return _labelled(texts, labels, str(path))
    if not builder.queries:
        raise DatasetError(f"{path} has a header but no rows")
    return builder.build(str(path))


# ------------------------------------------------------------------------------------------------ writing
def unreferenced(ds: QADataset) -> list[str]:
    """Corpus documents no query names (as relevant or as a negative): a text format has no line for them."""
    named = {d for docs in ds.relevant_docs.values() for d in docs} | {d for docs in ds.hard_negatives.values() for d in docs}
    return [d for d in ds.corpus if d not in named]


def dataset_bytes(ds: AnyDataset, fmt: Format, *, drop_unreferenced: bool = False) -> bytes:
    """``ds`` encoded in ``fmt``.

    Raises:
        DatasetError: when ``fmt`` cannot hold ``ds`` (labelled data as query/passage formats, or the other way
            round), or would drop documents no query names without ``drop_unreferenced``.
    """
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; one of {', '.join(FORMATS)}")
    if isinstance(ds, LabelledDataset):
        if fmt == "labelled":
            return b"".join(msgspec.json.encode({"text": t, "label": lab}) + b"\n" for t, lab in zip(ds.texts, ds.labels, strict=True))
        if fmt == "csv":
            return _csv([("text", "label"), *zip(ds.texts, ds.labels, strict=True)])
        raise DatasetError(f"labelled data has no queries and passages; write it as labelled (JSONL) or csv, not {fmt}")
    if fmt == "labelled":
        raise DatasetError("a query/passage dataset has no labels; write it as llamaindex, pairs, cohere or csv")
    if fmt == "llamaindex":
        return json.dumps(ds.to_builtins(), indent=1, ensure_ascii=False).encode() + b"\n"
    if (lost := unreferenced(ds)) and not drop_unreferenced:
        raise DatasetError(
            f"{len(lost)} corpus documents are named by no query (e.g. {lost[0]!r}); {fmt} has no line for them. "
            "Keep llamaindex JSON, or pass --drop-unreferenced to leave them out"
        )
    lines: list[dict[str, Any]] = []
    rows: list[tuple[str, ...]] = []
    for q, text in ds.queries.items():
        positives = [ds.corpus[d] for d in ds.relevant_docs[q]]
        negatives = [ds.corpus[d] for d in ds.hard_negatives.get(q, [])]
        if fmt == "cohere":
            lines.append({"query": text, "relevant_passages": positives, **({"hard_negatives": negatives} if negatives else {})})
        elif fmt == "pairs":
            lines += [{"query": text, "positive": p, **({"negatives": negatives} if negatives else {})} for p in positives]
        else:  # csv: enough rows that every positive and every negative appears; reading merges them again
            n = max(len(positives), len(negatives))
            rows += [(text, positives[i % len(positives)], *([negatives[i % len(negatives)]] if negatives else [])) for i in range(n)]
    if fmt == "csv":
        triplets = any(ds.hard_negatives.values())
        header = ("query", "positive", "negative") if triplets else ("query", "positive")
        return _csv([header, *[row if len(row) == len(header) else (*row, "") for row in rows]])
    return b"".join(msgspec.json.encode(line) + b"\n" for line in lines)


def _csv(rows: list[tuple[str, ...]]) -> bytes:
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue().encode()


def write_dataset(ds: AnyDataset, path: str | os.PathLike[str], fmt: Format | None = None, *, drop_unreferenced: bool = False) -> Format:
    """Write ``ds`` atomically in ``fmt`` (default: from the extension; ``.jsonl`` keeps the shape of the data:
    ``labelled`` for labelled data, else ``pairs``). Returns the format written."""
    p = Path(path)
    if fmt is None:
        suffix = p.suffix.lower()
        by_suffix: dict[str, Format] = {".json": "llamaindex", ".csv": "csv"}
        fmt = by_suffix.get(suffix) or (
            ("labelled" if isinstance(ds, LabelledDataset) else "pairs") if suffix in (".jsonl", ".ndjson") else None
        )
        if fmt is None:
            raise DatasetError(f"cannot tell which format to write {p} in from its extension; name it .json, .jsonl or .csv, or pass --to")
    atomic_write(p, dataset_bytes(ds, fmt, drop_unreferenced=drop_unreferenced))
    return fmt


def read_qa_dataset(path: str | os.PathLike[str], fmt: Format | None = None) -> QADataset:
    """A query/passage dataset in any format; labelled data is refused with what to do instead."""
    ds = read_dataset(path, fmt)
    if isinstance(ds, LabelledDataset):
        raise DatasetError(f"{path} is labelled data ({{text, label}}); this command needs queries and passages")
    return ds


__all__ = [
    "FORMATS", "AnyDataset", "Format", "LabelledDataset", "dataset_bytes", "detect_format", "read_dataset",
    "read_qa_dataset", "unreferenced", "write_dataset",
]
