"""Dataset validation names the offenders; splits are seeded and disjoint."""

import json

import pytest

from embedlift.models.errors import DatasetError
from embedlift.training.dataset import QADataset, load_dataset, parse_dataset, split

GOOD = {
    "queries": {f"q{i}": f"question {i}" for i in range(20)},
    "corpus": {f"d{i}": f"document {i}" for i in range(10)},
    "relevant_docs": {f"q{i}": [f"d{i // 2}"] for i in range(20)},
}


def test_good_dataset_and_llamaindex_mode_field():
    ds = parse_dataset(json.dumps({**GOOD, "mode": "text"}))
    assert len(ds.queries) == 20 and ds.mode == "text"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"relevant_docs": {**GOOD["relevant_docs"], "q0": ["nope"]}}, r"documents not in corpus: 'q0 -> nope'"),
        ({"relevant_docs": {**GOOD["relevant_docs"], "ghost": ["d0"]}}, r"queries not in queries: 'ghost'"),
        ({"queries": {**GOOD["queries"], "q3": "  "}}, r"empty query texts: 'q3'"),
        ({"corpus": {**GOOD["corpus"], "d4": ""}}, r"empty document texts: 'd4'"),
        ({"relevant_docs": {k: v for k, v in GOOD["relevant_docs"].items() if k != "q5"}}, r"without relevant documents: 'q5'"),
        ({"corpus": "not a dict"}, r"is not an EmbeddingQAFinetuneDataset"),
    ],
)
def test_validation_names_offenders(change, message):
    with pytest.raises(DatasetError, match=message):
        parse_dataset(json.dumps({**GOOD, **change}), "f.json")


def test_duplicate_ids_in_the_file():
    text = '{"queries": {"q0": "a", "q0": "b"}, "corpus": {"d0": "x"}, "relevant_docs": {"q0": ["d0"]}}'
    with pytest.raises(DatasetError, match="duplicate ids: 'q0'"):
        parse_dataset(text, "f.json")


def test_many_offenders_are_summarised():
    bad = {**GOOD, "queries": {q: "" for q in GOOD["queries"]}}
    with pytest.raises(DatasetError, match=r"\(and 15 more\)"):
        parse_dataset(json.dumps(bad))


def test_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(DatasetError, match="bad.json is not valid JSON"):
        load_dataset(tmp_path / "bad.json")


def test_split_by_document_keeps_documents_apart():
    ds = parse_dataset(json.dumps(GOOD))
    train, held = split(ds, 0.2, by="document", seed=0)
    assert len(held.corpus) == 2 and len(train.corpus) == 8
    assert not set(train.corpus) & set(held.corpus)
    assert len(train.queries) + len(held.queries) == 20
    for part in (train, held):
        assert all(d in part.corpus for docs in part.relevant_docs.values() for d in docs)
    assert split(ds, 0.2, by="document", seed=0) == (train, held)
    assert split(ds, 0.2, by="document", seed=1) != (train, held)


def test_split_by_query_shares_the_corpus():
    ds = parse_dataset(json.dumps(GOOD))
    train, held = split(ds, 0.25, by="query", seed=3)
    assert len(held.queries) == 5 and not set(train.queries) & set(held.queries)
    assert train.corpus == held.corpus == ds.corpus
    with pytest.raises(DatasetError, match="between 0 and 1"):
        split(ds, 1.5)
    assert isinstance(train, QADataset)
