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


# ------------------------------------------------------------------ property-based: malformed files
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from embedlift.service.cli import main  # noqa: E402

ids = st.text(max_size=6)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
# Near-misses of the real shape: the right keys with wrong, missing or dangling values.
near_datasets = st.fixed_dictionaries(
    {},
    optional={
        "queries": st.dictionaries(ids, st.text(max_size=20) | json_values, max_size=4),
        "corpus": st.dictionaries(ids, st.text(max_size=20) | json_values, max_size=4),
        "relevant_docs": st.dictionaries(ids, st.lists(ids, max_size=3) | json_values, max_size=4),
        "mode": json_values,
        "extra": json_values,
    },
)


def _loads_or_refuses(path) -> None:
    try:
        ds = load_dataset(path)
    except DatasetError as exc:
        assert str(path) in exc.message  # the message names the file
    else:
        assert isinstance(ds, QADataset) and ds.queries and ds.corpus


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
@example(data=b"[" * 100_000)  # nesting deeper than the JSON parser's recursion
@example(data=b'{"queries": ' + b"9" * 5000 + b"}")  # an integer past Python's digit limit
@example(data=b"\xff\xfe{\x00}\x00")  # UTF-16 with a BOM
@example(data=b'{"queries": {"q": "a", "q": "b"}, "corpus": {}, "relevant_docs": {}}')
def test_any_bytes_load_or_fail_with_a_dataset_error(tmp_path, data):
    path = tmp_path / "bytes.json"
    path.write_bytes(data)
    _loads_or_refuses(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=near_datasets | json_values)
def test_any_json_shape_loads_or_fails_with_a_dataset_error(tmp_path, raw):
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(raw))
    _loads_or_refuses(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[1, 2]", b'{"queries": {}, "corpus": {}, "relevant_docs": {}}', b'{"queries": {"q": "x"}, "corpus": {"d": "y"}, "relevant_docs": {"q": ["nope"]}}', b"[" * 100_000],
)
@pytest.mark.parametrize("command", ["eval", "train"])
def test_the_cli_reports_a_malformed_dataset_without_a_traceback(tmp_path, capsys, content, command):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    argv = [command, str(path)] + (["--out", str(tmp_path / "out")] if command == "train" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("embedlift: error:") and str(path) in err and "Traceback" not in err
