"""Custom adapter kinds, found through a real entry point (a distribution on the path with an
``embedlift.adapters`` entry point, as `pip install ./examples/lowrank_adapter` makes): trained, saved, loaded
and served like the built-in kinds. Also the other losses: the triplet loss on mined negatives, triplet
accuracy in `eval`, and labelled data trained with the batch semi-hard triplet loss."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from embedlift.models import adapters as adapters_module
from embedlift.models.adapters import AdapterConfig, adapter_kinds, build_adapter
from embedlift.models.checkpoint import (
    BaseInfo,
    base_info,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from embedlift.models.errors import CheckpointError, InvalidInputError

from tests.helpers import REPO, Ran, run_cli, start_server, stop_server

EXAMPLE = REPO / "examples" / "lowrank_adapter"
TOPICS = {
    "billing": ["I was charged twice", "refund my last order", "the invoice total is wrong", "cancel my subscription fee",
                "why is there an extra charge", "update my credit card"],
    "account": ["I cannot log in", "reset my password", "change my email address", "my account is locked",
                "two-factor code never arrives", "delete my profile"],
    "rides": ["the driver never arrived", "my ride was late", "the car was dirty", "driver took a longer route",
              "I left my phone in the car", "rate my last trip"],
}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """The example package as an installed distribution: its module and a dist-info with the entry point."""
    root = tmp_path_factory.mktemp("plugin")
    shutil.copy(EXAMPLE / "lowrank_adapter.py", root)
    info = root / "embedlift_lowrank_adapter-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: embedlift-lowrank-adapter\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[embedlift.adapters]\nlowrank = lowrank_adapter:LowRankAdapter\n")
    return root


@pytest.fixture
def registered(plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin))
    adapters_module._registered.cache_clear()
    yield
    adapters_module._registered.cache_clear()


def plugin_env(plugin: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}


def cli(*args: str) -> Ran:
    """The CLI in this process (a custom kind is found through ``registered``'s path entry)."""
    return run_cli(*args)


@pytest.fixture(scope="module")
def support(tmp_path_factory) -> Path:
    """A query/passage dataset in pairs JSONL: support questions and the canned answer of their topic."""
    rng = random.Random(0)
    lines = []
    for topic, questions in TOPICS.items():
        for i, q in enumerate(questions):
            lines.append({"query": q, "positive": f"Answer {i} for {topic}: {rng.choice(questions)} and similar requests are handled here."})
    path = tmp_path_factory.mktemp("support") / "support.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_a_registered_kind_builds_saves_and_loads(registered, minilm, tmp_path):
    assert "lowrank" in adapter_kinds()
    adapter = build_adapter(AdapterConfig(kind="lowrank", dim=minilm.dim, options={"rank": 4}))
    x = minilm.encode(["net revenue"], "query")
    np.testing.assert_allclose(adapter.transform(x), x, atol=1e-6)  # starts as the identity
    import torch

    with torch.no_grad():
        adapter.up.weight.normal_(0, 0.05)
    base = BaseInfo(name=minilm.name, fingerprint=minilm.fingerprint, dim=minilm.dim)
    save_checkpoint(adapter, tmp_path / "lr", base=base)
    assert read_config(tmp_path / "lr").options == {"rank": 4}
    loaded = load_checkpoint(tmp_path / "lr", expected=base_info(minilm))
    np.testing.assert_allclose(loaded.adapter.transform(x), adapter.transform(x), atol=1e-6)
    with pytest.raises(InvalidInputError, match=r"adapter kind 'lowrank' refused its config .*rank must be an integer"):
        build_adapter(AdapterConfig(kind="lowrank", dim=minilm.dim, options={"rank": "big"}))
    with pytest.raises(InvalidInputError, match="takes no options"):
        AdapterConfig(kind="linear", dim=minilm.dim, options={"rank": 4})


def test_without_the_package_the_kind_is_refused_with_what_to_install(registered, minilm, tmp_path, monkeypatch):
    adapter = build_adapter(AdapterConfig(kind="lowrank", dim=minilm.dim, options={"rank": 2}))
    save_checkpoint(adapter, tmp_path / "lr", base=BaseInfo(name=minilm.name, fingerprint=minilm.fingerprint, dim=minilm.dim))
    monkeypatch.setattr(adapters_module, "entry_points", lambda group: [])
    adapters_module._registered.cache_clear()
    with pytest.raises(CheckpointError, match=r"unknown adapter kind 'lowrank'.*entry point group 'embedlift.adapters'"):
        load_checkpoint(tmp_path / "lr")
    with pytest.raises(InvalidInputError, match=r"adapter kind must be one of \['linear', 'mlp'\], got 'lowrank'"):
        AdapterConfig(kind="lowrank", dim=minilm.dim)


@pytest.mark.slow
def test_a_custom_kind_trains_evaluates_and_serves_like_a_builtin(plugin, registered, support, minilm, tmp_path):
    env = plugin_env(plugin)
    adapters, data = tmp_path / "adapters", tmp_path / "data"
    run = cli("train", str(support), "--kind", "lowrank", "--option", "rank=8", "--out", str(adapters / "lr"),
              "--epochs", "3", "--val", str(support), "--cache", str(tmp_path / "c.sqlite3"))
    assert run.returncode == 0, run.stderr[-2000:]
    config = read_config(adapters / "lr")
    assert config.kind == "lowrank" and config.options == {"rank": 8}
    run = cli("eval", str(support), "--adapter", str(adapters / "lr"), "--json", "--cache", str(tmp_path / "c.sqlite3"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert set(json.loads(run.stdout)) == {"base", "lr"}

    proc, url = start_server(data, adapters, "--adapter", "lr", env={"PYTHONPATH": env["PYTHONPATH"]})
    try:
        body = httpx.post(f"{url}/embed", json={"input": ["I was charged twice"]}).json()
        assert body["adapter"].startswith("lr@")
        expected = load_checkpoint(adapters / "lr").adapter.transform(minilm.encode(["I was charged twice"], "query"))
        np.testing.assert_allclose(np.array([body["data"][0]["embedding"]], dtype=np.float32), expected, atol=1e-5)
    finally:
        assert stop_server(proc) == 0


# ------------------------------------------------------------------------------------- other losses
def test_triplet_loss_on_mined_negatives_and_triplet_accuracy_in_eval(support, tmp_path):
    mined = tmp_path / "mined.json"
    cache = str(tmp_path / "c.sqlite3")
    assert cli("data", "mine-negatives", str(support), "--out", str(mined), "--num-negatives", "2", "--range-min", "1", "--cache", cache).returncode == 0
    run = cli("train", str(mined), "--loss", "triplet", "--margin", "0.3", "--val", str(mined), "--epochs", "5",
              "--out", str(tmp_path / "trip"), "--cache", cache)
    assert run.returncode == 0, run.stderr[-2000:]
    config = read_config(tmp_path / "trip")
    assert config.training["loss"] == "triplet" and config.training["margin"] == 0.3
    assert config.metrics["improved"] and config.metrics["val"]["mrr@10"] > config.metrics["base_val"]["mrr@10"]
    run = cli("eval", str(mined), "--adapter", str(tmp_path / "trip"), "--json", "--cache", cache)
    table = json.loads(run.stdout)
    for distance in ("cosine", "dot", "euclidean", "manhattan"):
        for row in ("base", "trip"):
            assert 0 <= table[row][f"triplet_accuracy_{distance}"] <= 1
    # trained to push the mined negatives below the positives: better on exactly that
    assert table["trip"]["triplet_accuracy_cosine"] > table["base"]["triplet_accuracy_cosine"]
    table_text = cli("eval", str(mined), "--adapter", str(tmp_path / "trip"), "--cache", cache).stdout
    assert "triplet_accuracy_manhattan" in table_text


def test_labelled_data_trains_an_adapter_with_the_batch_triplet_loss(tmp_path):
    path = tmp_path / "tickets.csv"
    rows = [(q, topic) for topic, qs in TOPICS.items() for q in qs]
    path.write_text("text,label\n" + "".join(f'"{q}",{topic}\n' for q, topic in rows))
    cache = str(tmp_path / "c.sqlite3")
    run = cli("train", str(path), "--val", str(path), "--epochs", "8", "--out", str(tmp_path / "lab"), "--cache", cache)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "batch semi-hard triplet loss" in run.stderr
    config = read_config(tmp_path / "lab")
    assert config.apply_to == "both" and config.training["labelled"]  # both sides are texts of the same kind
    run = cli("eval", str(path), "--adapter", str(tmp_path / "lab"), "--json", "--cache", cache)
    assert run.returncode == 0, run.stderr[-2000:]
    table = json.loads(run.stdout)
    assert table["lab"]["hit_rate@1"] >= table["base"]["hit_rate@1"]
