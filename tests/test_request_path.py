"""The request path on the real model: each input tokenised once, its ids handed to the model, forward passes
and queue batches sized by tokens, requests awaiting the queue on the event loop; and the OpenVINO runtime
checked against torch fp32 (converted once, compiled from its cache on a second start, pooling on one torch thread);
and the loaded engine kept out of the garbage collector's full passes while it serves."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import sys
from typing import Any

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from embedlift.models import encoders, precision
from embedlift.models.encoders import LocalEncoder, default_model_path
from embedlift.models.precision import MIN_COSINE, PROBE, cpu_has_fast_bf16, min_cosine
from embedlift.models.tokens import Tokenize, pad, token_batches
from embedlift.service.batching import BULK, INTERACTIVE, BatchQueue
from embedlift.service.http.app import SWITCH_INTERVAL
from embedlift.service.metrics import base_metrics
from tests.helpers import app_client

QUESTIONS = ["How many riders did Lyft have?", "What are the risk factors?", "Who bought the self-driving unit?"]


@pytest.fixture(scope="module")
def reference():
    return SentenceTransformer(str(default_model_path()), device="cpu")


class CountingTokenizer:
    """The encoder's tokenizer (``Tokenize``), counting the texts it is handed."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.texts = inner, 0

    def ids(self, texts: list[str]) -> Any:
        self.texts += len(texts)
        return self.inner.ids(texts)

    def ids_and_offsets(self, texts: list[str]) -> Any:
        self.texts += len(texts)
        return self.inner.ids_and_offsets(texts)


