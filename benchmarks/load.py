"""Load with hot swaps: N concurrent clients for a fixed time mixing /embed, /v1/embeddings, /search and upserts
while adapters are swapped every 100 ms; throughput, p50/p99, errors and resident memory at start and end.

    python benchmarks/load.py                       # 64 clients, 60 s (the README's figures)
    python benchmarks/load.py --clients 16 --seconds 10

It starts `embedlift serve` on a free loopback port (stopped by its PID at the end) with two adapters. A 429
is counted apart (deliberate under overload) and must carry Retry-After; any other non-2xx is an error.
tests/test_load.py runs a short version of the same thing in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LYFT = REPO.parent / "shared" / "data" / "lyft_2021_10k" / "train_dataset.json"
# The mix of one client's requests: what a RAG app sends (questions), and an indexer now and then.
MIX = [("embed", 0.4), ("openai", 0.2), ("search", 0.3), ("upsert", 0.1)]


@dataclass
class LoadReport:
    clients: int
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    overloaded: int = 0
    overloaded_without_retry_after: int = 0
    swaps: int = 0
    swap_errors: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def rows(self) -> list[tuple[str, int, float, float, float]]:
        """(operation, requests, requests/s, p50 ms, p99 ms), the whole mix last."""
        out = []
        for op in [*sorted(self.latencies), "all"]:
            lat = np.array(self.latencies[op] if op != "all" else [x for v in self.latencies.values() for x in v]) * 1000
            if len(lat):
                out.append((op, len(lat), len(lat) / self.seconds, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))))
        return out

    def table(self) -> str:
        lines = [
            f"{self.clients} clients, {self.seconds:.0f} s, adapter swaps: {self.swaps} ({self.swap_errors} failed)",
            "",
            "| operation | requests | req/s | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {op} | {n} | {rps:.1f} | {p50:.1f} | {p99:.1f} |" for op, n, rps, p50, p99 in self.rows()]
        lines += [
            "",
            f"errors: {len(self.errors)}; 429 (overload, deliberate): {self.overloaded}, without Retry-After: {self.overloaded_without_retry_after}",
            f"resident memory: {self.rss_start_mb:.0f} MB at start, {self.rss_end_mb:.0f} MB at end ({self.rss_end_mb - self.rss_start_mb:+.0f} MB)",
        ]
        return "\n".join(lines)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def questions() -> list[str]:
    """Short questions (about 12 words): the Lyft ones when the dataset is here, else generated ones."""
    if LYFT.is_file():
        return [" ".join(q.split()[:12]) for q in json.loads(LYFT.read_text())["queries"].values()]
    return [f"What did the company report about risk factor {i} in its annual filing?" for i in range(500)]


async def client_loop(client: httpx.AsyncClient, report: LoadReport, stop: float, seed: int, texts: list[str], collection: str) -> None:
    rng = random.Random(seed)
    ops, weights = zip(*MIX, strict=True)
    n = 0
    while time.monotonic() < stop:
        op = rng.choices(ops, weights)[0]
        text = rng.choice(texts)
        n += 1
        if op == "embed":
            call = client.post("/embed", json={"input": text})
        elif op == "openai":
            call = client.post("/v1/embeddings", json={"input": [text], "model": "active", "encoding_format": "base64"})
        elif op == "search":
            call = client.post(f"/collections/{collection}/search", json={"query": text, "k": 5})
        else:
            docs = [{"id": f"load-{seed}-{n}-{j}", "text": f"{text} (note {j})", "metadata": {"client": seed}} for j in range(4)]
            call = client.post(f"/collections/{collection}/documents", json={"documents": docs})
        start = time.monotonic()
        try:
            r = await call
        except httpx.HTTPError as exc:
            report.errors.append(f"{op}: {type(exc).__name__}: {exc}")
            continue
        elapsed = time.monotonic() - start
        if r.status_code == 429:
            report.overloaded += 1
            report.overloaded_without_retry_after += "retry-after" not in r.headers
            await asyncio.sleep(float(r.headers.get("retry-after", "1")) / 10)
        elif r.is_success:
            report.latencies[op].append(elapsed)
        else:
            report.errors.append(f"{op}: {r.status_code} {r.text[:200]}")


async def swapper(client: httpx.AsyncClient, report: LoadReport, stop: float, names: list[str], interval: float) -> None:
    """An activation every ``interval`` on the clock, each not waiting for the one before (under load a
    request may take longer than the interval)."""

    async def swap(name: str) -> None:
        try:
            r = await client.post(f"/adapters/{name}/activate")
            report.swaps += r.status_code == 200
            report.swap_errors += r.status_code != 200
        except httpx.HTTPError:
            report.swap_errors += 1

    tasks, i, next_at = [], 0, time.monotonic()
    while next_at < stop:
        tasks.append(asyncio.create_task(swap(names[i % len(names)])))
        i += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*tasks)


async def run_load(url: str, pid: int, *, clients: int, seconds: float, adapters: list[str], headers: dict[str, str] | None = None,
                   swap_interval: float = 0.1, collection: str = "load") -> LoadReport:
    """Drive the server at ``url`` (process ``pid``) and report; the collection is created and seeded first."""
    texts = questions()
    report = LoadReport(clients=clients, seconds=seconds)
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:
        await client.put(f"/collections/{collection}")
        seed_docs = [{"id": f"seed-{i}", "text": t} for i, t in enumerate(texts[:200])]
        (await client.post(f"/collections/{collection}/documents", json={"documents": seed_docs})).raise_for_status()
        for t in texts[:20]:  # warm up the model and the allocator before the memory baseline
            await client.post("/embed", json={"input": t})
        report.rss_start_mb = rss_mb(pid)
        stop = time.monotonic() + seconds
        await asyncio.gather(
            swapper(client, report, stop, [*adapters, "base"], swap_interval),
            *(client_loop(client, report, stop, seed, texts, collection) for seed in range(clients)),
        )
        report.rss_end_mb = rss_mb(pid)
    return report


def main() -> int:
    from embedlift.models.encoders import LocalEncoder
    from tests.helpers import make_adapter, start_server, stop_server

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--swap-interval", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = LocalEncoder()
        make_adapter(base, root / "adapters" / "alpha", seed=1)
        make_adapter(base, root / "adapters" / "beta", apply_to="both", seed=2)
        proc, url = start_server(root / "data", root / "adapters", "--watch-interval", "0")
        try:
            report = asyncio.run(run_load(url, proc.pid, clients=args.clients, seconds=args.seconds, adapters=["alpha", "beta"], swap_interval=args.swap_interval))
        finally:
            code = stop_server(proc)
    text = report.table() + f"\nserver exit code after SIGTERM: {code}\n"
    print(text)
    if report.errors:
        print("first errors:", *report.errors[:5], sep="\n  ")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Load with hot swaps\n\n`python benchmarks/load.py --clients {args.clients} --seconds {args.seconds:.0f}`\n\n{text}")
    return 1 if report.errors or report.overloaded_without_retry_after or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
