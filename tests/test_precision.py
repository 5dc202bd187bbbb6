"""Precision and device: ``auto`` picks bf16 where the CPU has the instructions for it and keeps it only when it
gives fp32's vectors (cosine >= 0.9999 on a fixed probe set), so the fingerprint stays fp32's, and, on a CPU, only
when it also runs faster than fp32 there; a precision below the bound falls back to fp32 and says so with both
numbers; a CUDA device that is not there is a clear error. A GPU test runs where torch sees CUDA."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch

from embedlift.models import encoders, precision
from embedlift.models.encoders import LocalEncoder
from embedlift.models.errors import InvalidInputError
from embedlift.models.precision import MIN_COSINE, PROBE, cpu_has_fast_bf16, min_cosine, resolve_precision
from tests.helpers import run_cli

QUESTIONS = ["How many riders did Lyft have?", "What are the risk factors?", "Who bought the self-driving unit?"]


@pytest.fixture(scope="module")
def auto():
    return LocalEncoder(precision="auto", device="auto")


def preferred(timings: dict[str, float]) -> str:
    """The rule the encoder states: the first candidate, unless a later one runs ``SPEEDUP`` times as fast as the
    best before it."""
    names = list(timings)
    best = names[0]
    for name in names[1:]:
        if timings[name] * encoders.SPEEDUP <= timings[best]:
            best = name
    return best


def test_auto_is_bf16_on_a_cpu_that_runs_it_faster_and_keeps_fp32s_fingerprint(auto, minilm):
    assert auto.device == ("cuda" if torch.cuda.is_available() else "cpu")
    if auto.device == "cpu":  # what auto left open was timed at load, in order of preference
        runtimes = ["torch", "openvino"] if importlib.util.find_spec("openvino") else ["torch"]
        precisions = ["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]
        names = [f"{r} {p}" for p in precisions for r in runtimes]
        assert list(auto.timings) == (names if len(names) > 1 else [])
        assert all(0 < v < 60 for v in auto.timings.values())
        assert f"{auto.runtime} {auto.precision}" == (preferred(auto.timings) if auto.timings else "torch fp32")
    assert auto.fingerprint == minilm.fingerprint  # lossless: caches, collections and adapters stay shared
    assert auto.fidelity >= MIN_COSINE
    assert auto.spec.precision == auto.precision and auto.describe()["precision_fidelity"] == auto.fidelity
    texts = [*QUESTIONS, PROBE[-2]]
    assert min_cosine(minilm.encode(texts, "query"), auto.encode(texts, "query")) >= MIN_COSINE


def test_a_precision_below_the_bound_falls_back_to_fp32_and_logs_both_numbers(monkeypatch, caplog, minilm):
    if not cpu_has_fast_bf16() and not torch.cuda.is_available():
        pytest.skip("no bf16 here to fall back from")
    monkeypatch.setattr(precision, "MIN_COSINE", 1.0 + 1e-9)  # no precision but fp32 can meet this
    with caplog.at_level(logging.WARNING):
        strict = LocalEncoder(precision="bf16", device="cpu")
    assert strict.precision == "fp32" and strict.fidelity < 1.0 + 1e-9
    assert "minimum cosine to torch fp32 on the probe set" in caplog.text and "running in torch fp32" in caplog.text
    np.testing.assert_allclose(strict.encode(QUESTIONS, "query"), minilm.encode(QUESTIONS, "query"), atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available() or not cpu_has_fast_bf16(), reason="needs a CPU with bf16 instructions")
def test_auto_keeps_bf16_only_where_it_runs_faster_and_says_which_it_chose(monkeypatch, caplog, minilm):
    """The two branches of the speed check, forced by the margin bf16 must beat: an unreachable one leaves fp32
    (the vectors are torch fp32's), none keeps bf16; an explicit ``--precision bf16`` is never timed."""
    monkeypatch.setattr(encoders, "SPEEDUP", 1e9)
    with caplog.at_level(logging.INFO, logger="embedlift.models.encoders"):
        slow = LocalEncoder(precision="auto", runtime="torch")
    assert slow.precision == "fp32" and slow.fidelity == 1.0 and list(slow.timings) == ["torch fp32", "torch bf16"]
    assert "short questions ran in torch fp32" in caplog.text and "running torch fp32" in caplog.text
    np.testing.assert_allclose(slow.encode(QUESTIONS, "query"), minilm.encode(QUESTIONS, "query"), atol=1e-6)
    monkeypatch.setattr(encoders, "SPEEDUP", 0.0)
    assert LocalEncoder(precision="auto", runtime="torch").precision == "bf16"
    monkeypatch.setattr(encoders, "SPEEDUP", 1e9)
    asked = LocalEncoder(precision="bf16", runtime="torch")
    assert asked.precision == "bf16" and asked.timings == {}


def test_devices_and_precisions_that_cannot_run_are_refused(lyft_slice):
    with pytest.raises(InvalidInputError, match="fp16 runs on CUDA devices only"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(InvalidInputError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidInputError, match="sees no CUDA device; use --device cpu or auto"):
        LocalEncoder(device="cuda")
    ran = run_cli("eval", str(lyft_slice), "--device", "cuda:1")
    assert ran.returncode == 2 and "sees no CUDA device" in ran.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_a_gpu_the_vectors_are_the_cpus_within_the_bound(minilm):
    gpu = LocalEncoder(device="cuda", precision="auto")
    assert gpu.precision in ("bf16", "fp16") and gpu.fingerprint == minilm.fingerprint
    texts = [*QUESTIONS, *PROBE]
    assert min_cosine(minilm.encode(texts, "document"), gpu.encode(texts, "document")) >= MIN_COSINE
