"""Prometheus metrics beyond Litestar's per-route ones (requests, latency, in progress).

Module-level, in prometheus-client's default registry, as the client library expects; the cache and adapter
figures are read from the engine at scrape time, so they never drift from the truth.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from embedlift.models.errors import UnavailableError

if TYPE_CHECKING:
    from embedlift.models.encoders import Encoder
    from embedlift.service.engine import Engine

EMBED_INPUTS = Histogram(
    "embedlift_request_inputs",
    "Inputs per embedding request (the batch the model sees per request)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)

BATCH_INPUTS = Histogram(
    "embedlift_batch_inputs",
    "Inputs per model call after dynamic batching (requests coalesced into one forward pass)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

_engine: weakref.ReferenceType[Engine] | None = None


class EngineCollector(Collector):
    """The base as it runs, cache hits and misses (request path), queued inputs, the active adapter's version,
    documents per collection."""

    def collect(self) -> Iterator:
        engine = _engine() if _engine is not None else None
        if engine is None:
            return
        yield from base_metrics(engine.base)
        stats = engine.encoder.stats
        lookups = CounterMetricFamily("embedlift_cache_lookups", "Base-embedding cache lookups", labels=["result"])
        lookups.add_metric(["hit"], stats.cached)
        lookups.add_metric(["miss"], stats.computed)
        yield lookups
        total = stats.cached + stats.computed
        yield GaugeMetricFamily("embedlift_cache_hit_ratio", "Share of model inputs served from the cache", value=stats.cached / total if total else 0.0)
        yield GaugeMetricFamily("embedlift_queued_inputs", "Inputs waiting for the model", value=engine.batcher.queued)
        active = engine.active
        adapter = GaugeMetricFamily("embedlift_active_adapter_version", "Version of the active adapter (0 = base)", labels=["adapter"])
        adapter.add_metric([active.name if active else "base"], active.version if active else 0)
        yield adapter
        docs = GaugeMetricFamily("embedlift_collection_documents", "Documents per collection", labels=["collection"])
        for c in engine.collections.all():
            try:
                docs.add_metric([c.name], c.counts()[0])
            except UnavailableError:  # the store is down: /ready says so; the rest of the metrics still answer
                continue
        yield docs


def base_metrics(base: Encoder) -> Iterator[GaugeMetricFamily]:
    """What the base runs on, as an info gauge (replicas on different hardware may choose differently, with the
    same fingerprint), and the seconds each runtime x precision ``auto`` timed at load took on its timing set."""
    described = base.describe()
    info = GaugeMetricFamily(
        "embedlift_base_info", "The base model and how it runs (value 1)", labels=["model", "fingerprint", "device", "runtime", "precision"],
    )
    fields = [str(described.get(k) or "") for k in ("device", "runtime", "precision")]
    info.add_metric([base.name, base.fingerprint, *fields], 1)
    yield info
    timings = getattr(base, "timings", {})
    if timings:
        timed = GaugeMetricFamily(
            "embedlift_base_load_timing_seconds", "Seconds each candidate auto timed at load took on its timing set (the fastest of three turns)",
            labels=["candidate"],
        )
        for name, seconds in timings.items():
            timed.add_metric([name], seconds)
        yield timed


REGISTRY.register(EngineCollector())


def track_engine(engine: Engine) -> None:
    """Report on ``engine`` (the latest one built: a process serves one)."""
    global _engine
    _engine = weakref.ref(engine)
