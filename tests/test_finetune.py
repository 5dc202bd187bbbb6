"""Full fine-tuning on a small slice (real MiniLM, real sentence-transformers trainer), compared with the base
by `embedlift eval --finetuned`, then served: a real `embedlift serve --base <fine-tuned>` re-indexes a
collection built with the original base in the background and serves it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from embedlift.models.encoders import LocalEncoder
from embedlift.models.spec import BaseSpec
from embedlift.training.dataset import load_dataset
from embedlift.training.finetuning import (
    INFO_FILE,
    FinetuneSettings,
    finetune_model,
    pair_rows,
)
from embedlift.training.retrieval import embed_dataset

from tests.helpers import run_cli, start_server, stop_server

pytest.importorskip("datasets", reason="the finetune extra (sentence-transformers[train]) is not installed")

# Arbitrary (code name -> colour) facts: the base cannot know which passage answers which question, so a
# fine-tune that learns its training pairs must beat it on them.
NAMES = ["Alder", "Birch", "Cedar", "Dogwood", "Elm", "Fir", "Ginkgo", "Hazel", "Ivy", "Juniper", "Larch", "Maple",
         "Nutmeg", "Oak", "Pine", "Quince", "Rowan", "Spruce", "Teak", "Upas", "Vine", "Willow", "Yew", "Zelkova"]
COLOURS = ["crimson", "teal", "amber", "violet", "olive", "indigo", "coral", "ochre"]

pytestmark = pytest.mark.slow  # fine-tunes the real model


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Path:
    rng = random.Random(3)
    codes = rng.sample(range(100, 999), len(NAMES))
    queries, corpus, relevant = {}, {}, {}
    for i, (name, code) in enumerate(zip(NAMES, codes, strict=True)):
        queries[f"q{i}"] = f"Which colour was assigned to project {name}?"
        corpus[f"d{i}"] = f"Record {code}: the assigned colour is {COLOURS[i % len(COLOURS)]}."
        relevant[f"q{i}"] = [f"d{i}"]
    path = tmp_path_factory.mktemp("ft") / "facts.json"
    path.write_text(json.dumps({"queries": queries, "corpus": corpus, "relevant_docs": relevant}))
    return path


@pytest.fixture(scope="module")
def finetuned(facts, tmp_path_factory) -> Path:
    """`embedlift finetune` validated on its own training pairs: the best step must beat the base there."""
    out = tmp_path_factory.mktemp("ftmodel") / "facts-minilm"
    run = subprocess.run(
        [sys.executable, "-m", "embedlift.service.cli", "finetune", str(facts), "--val", str(facts), "--out", str(out),
         "--epochs", "4", "--lr", "2e-4", "--train-batch-size", "8", "--eval-steps", "3", "--max-seq-length", "64"],
        capture_output=True, text=True, env=env(), timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fine-tuned in" in run.stderr
    return out


def test_finetune_writes_a_model_usable_as_base(finetuned, minilm):
    info = json.loads((finetuned / INFO_FILE).read_text())
    assert info["improved"] and info["best_step"] > 0
    assert info["val"]["mrr@10"] > info["base_val"]["mrr@10"]
    assert len(info["history"]) >= 2 and all("mrr@10" in h for h in info["history"])  # evaluated during training
    tuned = LocalEncoder(finetuned, precision="fp32", runtime="torch")
    assert tuned.dim == minilm.dim and tuned.fingerprint != minilm.fingerprint
    v = tuned.encode(["Which colour was assigned to project Oak?"], "query")
    assert v.shape == (1, minilm.dim) and abs(float(np.linalg.norm(v)) - 1) < 1e-4


def test_eval_compares_base_and_finetuned_on_one_table(finetuned, facts, tmp_path):
    run = run_cli("eval", str(facts), "--finetuned", str(finetuned), "--json", "--cache", str(tmp_path / "c.sqlite3"))
    assert run.returncode == 0, run.stderr[-2000:]
    table = json.loads(run.stdout)
    assert set(table) == {"base", finetuned.name}
    info = json.loads((finetuned / INFO_FILE).read_text())
    # the same windowed metrics the trainer's evaluator reported for the kept step
    assert table[finetuned.name]["mrr@10"] == pytest.approx(info["val"]["mrr@10"], abs=1e-4)
    assert table["base"]["mrr@10"] == pytest.approx(info["base_val"]["mrr@10"], abs=1e-4)


def test_training_pairs_use_the_best_window_and_dataset_negatives(minilm, tmp_path):
    """A long passage trains on the window the base ranks best for the query (never a silent truncation),
    and the dataset's hard negatives become negative columns."""
    filler = " ".join(f"Paragraph {i} is about unrelated logistics." for i in range(80))
    ds_path = tmp_path / "d.json"
    ds_path.write_text(json.dumps({
        "queries": {"q1": "When did the scooter fleet expand?", "q2": "Who audits the accounts?"},
        "corpus": {"long": filler + " The scooter fleet expanded in March 2021.", "a": "Our auditor is a large firm.", "n": "Bikes are red."},
        "relevant_docs": {"q1": ["long"], "q2": ["a"]},
        "hard_negatives": {"q1": ["n"], "q2": ["n"]},
    }))
    ds = load_dataset(ds_path)
    rows, k = pair_rows(ds, embed_dataset(minilm, ds), max_negatives=1)
    assert k == 1 and rows["negative_1"] == ["Bikes are red.", "Bikes are red."]
    assert "expanded in March 2021" in rows["positive"][0] and len(rows["positive"][0]) < len(ds.corpus["long"])


