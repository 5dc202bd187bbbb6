"""Dataset formats: each parsed from a real file, converted both ways through `embedlift data convert`, and
each kind of bad line refused with its file, line number and field; hard negatives mined from the real base
ranking and written into the dataset."""

from __future__ import annotations

import json

import pytest
from embedlift.models.errors import DatasetError
from embedlift.training.dataset import QADataset, load_dataset
from embedlift.training.formats import (
    LabelledDataset,
    dataset_bytes,
    read_dataset,
    write_dataset,
)
from embedlift.training.negatives import MiningSettings, mine
from embedlift.training.retrieval import embed_dataset

from tests.helpers import run_cli

PAIRS = """\
{"query": "What drives revenue?", "positive": "Revenue depends on rides.", "negative": "Bikes are red."}
{"query": "What drives revenue?", "positive": "Riders pay per trip."}

{"query": "Who are the drivers?", "positive": "Drivers are contractors.", "negatives": ["Bikes are red.", "Scooters are new."]}
"""
COHERE = """\
{"query": "What drives revenue?", "relevant_passages": ["Revenue depends on rides.", "Riders pay per trip."], "hard_negatives": ["Bikes are red."]}
{"query": "Who are the drivers?", "relevant_passages": ["Drivers are contractors."], "hard_negatives": ["Bikes are red.", "Scooters are new."]}
"""
CSV = """\
query,positive,negative
What drives revenue?,Revenue depends on rides.,Bikes are red.
What drives revenue?,Riders pay per trip.,
"Who are the drivers?","Drivers are contractors.","Bikes are red."
Who are the drivers?,Drivers are contractors.,Scooters are new.
"""
LABELLED = "\n".join(
    json.dumps({"text": t, "label": label})
    for t, label in [("refund my order", "billing"), ("charged twice", "billing"), ("reset password", "account"), ("cannot log in", "account")]
)


def canonical(ds: QADataset) -> dict:
    """Ids aside: each query text with its positive and negative texts."""
    return {
        ds.queries[q]: (sorted(ds.corpus[d] for d in ds.relevant_docs[q]), sorted(ds.corpus[d] for d in ds.hard_negatives.get(q, [])))
        for q in ds.queries
    }


EXPECTED = {
    "What drives revenue?": (["Revenue depends on rides.", "Riders pay per trip."], ["Bikes are red."]),
    "Who are the drivers?": (["Drivers are contractors."], ["Bikes are red.", "Scooters are new."]),
}


