"""Dynamic batching, the request-path cache and the removed int8 backend, on the real model.

The batcher must (1) give every caller exactly the vectors the model gives its inputs alone, (2) coalesce
callers that wait together into one model call, (3) serve interactive work before bulk work, (4) refuse
past its bound with a 429 instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from embedlift.models.cache import CachedEncoder, MemoryCache
from embedlift.models.checkpoint import base_info
from embedlift.models.errors import BaseMismatchError, InvalidInputError, OverloadedError, UnavailableError
from embedlift.service.batching import BULK, INTERACTIVE, BatchedEncoder, BatchQueue

QUESTIONS = [f"What did Lyft report about {topic} in {year}?" for topic in ("drivers", "revenue", "insurance", "bikes") for year in (2019, 2020, 2021, 2022)]
PASSAGES = [" ".join(f"Sentence {i} of passage {p} on ride sharing economics and rider demand." for i in range(12)) for p in range(48)]


def test_concurrent_callers_share_model_calls_and_get_their_own_vectors(minilm):
    queue = BatchQueue(minilm, max_batch_inputs=64)
    try:
        busy = queue.submit(PASSAGES, "document", BULK)  # keeps the model busy while the callers line up
        results: dict[int, np.ndarray] = {}

        def call(i: int) -> None:
            results[i] = BatchedEncoder(queue).encode([QUESTIONS[i]], "query")

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        busy.result(60)
        alone = minilm.encode(QUESTIONS, "query")
        for i in range(len(QUESTIONS)):
            np.testing.assert_allclose(results[i][0], alone[i], atol=1e-5)
        # 16 single-query callers took fewer than 16 model calls (they queued behind the passages)
        assert queue.stats.inputs == len(PASSAGES) + len(QUESTIONS)
        assert queue.stats.batches < 1 + len(QUESTIONS)
    finally:
        queue.close()


def test_interactive_work_goes_before_queued_bulk_work(minilm):
    queue = BatchQueue(minilm, max_batch_inputs=8)
    try:
        first = queue.submit(PASSAGES[:8], "document", BULK)  # running
        bulk = queue.submit(PASSAGES[8:], "document", BULK)  # 40 more inputs: five batches
        time.sleep(0.05)
        query = queue.submit(QUESTIONS[:2], "query", INTERACTIVE)
        query.result(60)
        assert not bulk.done(), "the question waited for the whole bulk job"
        vectors = bulk.result(120)
        first.result(60)
        np.testing.assert_allclose(vectors, minilm.encode(PASSAGES[8:], "document"), atol=1e-5)
    finally:
        queue.close()


def test_a_full_queue_refuses_requests_and_makes_bulk_work_wait(minilm):
    queue = BatchQueue(minilm, max_batch_inputs=4, max_queued_inputs=8)
    try:
        running = queue.submit(PASSAGES[:4], "document", BULK)
        waiting = queue.submit(PASSAGES[4:12], "document", BULK)  # fills the queue (8)
        with pytest.raises(OverloadedError, match=r"maximum 8"):
            queue.submit(QUESTIONS[:2], "query", INTERACTIVE)
        assert OverloadedError.status_code == 429
        more = queue.submit(PASSAGES[12:16], "document", BULK)  # waits for room instead of failing
        for f in (running, waiting, more):
            f.result(120)
        np.testing.assert_allclose(more.result(), minilm.encode(PASSAGES[12:16], "document"), atol=1e-5)
    finally:
        queue.close()


def test_close_fails_queued_callers_instead_of_hanging(minilm):
    queue = BatchQueue(minilm, max_batch_inputs=4)
    queue.submit(PASSAGES[:4], "document", BULK)
    pending = queue.submit(PASSAGES[4:40], "document", BULK)
    queue.close()
    with pytest.raises(UnavailableError):
        pending.result(30)
    with pytest.raises(UnavailableError):
        queue.submit(["late"], "query")


def test_memory_cache_is_bounded_and_least_recently_used_goes_first():
    cache = MemoryCache(max_bytes=3 * (384 * 4 + MemoryCache.ENTRY_OVERHEAD))
    v = np.ones(384, np.float32)
    cache.put_many("fp", [(b"a", v), (b"b", v), (b"c", v)])
    assert set(cache.get_many("fp", [b"a"])) == {b"a"}  # a is now the most recent
    cache.put_many("fp", [(b"d", v)])
    assert set(cache.get_many("fp", [b"a", b"b", b"c", b"d"])) == {b"a", b"c", b"d"}
    assert cache.bytes <= cache.max_bytes and cache.count() == 3
    with pytest.raises(ValueError):
        MemoryCache(0)


def test_a_cache_hit_skips_the_model(minilm):
    queue = BatchQueue(minilm)
    try:
        encoder = CachedEncoder(BatchedEncoder(queue), MemoryCache(1 << 20), progress=False)
        first = encoder.encode(QUESTIONS[:4], "query")
        calls = queue.stats.batches
        again = encoder.encode(QUESTIONS[:4], "query")
        assert queue.stats.batches == calls and encoder.stats.cached == 4
        np.testing.assert_array_equal(first, again)
    finally:
        queue.close()


def test_engine_request_cache_can_be_turned_off(minilm, tmp_path):
    from embedlift.service.engine import Engine
    from embedlift.service.registry import AdapterRegistry, RegistryFile
    from embedlift.service.settings import Settings

    for cache_mb, model_calls in ((16, 1), (0, 2)):
        registry = AdapterRegistry(tmp_path / "adapters", RegistryFile(tmp_path / f"r{cache_mb}.json"), base_info(minilm))
        engine = Engine(minilm, registry, settings=Settings(data_dir=tmp_path / f"d{cache_mb}", cache_mb=cache_mb))
        try:
            a = asyncio.run(engine.embed(["net revenue in 2021"], "query")).vectors
            b = asyncio.run(engine.embed(["net revenue in 2021"], "query")).vectors
            np.testing.assert_allclose(a, b, atol=1e-6)
            assert engine.batcher.stats.batches == model_calls
        finally:
            engine.close()


# ------------------------------------------------------------------------------------------- int8
def test_int8_is_refused_with_the_reason_and_what_to_use(minilm, tmp_path):
    """``--backend int8`` was removed (its vectors were too far from float32's): a variable or a recorded spec
    asking for it, and an adapter trained on its vectors, are refused with the measured reason."""
    import json

    from embedlift.models.checkpoint import load_checkpoint
    from embedlift.models.spec import BaseSpec, load_base

    from .helpers import make_adapter

    with pytest.raises(InvalidInputError, match=r"was removed: torch's dynamic int8 gave a minimum cosine of 0.88.*--precision auto"):
        load_base(BaseSpec.from_sources({}, {"EMBEDLIFT_BACKEND": "int8"}))
    path = make_adapter(minilm, tmp_path / "int8-adapter")
    config = json.loads((path / "config.json").read_text())
    config["base"]["fingerprint"] += "+int8"  # as --backend int8 recorded it
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseMismatchError, match="was trained on int8 vectors.*re-trained"):
        load_checkpoint(path, expected=base_info(minilm))