def test_labelled_data_finetunes_with_the_batch_triplet_loss(tmp_path):
    from embedlift.training.formats import LabelledDataset

    texts = [f"{w} {n}" for w in ("invoice", "refund", "password") for n in ("help", "question", "issue", "problem")]
    labels = [t.split()[0] for t in texts]
    ds = LabelledDataset(texts=texts, labels=labels)
    train, held = ds.split(0.5, seed=0)
    result = finetune_model(BaseSpec(max_seq_length=32), train, held.to_retrieval(), tmp_path / "m", FinetuneSettings(epochs=1, batch_size=6))
    assert (tmp_path / "m" / "modules.json").is_file() and result.train_rows == len(train.texts)


# ------------------------------------------------------------------------------------------ serving
def wait_for_job(url: str, job: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = httpx.get(f"{url}/jobs/{job}").json()
        if info["status"] in ("succeeded", "failed"):
            return info
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not finish in {timeout} s")


def test_serving_a_finetuned_base_reindexes_collections_in_the_background(finetuned, minilm, tmp_path):
    data, adapters = tmp_path / "data", tmp_path / "adapters"
    docs = [{"id": f"d{i}", "text": f"Record {i}: the assigned colour is {COLOURS[i % 8]}. " * (1 + 40 * (i == 3))} for i in range(12)]
    proc, url = start_server(data, adapters)
    try:
        assert httpx.put(f"{url}/collections/facts").status_code == 201
        assert httpx.post(f"{url}/collections/facts/documents", json={"documents": docs}).status_code == 200
    finally:
        assert stop_server(proc) == 0

    proc, url = start_server(data, adapters, "--base", str(finetuned))
    try:
        info = httpx.get(f"{url}/collections/facts").json()
        assert info["status"] == "base_mismatch" and info["base_fingerprint"] == minilm.fingerprint
        refused = httpx.post(f"{url}/collections/facts/search", json={"query": "teal", "k": 3})
        assert refused.status_code == 409 and "POST /collections/facts/reindex" in refused.json()["detail"]

        started = httpx.post(f"{url}/collections/facts/reindex")
        assert started.status_code == 202, started.text
        job = started.json()["job"]["id"]
        assert started.headers["location"] == f"/jobs/{job}"
        again = httpx.post(f"{url}/collections/facts/reindex")
        assert again.status_code == 409  # already being re-indexed, or already on this base
        done = wait_for_job(url, job)
        assert done["status"] == "succeeded", done.get("error")
        assert done["done"] == done["total"] == len(docs)
        assert done["result"]["previous_base"] == minilm.fingerprint

        tuned = LocalEncoder(finetuned, precision="fp32", runtime="torch")
        info = httpx.get(f"{url}/collections/facts").json()
        assert info["status"] == "ready" and info["base_fingerprint"] == tuned.fingerprint and info["documents"] == len(docs)
        hits = httpx.post(f"{url}/collections/facts/search", json={"query": "the assigned colour is teal", "k": 3}).json()
        # the served ranking is the fine-tuned model's: brute force over each document's best window
        from embedlift.models.windows import embed_documents, embed_pooled

        embedded = embed_documents(tuned, [d["text"] for d in docs])
        q, _ = embed_pooled(tuned, ["the assigned colour is teal"], "query")
        best = [float((vectors @ q[0]).max()) for _, vectors in embedded.per_document()]
        expected = [docs[i]["id"] for i in np.argsort(best)[::-1][:3]]
        assert [h["id"] for h in hits["hits"]] == expected
        assert httpx.post(f"{url}/collections/facts/reindex").status_code == 409  # now on this base: nothing to do
    finally:
        assert stop_server(proc) == 0