def test_token_batches_fill_a_budget_of_padded_tokens():
    passes = token_batches([10, 250, 12, 250, 11, 9], max_tokens=512, max_inputs=64)
    assert [p.tolist() for p in passes] == [[1, 3], [2, 4, 0, 5]]  # longest first; 2 x 250 <= 512 < 3 x 250
    assert [p.tolist() for p in token_batches([5] * 10, max_tokens=1000, max_inputs=4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [p.tolist() for p in token_batches([900, 3], max_tokens=512, max_inputs=8)] == [[0], [1]]  # too long: alone
    ids, mask = pad([np.array([1, 2, 3]), np.array([4])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    left, left_mask = pad([np.array([1, 2, 3]), np.array([4])], pad_id=0, left=True)
    assert left.tolist() == [[1, 2, 3], [0, 0, 4]] and left_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


TRICKY = [
    "What was Lyft's revenue?", "", "   ", "a", "naïve café — Ünïcödé, 東京 and emoji 🚗🚕", "[CLS] spelled [SEP] out [PAD]",
    "tabs\tand\nnewlines\r\n", "don't   split  words", "x" * 300, "Lyft " * 200,
]


def test_the_rust_tokenizer_called_directly_gives_the_wrappers_ids_and_offsets(minilm):
    """``Tokenize`` skips transformers' wrapper: the same ids and character spans, for one text and for many,
    through the Rust tokenizer and through the wrapper (a slow tokenizer's path)."""
    tokenizer = SentenceTransformer(str(default_model_path()), device="cpu").tokenizer
    direct, wrapped = Tokenize(tokenizer), Tokenize(tokenizer)
    wrapped._rust = None
    assert direct._rust is not None, "the packaged model has a fast tokenizer"
    expected = tokenizer(TRICKY, add_special_tokens=False, return_offsets_mapping=True)
    for tok in (direct, wrapped):
        ids, offsets = tok.ids_and_offsets(TRICKY)
        assert ids == expected["input_ids"] and offsets == [[tuple(o) for o in x] for x in expected["offset_mapping"]]
        assert tok.ids(TRICKY) == expected["input_ids"]
        assert [tok.ids([t])[0] for t in TRICKY] == expected["input_ids"]  # one text at a time: the same
    # the wrapper truncating elsewhere (ST's own encode does) does not reach the direct tokenizer
    long = "Lyft " * 600
    tokenizer([long], truncation=True, max_length=16)
    assert direct.ids([long]) == tokenizer([long], add_special_tokens=False)["input_ids"] and len(direct.ids([long])[0]) > 600


def test_an_input_is_tokenised_once_and_gets_sentence_transformers_vectors(minilm, reference, lyft):
    encoder = LocalEncoder(precision="fp32", runtime="torch", query_prompt="query: ", batch_tokens=1024)
    counting = encoder._tokenize = CountingTokenizer(encoder._tokenize)
    models_own = CountingTokenizer(None)  # sentence-transformers' own tokenising (encode -> preprocess) never runs

    def preprocess(*args: Any, **kwargs: Any) -> Any:
        models_own.texts += 1
        raise AssertionError("the model tokenised an input itself")

    encoder.model.preprocess = preprocess
    questions = list(lyft["queries"].values())[:40]
    spans = encoder.split(questions, "query")  # plans windows (one each) and keeps the ids
    assert all(len(s) == 1 for s in spans) and counting.texts == len(questions)
    lengths = encoder.input_lengths(questions, "query")  # what the queue budgets with
    counts = encoder.count_tokens(questions)  # what usage reports
    vectors = encoder.encode(questions, "query")
    assert counting.texts == len(questions) and models_own.texts == 0, "tokenised again after planning"
    expected = reference.encode(questions, prompt="query: ", normalize_embeddings=True)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert lengths == [len(x) for x in reference.tokenizer([f"query: {q}" for q in questions])["input_ids"]]
    assert counts == [len(x) for x in reference.tokenizer(questions)["input_ids"]]
    # a passage past the window: each window is tokenised when it reaches the model, and equals ST's own
    passage = max(lyft["corpus"].values(), key=len)
    windows = encoder.split([passage], "document")[0]
    assert len(windows) > 1
    texts = [passage[a:b] for a, b in windows]
    np.testing.assert_allclose(encoder.encode(texts, "document"), reference.encode(texts, normalize_embeddings=True), atol=1e-5)
    assert len(encoder._memo) == 0 and len(encoder._counts) <= 1  # nothing kept once used (the long one's count unread)


def test_the_queue_budgets_tokens_and_requests_await_it_on_the_event_loop(minilm, lyft):
    passages = list(lyft["corpus"].values())[:24]
    windows = [p[a:b] for p in passages for a, b in minilm.split([p], "document")[0]]
    queue = BatchQueue(minilm, max_batch_inputs=256, max_batch_tokens=2048)
    try:
        vectors = queue.submit(windows, "document", BULK).result(120)
        np.testing.assert_allclose(vectors, minilm.encode(windows, "document"), atol=1e-5)
        lengths = minilm.input_lengths(windows, "document")
        assert queue.stats.batches >= sum(lengths) // 2048 and max(queue.stats.sizes) < len(windows)

        async def many() -> list[np.ndarray]:
            # 16 requests awaiting at once from one thread: they coalesce into fewer model calls
            return await asyncio.gather(*(asyncio.wrap_future(queue.submit([q], "query", INTERACTIVE)) for q in QUESTIONS * 5))

        before = queue.stats.batches
        got = asyncio.run(many())
        alone = minilm.encode(QUESTIONS, "query")
        for i, v in enumerate(got):
            np.testing.assert_allclose(v[0], alone[i % 3], atol=1e-5)
        assert queue.stats.batches - before < len(got)
    finally:
        queue.close()


needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="the openvino extra is not installed")


@needs_openvino
def test_openvino_runs_within_the_bound_and_starts_from_its_cache(tmp_path, minilm, lyft, caplog):
    texts = [*QUESTIONS, *list(lyft["corpus"].values())[:6]]
    with caplog.at_level(logging.INFO):
        first = LocalEncoder(runtime="openvino", precision="fp32", compiled_dir=tmp_path)
    assert "converted" in caplog.text and first.runtime == "openvino" and first.fingerprint == minilm.fingerprint
    xml = next(tmp_path.glob("*/model.xml"))
    stamp = xml.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = LocalEncoder(runtime="openvino", precision="bf16", compiled_dir=tmp_path)
    assert "converted" not in caplog.text and xml.stat().st_mtime_ns == stamp  # read back, not converted again
    assert any((tmp_path / "compiled").iterdir())  # OpenVINO's compiled blobs
    for encoder in (first, again):
        windows = [t[a:b] for t in texts for a, b in encoder.split([t], "document")[0]]
        assert min_cosine(minilm.encode(windows, "document"), encoder.encode(windows, "document")) >= MIN_COSINE
    # bf16 where OpenVINO can compute in it; on a CPU without bf16 instructions it compiles fp32, and says it runs that
    import openvino

    has_bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert again.precision == ("bf16" if has_bf16 else "fp32") == again.spec.precision
    assert again.spec.runtime == "openvino" and again.describe()["precision_fidelity"] >= MIN_COSINE


@needs_openvino
def test_openvino_below_the_bound_falls_back_to_torch_fp32(tmp_path, monkeypatch, caplog, minilm):
    # No cosine reaches 2, so the fallback is forced on any CPU: where the CPU has no bf16, OpenVINO computes in
    # fp32 and its cosine to torch can round to just above 1 (seen on an AMD EPYC).
    monkeypatch.setattr(precision, "MIN_COSINE", 2.0)
    with caplog.at_level(logging.WARNING):
        encoder = LocalEncoder(runtime="openvino", precision="bf16", compiled_dir=tmp_path)
    assert (encoder.runtime, encoder.precision) == ("torch", "fp32") and "running in torch fp32" in caplog.text
    np.testing.assert_allclose(encoder.encode(QUESTIONS, "query"), minilm.encode(QUESTIONS, "query"), atol=1e-6)


@needs_openvino
@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="needs a CPU with bf16 instructions")
def test_openvino_auto_runs_its_own_fp32_where_bf16_is_not_faster(tmp_path, monkeypatch, minilm):
    """Where auto's bf16 loses the timing against fp32 on OpenVINO, OpenVINO's fp32 (checked against torch fp32 on
    the probe set) is run, not torch's."""
    monkeypatch.setattr(encoders, "SPEEDUP", 1e9)
    encoder = LocalEncoder(runtime="openvino", precision="auto", compiled_dir=tmp_path)
    assert (encoder.runtime, encoder.precision) == ("openvino", "fp32") and list(encoder.timings) == ["openvino fp32", "openvino bf16"]
    assert encoder.fidelity >= MIN_COSINE and encoder.fingerprint == minilm.fingerprint
    assert min_cosine(minilm.encode(PROBE, "document"), encoder.encode(PROBE, "document")) >= MIN_COSINE


@needs_openvino
def test_runtime_auto_runs_openvino_only_where_it_times_faster_than_torch(tmp_path, monkeypatch, caplog, minilm):
    """``--runtime auto`` on a CPU times torch against OpenVINO at load, in the precision asked for: forced by the
    margin OpenVINO must beat, an unreachable one leaves torch (its vectors exactly torch's), none takes OpenVINO
    (checked on the probe set); the log names both times and the choice, and an explicit runtime is never timed."""
    monkeypatch.setattr(encoders, "SPEEDUP", 1e9)
    with caplog.at_level(logging.INFO, logger="embedlift.models.encoders"):
        kept = LocalEncoder(runtime="auto", precision="fp32", compiled_dir=tmp_path)
    assert (kept.runtime, kept.precision, kept.fidelity) == ("torch", "fp32", 1.0)
    assert list(kept.timings) == ["torch fp32", "openvino fp32"] and all(0 < v < 60 for v in kept.timings.values())
    assert "short questions ran in torch fp32" in caplog.text and "running torch fp32" in caplog.text
    np.testing.assert_allclose(kept.encode(QUESTIONS, "query"), minilm.encode(QUESTIONS, "query"), atol=1e-6)
    metrics = {m.name: m for m in base_metrics(kept)}
    info = metrics["embedlift_base_info"].samples[0].labels
    assert (info["runtime"], info["precision"], info["fingerprint"]) == ("torch", "fp32", minilm.fingerprint)
    assert {s.labels["candidate"]: s.value for s in metrics["embedlift_base_load_timing_seconds"].samples} == kept.timings
    monkeypatch.setattr(encoders, "SPEEDUP", 0.0)
    faster = LocalEncoder(runtime="auto", precision="fp32", compiled_dir=tmp_path)
    assert (faster.runtime, faster.spec.runtime) == ("openvino", "openvino") and faster.fidelity >= MIN_COSINE
    assert faster.fingerprint == minilm.fingerprint
    assert min_cosine(minilm.encode(PROBE, "document"), faster.encode(PROBE, "document")) >= MIN_COSINE
    asked = LocalEncoder(runtime="openvino", precision="fp32", compiled_dir=tmp_path)
    assert asked.runtime == "openvino" and asked.timings == {}


@needs_openvino
def test_runtime_auto_drops_openvino_where_it_cannot_convert_the_model(tmp_path, monkeypatch, caplog, minilm):
    """A model OpenVINO cannot convert (here its converter raising, as it does for unsupported operations) runs on
    torch under ``--runtime auto``, with a warning that says why; ``--runtime openvino`` is refused instead."""
    import openvino

    def unsupported(*args, **kwargs):
        raise RuntimeError("Cannot convert operation aten::unsupported")

    monkeypatch.setattr(openvino, "convert_model", unsupported)
    with caplog.at_level(logging.WARNING):
        encoder = LocalEncoder(runtime="auto", precision="fp32", compiled_dir=tmp_path)
    assert (encoder.runtime, encoder.precision) == ("torch", "fp32") and encoder.timings == {}
    assert "OpenVINO could not run the model in fp32" in caplog.text and "aten::unsupported" in caplog.text
    np.testing.assert_allclose(encoder.encode(QUESTIONS, "query"), minilm.encode(QUESTIONS, "query"), atol=1e-6)
    with pytest.raises(RuntimeError, match="aten::unsupported"):
        LocalEncoder(runtime="openvino", precision="fp32", compiled_dir=tmp_path)


@needs_openvino
def test_openvino_pools_on_one_torch_thread_and_gives_the_caller_its_threads_back(tmp_path, minilm):
    # torch's OpenMP workers, woken for the pooling, would spin on the cores OpenVINO's next pass needs
    encoder = LocalEncoder(runtime="openvino", precision="fp32", compiled_dir=tmp_path)
    pooling = encoder._forward._rest[0]  # type: ignore[attr-defined]
    seen: list[int] = []
    forward = pooling.forward
    pooling.forward = lambda features: (seen.append(torch.get_num_threads()), forward(features))[1]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vectors = encoder.encode(QUESTIONS, "query")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert min_cosine(minilm.encode(QUESTIONS, "query"), vectors) >= MIN_COSINE


def test_serving_freezes_what_the_engine_loaded_and_hands_the_gil_over_quickly_until_it_stops(tmp_path):
    # a full collection over the loaded model's objects stopped every thread for about 0.3 s under load; the
    # batch worker waited up to Python's default switch interval for the GIL after each native call
    gc.unfreeze()
    before = sys.getswitchinterval()
    with app_client(tmp_path / "data", tmp_path / "adapters") as client:
        assert client.post("/embed", json={"input": "How many riders?"}).status_code == 200
        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
    assert gc.get_freeze_count() == 0
    assert sys.getswitchinterval() == pytest.approx(before)
