"""The short CI version of `benchmarks/load.py`: 64 clients for 10 s mixing embeds, OpenAI-style embeds,
searches and upserts while adapters swap every 100 ms. No errors; a 429 (deliberate overload) must carry
Retry-After; resident memory stays within a bound; the server still stops cleanly."""

from __future__ import annotations

import asyncio
import os

import pytest

from benchmarks.load import run_load
from tests.helpers import make_adapter, start_server, stop_server

SECONDS = float(os.environ.get("EMBEDLIFT_LOAD_SECONDS", "10"))
RSS_GROWTH_MB = 300  # the request cache is bounded (256 MB by default), so is everything else on the path

pytestmark = pytest.mark.slow  # a real server under 64 clients for 10 s


def test_64_clients_with_adapter_swaps_every_100ms(minilm, tmp_path):
    make_adapter(minilm, tmp_path / "adapters" / "alpha", seed=1)
    make_adapter(minilm, tmp_path / "adapters" / "beta", apply_to="both", seed=2)
    proc, url = start_server(tmp_path / "data", tmp_path / "adapters", "--watch-interval", "0")
    try:
        report = asyncio.run(run_load(url, proc.pid, clients=64, seconds=SECONDS, adapters=["alpha", "beta"]))
    finally:
        code = stop_server(proc)
    print("\n" + report.table())
    assert report.errors == []
    assert report.overloaded_without_retry_after == 0
    assert report.requests > 0 and set(report.latencies) == {"embed", "openai", "search", "upsert"}
    assert report.swaps >= SECONDS * 9 and report.swap_errors == 0  # one every 100 ms
    assert report.rss_end_mb - report.rss_start_mb < RSS_GROWTH_MB
    assert code == 0