@pytest.mark.parametrize("name,text", [("p.jsonl", PAIRS), ("c.jsonl", COHERE), ("t.csv", CSV)])
def test_each_format_parses_to_the_same_dataset(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    ds = read_dataset(path)
    assert isinstance(ds, QADataset) and canonical(ds) == EXPECTED
    assert len(ds.corpus) == 5  # "Bikes are red." is one document, named by both queries


@pytest.mark.parametrize("fmt,suffix", [("llamaindex", ".json"), ("pairs", ".jsonl"), ("cohere", ".jsonl"), ("csv", ".csv")])
def test_convert_round_trips_through_every_format(tmp_path, fmt, suffix):
    src = tmp_path / "c.jsonl"
    src.write_text(COHERE)
    out = tmp_path / f"out{suffix}"
    run = run_cli("data", "convert", str(src), "--out", str(out), "--to", fmt)
    assert run.returncode == 0, run.stderr
    assert canonical(read_dataset(out, fmt)) == EXPECTED
    back = tmp_path / "back.jsonl"
    write_dataset(read_dataset(out, fmt), back, "cohere")
    assert canonical(read_dataset(back)) == EXPECTED


def test_llamaindex_json_without_negatives_stays_llamaindex(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"query": "q one", "positive": "p one"}\n{"query": "q two", "positive": "p two"}\n')
    body = json.loads(dataset_bytes(read_dataset(src), "llamaindex"))
    assert set(body) == {"queries", "corpus", "relevant_docs", "mode"}  # what LlamaIndex's from_json reads


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("a.jsonl", '{"query": "q", "positive": "p"}\n{"query": "q", "positive": 3}\n', r"a\.jsonl:2: field 'positive': Expected `str`, got `int`"),
        ("b.jsonl", '{"query": "q", "positive": "p"}\n\n{"query": "q", "postive": "p"}\n', r"b\.jsonl:3: .*unknown field `postive`.*query, positive, negative, negatives"),
        ("c.jsonl", '{"query": "  ", "positive": "p"}\n', r"c\.jsonl:1: field 'query' is empty"),
        ("d.jsonl", '{"query": "q", "positive": "p"}\n{"query": "q", "positive": "p"\n', r"d\.jsonl:2: not valid JSON"),
        ("e.jsonl", '{"query": "q", "relevant_passages": []}\n', r"e\.jsonl:1: field 'relevant_passages' is empty"),
        ("f.jsonl", '{"query": "q", "relevant_passages": ["a", ""], "hard_negatives": ["b"]}\n', r"f\.jsonl:1: field 'relevant_passages\[1\]' is empty"),
        ("g.jsonl", '{"query": "q", "positive": "p", "negative": "p"}\n', r"g\.jsonl:1: a negative is the same text as a positive"),
        ("g2.jsonl", '{"query": "q", "positive": "p", "negative": "n"}\n{"query": "q", "positive": "n"}\n', r"g2\.jsonl:2: a positive is the same text as a negative of this query on an earlier line"),
        ("h.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', r"h\.jsonl:2: field 'label': Expected `int \| str`, got `null`"),
        ("i.csv", "query,positive\nq,p\nq\n", r"i\.csv:3: the row has 1 values, not 2"),
        ("j.csv", "question,answer\nq,p\n", r"j\.csv:1: the header has columns \['answer', 'question'\]"),
        ("k.csv", 'query,positive\nq,""\n', r"k\.csv:2: field 'positive' is empty"),
        ("l.csv", 'query,positive\n"q,p\n', r"l\.csv:\d+: .*"),
        ("m.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', r"m\.jsonl: every text has label 'x'"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_dataset(path)


def test_convert_refuses_to_drop_documents_no_query_names(tmp_path):
    src = tmp_path / "d.json"
    src.write_text(json.dumps({"queries": {"q": "question"}, "corpus": {"a": "answer", "x": "distractor"}, "relevant_docs": {"q": ["a"]}}))
    with pytest.raises(DatasetError, match="1 corpus documents are named by no query"):
        write_dataset(read_dataset(src), tmp_path / "out.jsonl")
    write_dataset(read_dataset(src), tmp_path / "out.jsonl", drop_unreferenced=True)
    assert len(read_dataset(tmp_path / "out.jsonl").corpus) == 1


def test_labelled_data_converts_only_to_labelled_formats(tmp_path):
    src = tmp_path / "l.jsonl"
    src.write_text(LABELLED)
    ds = read_dataset(src)
    assert isinstance(ds, LabelledDataset) and ds.labels.count("billing") == 2
    write_dataset(ds, tmp_path / "l.csv")
    assert read_dataset(tmp_path / "l.csv") == ds
    with pytest.raises(DatasetError, match="labelled data has no queries"):
        write_dataset(ds, tmp_path / "l.json")
    task = ds.to_retrieval()
    # every label's held-out half searches for the other half of its label
    assert len(task.queries) == 2 and all(len(docs) == 1 for docs in task.relevant_docs.values())
    for q, docs in task.relevant_docs.items():
        assert ds.labels[ds.texts.index(task.queries[q])] == ds.labels[ds.texts.index(task.corpus[docs[0]])]


# ------------------------------------------------------------------------------------------- mining
def test_mined_negatives_skip_positives_and_near_duplicates(minilm, tmp_path):
    corpus = {
        "pos": "Lyft's revenue grew 36% in 2021 as rides recovered.",
        "dup": "Lyft's revenue grew 36% in 2021 as rides recovered!",  # an unlabelled copy of the positive
        "near": "Lyft's revenue in 2020 fell as rides dropped during the pandemic.",
        "far1": "Bikes and scooters are available in several cities.",
        "far2": "Our headquarters are in San Francisco.",
        "far3": "Insurance reserves may prove inadequate.",
    }
    ds = QADataset(queries={"q": "How much did Lyft's revenue grow in 2021?"}, corpus=corpus, relevant_docs={"q": ["pos"]})
    data = embed_dataset(minilm, ds)
    mined, report = mine(ds, data, MiningSettings(num_negatives=2, near_duplicate=0.95))
    negatives = mined.hard_negatives["q"]
    assert "pos" not in negatives and "dup" not in negatives and report.skipped["near_duplicate"] == 1
    assert negatives[0] == "near" and len(negatives) == 2  # the best-ranked real negative comes first
    # ranks and margins are honoured: skipping the top rank, and a margin no candidate can meet
    skipped_top, _ = mine(ds, data, MiningSettings(num_negatives=1, range_min=2))
    assert skipped_top.hard_negatives["q"][0] not in ("near", "dup")
    none, report = mine(ds, data, MiningSettings(num_negatives=2, absolute_margin=2.0))
    assert not none.hard_negatives and report.skipped["margin"] > 0


def test_mine_negatives_command_writes_a_repeatable_dataset(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(PAIRS)
    out = tmp_path / "mined.json"
    run = run_cli("data", "mine-negatives", str(src), "--out", str(out), "--num-negatives", "1", "--cache", str(tmp_path / "c.sqlite3"))
    assert run.returncode == 0, run.stderr
    ds = load_dataset(out)
    given = read_dataset(src)
    for q in ds.queries:  # the negatives the file gave are kept, one mined negative added per query
        assert ds.hard_negatives[q][: len(given.hard_negatives[q])] == given.hard_negatives[q]
        assert not set(ds.hard_negatives[q]) & set(ds.relevant_docs[q])
    assert "hard negatives for 2 of 2 queries" in run.stderr
