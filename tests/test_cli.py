"""The `embedlift` CLI end to end: the real entry point (argument parsing, the library, the one-line errors),
real files, the real model. Commands run in this process (``run_cli``); ``test_spec.py`` runs the real
executable for the one-line errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from embedlift.models.adapters import AdapterConfig, build_adapter
from embedlift.models.checkpoint import BaseInfo, save_checkpoint

from tests.helpers import Ran, run_cli


def run(*args: str, cache: Path, check: bool = True) -> Ran:
    proc = run_cli(*args, env={"EMBEDLIFT_CACHE": str(cache)})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def trained(lyft_slice, shared_cache, tmp_path_factory):
    """A linear adapter selected on its own training queries (``--val`` the same file): 42 pairs are too
    few to beat the base on held-out questions, and the issue asks for a gain on the training queries."""
    out = tmp_path_factory.mktemp("adapters") / "slice-linear"
    proc = run("train", str(lyft_slice), "--kind", "linear", "--out", str(out), "--val", str(lyft_slice), "--epochs", "15", cache=shared_cache)
    return out, proc


@pytest.mark.slow
def test_train_writes_a_checkpoint_with_settings_and_metrics(trained):
    out, proc = trained
    config = json.loads((out / "config.json").read_text())
    assert config["name"] == "slice-linear" and config["kind"] == "linear"
    assert config["base"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert config["training"]["lr"] == 2e-3 and config["training"]["seed"] == 0
    assert "base_val" in config["metrics"] and "created" in config
    fusion = config["fusion"]  # the hybrid dense weight fitted on validation, for English BM25
    assert 0 <= fusion["alpha"] <= 1 and fusion["lexical"] == {"language": "english"} and fusion["metric"] == "mrr@10"
    assert set(fusion["validation"]) == {"dense", "hybrid"} and "mrr@10" in fusion["validation"]["hybrid"]
    assert "documents longer than the model's window were split into windows" in proc.stderr
    assert "saved adapter 'slice-linear'" in proc.stderr


def test_eval_json_is_only_json_and_the_adapter_beats_base(trained, lyft_slice, shared_cache):
    out, _ = trained
    proc = run("eval", str(lyft_slice), "--adapter", str(out), "--json", cache=shared_cache)
    result = json.loads(proc.stdout)  # stdout is exactly the JSON
    assert set(result) == {"base", "slice-linear"}
    assert set(result["base"]) == {f"{m}@{k}" for m in ("hit_rate", "mrr", "recall", "precision", "ndcg", "map") for k in (1, 3, 5, 10)}
    # the adapter saw these queries in training: it must rank them better than the base
    assert result["slice-linear"]["mrr@10"] > result["base"]["mrr@10"]
    assert "0 computed" in proc.stderr  # every base vector came from the cache


@pytest.mark.slow
def test_eval_table_and_report(trained, lyft_slice, shared_cache, tmp_path):
    out, _ = trained
    proc = run("eval", str(lyft_slice), "--adapter", str(out), "--k", "1,5", "--report", str(tmp_path / "r.html"), cache=shared_cache)
    assert "hit_rate@5" in proc.stdout and "slice-linear" in proc.stdout and "bootstrap" in proc.stdout
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "slice-linear" in page
    run("eval", str(lyft_slice), "--report", str(tmp_path / "r.png"), cache=shared_cache)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_second_train_runs_no_model_and_the_guard_speaks_plainly(trained, lyft_slice, shared_cache, tmp_path):
    # default validation: 10% of the slice's documents (3) held out, where the base is already near perfect
    proc = run("train", str(lyft_slice), "--kind", "mlp", "--out", str(tmp_path / "m"), "--epochs", "3", cache=shared_cache)
    assert proc.stderr.count(" 0 computed") == 2  # train and validation both fully cached
    assert "did not beat the base on validation" in proc.stderr and "kept the identity adapter" in proc.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["metrics"]["improved"] is False


def _fail(*args: str, cache: Path) -> str:
    proc = run(*args, cache=cache, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("embedlift: error:")]
    assert len(lines) == 1
    return lines[0]


def test_errors_are_one_line_exit_2(tmp_path, lyft_slice, shared_cache):
    assert "does not exist" in _fail("train", str(tmp_path / "none.json"), "--out", str(tmp_path / "o"), cache=shared_cache)
    (tmp_path / "bad.json").write_text("{nope")
    assert "not valid JSON" in _fail("eval", str(tmp_path / "bad.json"), cache=shared_cache)
    (tmp_path / "invalid.json").write_text(json.dumps({"queries": {"q": "x"}, "corpus": {"d": "y"}, "relevant_docs": {"q": ["zz"]}}))
    assert "'q -> zz'" in _fail("eval", str(tmp_path / "invalid.json"), cache=shared_cache)
    assert "--k must be" in _fail("eval", str(lyft_slice), "--k", "a,b", cache=shared_cache)


def test_adapter_for_another_base_is_refused(tmp_path, lyft_slice, shared_cache):
    foreign = BaseInfo(name="other-model", fingerprint="other-model:abc", dim=384, details={})
    save_checkpoint(build_adapter(AdapterConfig(kind="linear", dim=384)), tmp_path / "foreign", base=foreign)
    msg = _fail("eval", str(lyft_slice), "--adapter", str(tmp_path / "foreign"), "--base", "sentence-transformers/all-MiniLM-L6-v2", cache=shared_cache)
    assert "trained on base other-model" in msg


def test_adapters_named_base_or_twice_are_refused(trained, tmp_path, lyft_slice, shared_cache):
    out, _ = trained
    assert "share the name 'slice-linear'" in _fail("eval", str(lyft_slice), "--adapter", str(out), "--adapter", str(out), "--json", cache=shared_cache)
