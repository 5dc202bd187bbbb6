"""Serving performance, measured side by side in one run: `make bench-serving`.

What it measures (the packaged all-MiniLM-L6-v2 on this machine's CPU; queries are the Lyft questions cut to
their first 12 words, passages the Lyft chunks):

1. The ceiling: in-process ``SentenceTransformer.encode`` in float32 at each batch size (the best one is the
   reference), and a single query's encode latency. 1b: in-process ``LocalEncoder.encode`` per runtime x
   precision (torch fp32/bf16, OpenVINO fp32/bf16): queries/s, passages/s, minimum cosine to torch fp32.
2. ``embedlift serve`` over HTTP under ``wrk`` (C, one thread, keep-alive connections = concurrent clients):
   one query per request at 1, 8, 32 and 64 clients, 64 queries per request, and passages. The server runs
   with its request cache off, so every input runs the model.
3. The same loads against infinity (``infinity_emb v2``, the same local model, CPU, its torch engine in
   ``--dtype bfloat16`` where torch's bf16 ran faster than its fp32 in section 1b, else ``float32``: its best on
   the CPU at hand, ``infinity_dtype``; its ONNX engine, ``infinity-emb[optimum]``, resolves in its venv but is not measured
   here), started from its own virtual environment (``INFINITY``: its ``infinity_emb`` script).
4. In the engine, without HTTP: adapter overhead (base, linear, mlp), cache hit vs miss, hot-swap time.
5. FAISS search time per query (query encoding excluded) at 10k, 100k and 1M vectors, exact and HNSW, with
   HNSW's recall@10 against exact.
6. Hybrid retrieval in a collection (query encoding excluded): search time per query at 10k and 100k documents,
   dense, lexical and hybrid (the corpus: the Lyft chunks repeated under distinct ids, each copy with a few words
   changed and its real window vectors slightly perturbed; the queries: the Lyft questions), and upsert throughput
   through the engine with the lexical index on vs off, the base vectors already cached (the model excluded).

Ratios are against references measured in the same run, so a slower or busier machine moves every row
together. The load generator shares the two cores with the server, as the targets assume.

7. With ``--store postgres``: the embedded store and PostgreSQL + pgvector side by side (``benchmarks/stores.py``):
   upserts, dense and hybrid search, pgvector HNSW recall, one vs two replicas, activation propagation.

Usage: ``python benchmarks/serving.py [--duration S] [--infinity PATH] [--sizes 10000,100000,1000000]
[--hybrid-sizes 10000,100000] [--skip runtimes,http,infinity,engine,faiss,hybrid] [--store postgres]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lyft_2021_10k" / "train_dataset.json"
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------ data
def load_texts() -> tuple[list[str], list[str]]:
    ds = json.loads(DATA.read_text())
    queries = [" ".join(q.split()[:12]) for q in ds["queries"].values()]
    passages = list(ds["corpus"].values())
    return queries, passages


def machine() -> str:
    """The CPU a run measured, for its results file: a VM may hide the model name (an EPYC showed only "AMD EPYC"),
    and two CPUs with the same flags ran bf16 1.8x apart, so the family and model numbers go with it, with the
    cores this process may use and the bf16 instructions torch sees."""
    import platform

    from embedlift.models.encoders import available_cores
    from embedlift.models.precision import cpu_bf16_instructions

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    ids = f" (CPU family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields and "model" in fields else ""
    return f"{name}{ids}, {available_cores()} cores, bf16 instructions: {', '.join(cpu_bf16_instructions()) or 'none'}"


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p)) if values else float("nan")


def as_served() -> None:
    """What ``embedlift serve`` does once its engine has loaded (``service/http/app.py``): everything alive now is
    kept out of the collector's full passes, which otherwise scan the model's ~500k objects (0.3 s each)."""
    gc.collect()
    gc.freeze()


def run_on_one_loop() -> tuple[asyncio.AbstractEventLoop, Callable[..., Any]]:
    """One event loop for a section's engine calls, as the server has. ``asyncio.run`` per call costs more than a
    cache hit here: on the main thread it swaps the SIGINT handler, and restoring it formats the finished task,
    result and all (about 2.5 ms for one vector on Python 3.11)."""
    loop = asyncio.new_event_loop()
    return loop, loop.run_until_complete


# ------------------------------------------------------------------------------------ 1. the ceiling
def ceiling(queries: list[str], passages: list[str]) -> dict:
    from sentence_transformers import SentenceTransformer

    from embedlift.models.encoders import available_cores, default_model_path

    import torch

    torch.set_num_threads(available_cores())
    model = SentenceTransformer(str(default_model_path()), device="cpu")
    model.encode(queries[:64], batch_size=32)
    rates = {}
    for bs in (1, 8, 16, 32, 64, 128):
        texts = queries[: 128 if bs == 1 else 512]
        t = time.perf_counter()
        model.encode(texts, batch_size=bs, normalize_embeddings=True)
        rates[bs] = len(texts) / (time.perf_counter() - t)
    single = []
    for q in queries[:200]:
        t = time.perf_counter()
        model.encode([q], normalize_embeddings=True)
        single.append((time.perf_counter() - t) * 1000)
    passage_rates = {}
    for bs in (8, 16, 32):
        t = time.perf_counter()
        model.encode(passages[:96], batch_size=bs, normalize_embeddings=True)
        passage_rates[bs] = 96 / (time.perf_counter() - t)
    del model
    return {
        "query_rates": rates, "best_bs": max(rates, key=rates.get), "best": max(rates.values()),
        "single_p50": percentile(single, 50), "single_p99": percentile(single, 99),
        "passage_rates": passage_rates, "passage_best": max(passage_rates.values()),
    }


# ------------------------------------------------------------------------------- 1b. runtime x precision
RUNTIME_ROWS = (("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"))


QUERY_CALL = 64  # questions per ``encode`` call in process: what one request of the HTTP load's 64 carries


def best_of_two(encoder: Any, queries: list[str], windows: list[str]) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Queries/s and passage windows/s of ``encoder.encode`` after a warm-up, the better of two rounds (the
    machine is shared), and the vectors of the last round.

    Questions go in calls of 64, as the issue's table measured them and as the 64-per-request load sends them.
    One call of all 256 sorts them by length together and pads less: OpenVINO bf16 ran 1.15x the queries/s so on
    2 cores of a Xeon with AMX. The windows go in one call, which the token budget splits into passes of 16."""
    encoder.encode(queries[:QUERY_CALL], "query")
    best_q = best_p = 0.0
    for _ in range(2):
        t = time.perf_counter()
        qv = np.concatenate([encoder.encode(queries[i : i + QUERY_CALL], "query") for i in range(0, len(queries), QUERY_CALL)])
        best_q = max(best_q, len(queries) / (time.perf_counter() - t))
        t = time.perf_counter()
        pv = encoder.encode(windows, "document")
        best_p = max(best_p, len(windows) / (time.perf_counter() - t))
    return best_q, best_p, qv, pv


def runtimes(queries: list[str], passages: list[str], tmp: Path) -> list[dict]:
    """In-process ``LocalEncoder.encode`` per runtime x precision (tokenising included, default token budget):
    256 queries in calls of 64, 64 full-window passage windows, and the minimum cosine of both to torch fp32's
    vectors."""
    import importlib.util

    from embedlift.models.encoders import LocalEncoder
    from embedlift.models.precision import min_cosine

    qs = queries[:256]
    rows, reference = [], None
    for runtime, precision in RUNTIME_ROWS:
        if runtime == "openvino" and importlib.util.find_spec("openvino") is None:
            print("  openvino: skipped (not installed: pip install 'embedlift[openvino]')", flush=True)
            continue
        started = time.perf_counter()
        encoder = LocalEncoder(runtime=runtime, precision=precision, compiled_dir=tmp / "openvino")
        load_s = time.perf_counter() - started
        windows = [p[a:b] for p in passages for a, b in encoder.split([p], "document")[0]][:64]
        best_q, best_p, qv, pv = best_of_two(encoder, qs, windows)
        if reference is None:
            reference = (qv, pv)
        row = {"runtime": runtime, "precision": encoder.precision, "asked": precision, "queries_per_s": best_q, "passages_per_s": best_p,
               "min_cos_queries": min_cosine(reference[0], qv), "min_cos_passages": min_cosine(reference[1], pv),
               "probe_fidelity": encoder.fidelity, "load_s": load_s}
        rows.append(row)
        print(f"  {runtime} {precision}: {best_q:.1f} q/s, {best_p:.1f} passages/s, min cos {row['min_cos_queries']:.6f} / "
              f"{row['min_cos_passages']:.6f}, load {load_s:.1f} s", flush=True)
        del encoder
    return rows


# ------------------------------------------------------------------------------------ 2-3. HTTP load
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def lua_script(bodies: list[dict], path: str, directory: Path, name: str) -> Path:
    """A wrk script that cycles through ``bodies`` and prints one RESULT line (latencies in ms)."""
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"', "local bodies = {"]
    lines += ["  " + json.dumps(json.dumps(b)) + "," for b in bodies]
    lines += [
        "}", "local i = 0",
        "request = function()", "  i = i % #bodies + 1", f'  return wrk.format(nil, "{path}", nil, bodies[i])', "end",
        "done = function(summary, latency, requests)",
        '  local e = summary.errors',
        '  io.write(string.format("RESULT %d %d %.3f %.3f %.3f %d\\n", summary.requests, summary.duration,'
        " latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.mean / 1000,"
        " e.status + e.connect + e.read + e.write + e.timeout))",
        "end",
    ]
    out = directory / f"{name}.lua"
    out.write_text("\n".join(lines) + "\n")
    return out


def wrk(url: str, script: Path, clients: int, duration: float) -> dict:
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{duration:.0f}s", "--timeout", "30s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    requests, micros, p50, p99, mean, errors = line.split()[1:]
    seconds = int(micros) / 1e6
    return {"rps": int(requests) / seconds, "p50": float(p50), "p99": float(p99), "mean": float(mean), "errors": int(errors)}


LOADS = [  # (label, clients, inputs per request, kind)
    ("1 query/request", 1, 1, "query"),
    ("1 query/request", 8, 1, "query"),
    ("1 query/request", 32, 1, "query"),
    ("1 query/request", 64, 1, "query"),
    ("64 queries/request", 4, 64, "query"),
    ("4 passages/request", 4, 4, "passage"),
]


def drain(url: str, path: str, body: dict) -> None:
    """Wait until the requests a finished wrk run left in the server are done: one more request queues
    behind them, so its answer means the server is idle again."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()


def run_loads(name: str, url: str, path: str, body, queries: list[str], passages: list[str], tmp: Path, duration: float) -> list[dict]:
    rows = []
    for label, clients, per_request, kind in LOADS:
        texts = queries if kind == "query" else passages
        groups = [texts[i : i + per_request] for i in range(0, len(texts) - per_request + 1, per_request)][:200]
        script = lua_script([body(g, kind) for g in groups], path, tmp, f"{name}-{kind}-{per_request}")
        wrk(url, script, clients, 2)  # warm-up
        drain(url, path, body(queries[:1], "query"))
        r = wrk(url, script, clients, duration if kind == "query" else duration * 2)
        drain(url, path, body(queries[:1], "query"))
        r.update(server=name, load=label, clients=clients, inputs_per_s=r["rps"] * per_request, kind=kind)
        rows.append(r)
        print(f"  {name:10s} {label:20s} c={clients:<3d} {r['inputs_per_s']:8.1f} inputs/s  p50 {r['p50']:7.1f} ms"
              f"  p99 {r['p99']:7.1f} ms  errors {r['errors']}", flush=True)
    return rows


def embedlift_server(tmp: Path, *flags: str) -> tuple[subprocess.Popen, str, float]:
    """``embedlift serve`` with its defaults (the request cache off) and ``flags``, on a free loopback port, once
    ``/ready``: the process, its address and the seconds it took (stopped again if it never gets ready)."""
    port = free_port()
    cmd = [sys.executable, "-m", "embedlift.service.cli", "serve", "--port", str(port), "--data-dir", str(tmp / "data"),
           "--adapters-dir", str(tmp / "adapters"), "--cache-mb", "0", "--watch-interval", "0", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "embedlift.log", "w"), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        ready = wait_ready(f"http://127.0.0.1:{port}/ready", proc)
    except BaseException:
        stop(proc)
        raise
    return proc, f"http://127.0.0.1:{port}", ready


def post_json(url: str, body: dict, method: str = "POST") -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method=method)
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read() or b"{}")


def ingestion(url: str, passages: list[str]) -> dict:
    """Passages through ``POST /collections/{c}/documents`` into a fresh collection (nothing cached: every window
    runs the model), 32 documents per request from 2 clients at once, against in-process ``LocalEncoder`` with the
    same defaults embedding the same documents' windows in one call."""
    from embedlift.models.encoders import LocalEncoder
    from embedlift.models.windows import embed_documents

    post_json(f"{url}/collections/ingest", {}, method="PUT")
    docs = [{"id": f"p{i}", "text": t} for i, t in enumerate(passages)]
    groups = [docs[i : i + 32] for i in range(0, len(docs), 32)]
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda part: [post_json(f"{url}/collections/ingest/documents", {"documents": g}) for g in part],
                                args=(groups[k::2],)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    http_rate = len(docs) / (time.perf_counter() - started)
    encoder = LocalEncoder()
    embed_documents(encoder, passages[:16])
    started = time.perf_counter()
    windows = embed_documents(encoder, passages)
    in_process = len(passages) / (time.perf_counter() - started)
    print(f"  ingestion: {http_rate:.1f} passages/s over HTTP ({len(windows.spans)} windows), in-process {in_process:.1f}/s", flush=True)
    return {"http": http_rate, "in_process": in_process, "windows": len(windows.spans), "documents": len(passages)}


def infinity_dtype(runtime_rows: list[dict]) -> str:
    """infinity's fastest torch dtype on this CPU: ``bfloat16`` where torch's bf16 ran faster than its fp32 in
    process (section 1b; where it was skipped, where the CPU has bf16 instructions), else ``float32`` (on a CPU
    without them torch's bf16 is emulated, several times slower)."""
    rate = {r["asked"]: r["queries_per_s"] for r in runtime_rows if r["runtime"] == "torch"}
    if "bf16" in rate and "fp32" in rate:
        return "bfloat16" if rate["bf16"] > rate["fp32"] else "float32"
    from embedlift.models.precision import cpu_has_fast_bf16

    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def infinity_server(script: str, tmp: Path, dtype: str) -> tuple[subprocess.Popen, str, float]:
    from embedlift.models.encoders import default_model_path

    port = free_port()
    cmd = [script, "v2", "--model-id", str(default_model_path()), "--served-model-name", "minilm", "--port", str(port),
           "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu", "--dtype", dtype, "--batch-size", "32", "--log-level", "warning",
           "--no-bettertransformer"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "infinity.log", "w"), env=env)
    ready = wait_ready(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}", ready


# ------------------------------------------------------------------------------------ 4. engine parts
def engine_parts(queries: list[str], tmp: Path) -> dict:
    from embedlift.models.adapters import AdapterConfig, build_adapter
    from embedlift.models.checkpoint import base_info, save_checkpoint
    from embedlift.service.engine import Engine
    from embedlift.service.settings import Settings

    adapters = tmp / "engine-adapters"
    engine = Engine.from_settings(Settings(data_dir=tmp / "engine-data", adapters_dir=adapters, cache_mb=0), watch=False)
    base = engine.base
    for kind in ("linear", "mlp"):
        adapter = build_adapter(AdapterConfig(kind=kind, dim=base.dim))
        save_checkpoint(adapter, adapters / kind, base=base_info(base), name=kind)
        engine.registry.register_name(kind)
    batch = queries[:64]
    loop, run = run_on_one_loop()
    as_served()
    run(engine.embed(batch, "query", "base"))
    timings: dict[str, list[float]] = {"base": [], "linear": [], "mlp": []}
    for _ in range(8):  # interleaved, so drift in machine speed hits every row alike
        for name in timings:
            t = time.perf_counter()
            run(engine.embed(batch, "query", name))
            timings[name].append(time.perf_counter() - t)
    per_call = {k: statistics.median(v) for k, v in timings.items()}
    # The adapter's own cost, isolated from the machine's noise: its transform of the same 64 base vectors.
    base_vectors = run(engine.embed(batch, "query", "base")).vectors
    transform_ms = {}
    for name in ("linear", "mlp"):
        adapter = engine.resolve(name).checkpoint.adapter
        t = time.perf_counter()
        for _ in range(200):
            adapter.transform_query(base_vectors)
        transform_ms[name] = (time.perf_counter() - t) / 200 * 1000

    swaps = []
    for i in range(50):
        t = time.perf_counter()
        engine.registry.activate("linear" if i % 2 else "mlp")
        swaps.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    engine.registry.register_name("linear")  # load from disk, validate, swap
    register_ms = (time.perf_counter() - t) * 1000
    engine.close()

    cached = Engine.from_settings(Settings(data_dir=tmp / "engine-data2", adapters_dir=adapters, cache_mb=64), watch=False)
    misses, hits = [], []
    for q in queries[:100]:
        t = time.perf_counter()
        run(cached.embed([q], "query", "base"))
        misses.append(time.perf_counter() - t)
    for q in queries[:100]:
        t = time.perf_counter()
        run(cached.embed([q], "query", "base"))
        hits.append(time.perf_counter() - t)
    cached.close()
    loop.close()
    gc.unfreeze()
    return {
        "per_call_ms": {k: v * 1000 for k, v in per_call.items()},
        "overhead": {k: per_call[k] / per_call["base"] - 1 for k in ("linear", "mlp")},
        "transform_ms": transform_ms,
        "miss_ms": statistics.median(misses) * 1000, "hit_ms": statistics.median(hits) * 1000,
        "swap_ms_p50": percentile(swaps, 50), "swap_ms_p99": percentile(swaps, 99), "register_ms": register_ms,
    }


# ------------------------------------------------------------------------------------------ 5. FAISS
def synthetic_vectors(n: int, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vectors shaped like real embeddings: mixtures of two real passage vectors plus noise, normalised.
    (Uniform random vectors have no neighbourhood structure and make every index look bad.)"""
    out = np.empty((n, anchors.shape[1]), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        a = anchors[rng.integers(0, len(anchors), m)]
        b = anchors[rng.integers(0, len(anchors), m)]
        w = rng.uniform(0.5, 1.0, (m, 1)).astype(np.float32)
        v = w * a + (1 - w) * b + rng.normal(0, 0.35 / np.sqrt(anchors.shape[1]), (m, anchors.shape[1])).astype(np.float32)
        out[start : start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def faiss_search(sizes: list[int], queries: list[str], passages: list[str]) -> list[dict]:
    import faiss

    from embedlift.models.encoders import LocalEncoder
    from embedlift.service.collections import CollectionConfig, FaissIndex

    encoder = LocalEncoder()
    anchors = encoder.encode(passages, "document")
    q = encoder.encode(queries[:200], "query")
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        vectors = synthetic_vectors(n, anchors, rng)
        ids = np.arange(n, dtype=np.int64)
        exact_hits = None
        for kind in ("flat", "hnsw"):
            config = CollectionConfig(name="bench", base_fingerprint=encoder.fingerprint, dim=encoder.dim, index=kind)
            view = FaissIndex(None, config)  # type: ignore[arg-type]  # filled here, not from a store
            t = time.perf_counter()
            for start in range(0, n, 50_000):
                view._add(view._index, ids[start : start + 50_000], vectors[start : start + 50_000])  # noqa: SLF001
            build = time.perf_counter() - t
            params = faiss.SearchParametersHNSW(efSearch=config.ef_search) if kind == "hnsw" else None
            times, found = [], []
            for row in q:
                t = time.perf_counter()
                _, hit = view._index.search(row[None, :], 10, params=params)  # noqa: SLF001
                times.append((time.perf_counter() - t) * 1000)
                found.append(hit[0])
            t = time.perf_counter()
            view._index.search(q, 10, params=params)  # noqa: SLF001
            batch_ms = (time.perf_counter() - t) * 1000 / len(q)
            if kind == "flat":
                exact_hits = found
                recall = 1.0
            else:
                recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact_hits, strict=True)]))
            rows.append({"n": n, "index": kind, "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99),
                         "batch_ms_per_query": batch_ms, "recall@10": recall, "build_s": build})
            print(f"  {n:>9,d} {kind:5s} p50 {rows[-1]['p50_ms']:.3f} ms  p99 {rows[-1]['p99_ms']:.3f} ms  "
                  f"batched {batch_ms:.3f} ms/query  recall@10 {recall:.3f}  build {build:.1f} s", flush=True)
            del view
        del vectors
    return rows


# ------------------------------------------------------------------------------------------- 6. hybrid
def variants(passages: list[str], anchors: list[tuple[list, np.ndarray]], n: int, rng: np.random.Generator):
    """``n`` documents from the Lyft chunks: copy ``i`` of chunk ``c`` has a few words changed (so it has terms of
    its own) and the chunk's real window vectors plus a little noise, renormalised."""
    from embedlift.service.collections import NewDocument

    for i in range(n):
        c = i % len(passages)
        words = passages[c].split()
        for j in rng.choice(len(words), size=min(3, len(words)), replace=False):
            words[j] = f"{words[j]}{i % 97}"
        text = " ".join(words)
        spans, vectors = anchors[c]
        noisy = vectors + rng.normal(0, 0.02, vectors.shape).astype(np.float32)
        yield NewDocument(id=f"doc-{i}", text=text, metadata={"copy": i // len(passages)},
                          spans=[(0, len(text))] if len(spans) == 1 else [(int(a * len(text) / len(passages[c])), int(b * len(text) / len(passages[c]))) for a, b in spans],
                          vectors=noisy / np.linalg.norm(noisy, axis=1, keepdims=True))


def hybrid_search(sizes: list[int], queries: list[str], passages: list[str], tmp: Path) -> dict:
    from embedlift.models.encoders import LocalEncoder
    from embedlift.models.windows import embed_documents
    from embedlift.service.collections import CollectionManager
    from embedlift.service.collections.collection import SearchPlan
    from embedlift.service.engine import Engine
    from embedlift.service.schemas import Document
    from embedlift.service.settings import Settings

    encoder = LocalEncoder()
    embedded = embed_documents(encoder, passages)
    anchors = embedded.per_document()
    q = encoder.encode(queries[:200], "query")
    texts = queries[:200]
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        manager = CollectionManager(tmp / f"hybrid-{n}", encoder.fingerprint, encoder.dim, encoder.spec)
        manager.load_all()
        collection, _ = manager.create("bench")
        t = time.perf_counter()
        batch = []
        for doc in variants(passages, anchors, n, rng):
            batch.append(doc)
            if len(batch) == 1000:
                collection.upsert(batch)
                batch = []
        if batch:
            collection.upsert(batch)
        while collection.base_index.rebuilding:  # ``auto``: HNSW past 20,000 windows, built in the background
            time.sleep(0.2)
        print(f"  {n:,} documents ({collection.counts()[1]:,} windows, {collection.kind}) in {time.perf_counter() - t:.0f} s", flush=True)
        for mode in ("dense", "lexical", "hybrid"):
            times = []
            for i in range(len(texts)):
                t = time.perf_counter()
                collection.search(q[i : i + 1], texts[i : i + 1], SearchPlan(k=10, mode=mode))
                times.append((time.perf_counter() - t) * 1000)
            rows.append({"n": n, "mode": mode, "index": collection.kind, "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99)})
            print(f"  {n:>9,d} {mode:7s} p50 {rows[-1]['p50_ms']:.2f} ms  p99 {rows[-1]['p99_ms']:.2f} ms", flush=True)
        manager.close()
    # upsert throughput, the model excluded: the persistent cache holds every window's base vector first
    engine = Engine.from_settings(Settings(data_dir=tmp / "upsert-data", adapters_dir=tmp / "none", cache_mb=0), watch=False)
    docs = [Document(id=f"u{i}", text=passages[i % len(passages)] + f" (copy {i})") for i in range(2000)]
    loop, run = run_on_one_loop()
    run(engine.create_collection("warm"))
    for start in range(0, len(docs), 250):
        run(engine.upsert("warm", docs[start : start + 250]))
    as_served()
    from embedlift.service.schemas import CollectionCreate

    rates: dict[str, list[float]] = {"on": [], "off": []}
    # as every embedlift command runs (service/cli.py): the tokenizer on one thread, so the lexical analysis of a
    # batch runs beside its window planning on the other core (Engine._upsert)
    parallel_tokenizer = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for round_ in range(3):  # interleaved, so drift in machine speed hits both alike
        for lexical in ("on", "off"):
            name = f"{lexical}-{round_}"
            run(engine.create_collection(name, CollectionCreate(lexical=None) if lexical == "off" else None))
            t = time.perf_counter()
            for start in range(0, len(docs), 250):
                run(engine.upsert(name, docs[start : start + 250]))
            rates[lexical].append(len(docs) / (time.perf_counter() - t))
    if parallel_tokenizer is None:
        del os.environ["TOKENIZERS_PARALLELISM"]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = parallel_tokenizer
    engine.close()
    loop.close()
    gc.unfreeze()
    upsert = {k: statistics.median(v) for k, v in rates.items()}
    print(f"  upserts, vectors cached: lexical on {upsert['on']:.0f} docs/s, off {upsert['off']:.0f} docs/s "
          f"({upsert['on'] / upsert['off']:.0%})", flush=True)
    return {"search": rows, "upsert": upsert}


# ------------------------------------------------------------------------------------------- report
def report(c: dict, http: list[dict], engine: dict, search: list[dict], ready: dict[str, float], hybrid: dict | None = None,
           runtime_rows: list[dict] | None = None, ingest: dict | None = None) -> str:
    best = c["best"]
    lines = ["## Serving benchmark (`make bench-serving`)", "", f"Machine: {machine()}.", ""]
    if runtime_rows:
        lines += ["| runtime | precision | queries/s | vs ceiling | passages/s | vs ceiling | min cos queries | min cos passages | load s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runtime_rows:
            ran = r["precision"] if r["precision"] == r["asked"] else f"{r['asked']} (ran {r['precision']})"
            lines.append(f"| {r['runtime']} | {ran} | {r['queries_per_s']:.1f} | {r['queries_per_s'] / best:.2f}x | "
                         f"{r['passages_per_s']:.1f} | {r['passages_per_s'] / c['passage_best']:.2f}x | {r['min_cos_queries']:.6f} | "
                         f"{r['min_cos_passages']:.6f} | {r['load_s']:.1f} |")
        lines.append("")
    lines.append(f"In-process `SentenceTransformer.encode` ceiling, 12-word queries: best {best:.1f} queries/s at batch "
                 f"size {c['best_bs']} (" + ", ".join(f"bs {k}: {v:.0f}" for k, v in c["query_rates"].items()) + "); "
                 f"one query alone: p50 {c['single_p50']:.1f} ms, p99 {c['single_p99']:.1f} ms. Passages: best "
                 f"{c['passage_best']:.1f}/s. Time to `/ready`: " + ", ".join(f"{k} {v:.1f} s" for k, v in ready.items()) + ".")
    lines += ["", "| server | load | clients | inputs/s | vs ceiling | p50 ms | p99 ms | errors |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in http:
        ref = best if r["kind"] == "query" else c["passage_best"]
        lines.append(f"| {r['server']} | {r['load']} | {r['clients']} | {r['inputs_per_s']:.1f} | {r['inputs_per_s'] / ref:.0%} | "
                     f"{r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |")
    if ingest:
        per_doc = ingest["windows"] / ingest["documents"]  # the reference embeds each passage as one (truncated) window
        lines += ["", f"Ingestion: {ingest['http']:.1f} documents/s ({ingest['http'] * per_doc:.1f} windows/s) through "
                  f"`POST /collections/{{c}}/documents` (32 per request, 2 clients, {ingest['windows']} windows, nothing cached) vs "
                  f"{ingest['in_process']:.1f}/s in process with the same defaults ({ingest['http'] / ingest['in_process']:.0%}); in windows, "
                  f"{ingest['http'] * per_doc / c['passage_best']:.2f}x the fp32 reference's {c['passage_best']:.1f} passages/s."]
    lines += ["", "| engine (no HTTP) | value |", "|---|---:|"]
    for k, v in engine["per_call_ms"].items():
        lines.append(f"| embed 64 queries, {k} | {v:.1f} ms" + (f" ({engine['overhead'][k]:+.1%} vs base)" if k != "base" else "") + " |")
    for k, v in engine["transform_ms"].items():
        lines.append(f"| {k} adapter alone on 64 vectors | {v:.3f} ms ({v / engine['per_call_ms']['base']:.2%} of the base embed) |")
    lines.append(f"| one query, cache miss | {engine['miss_ms']:.2f} ms |")
    lines.append(f"| one query, cache hit | {engine['hit_ms']:.3f} ms ({engine['miss_ms'] / engine['hit_ms']:.0f}x faster) |")
    lines.append(f"| hot swap (activate) | p50 {engine['swap_ms_p50']:.3f} ms, p99 {engine['swap_ms_p99']:.3f} ms |")
    lines.append(f"| register + swap (load from disk) | {engine['register_ms']:.1f} ms |")
    lines += ["", "| vectors | index | search p50 ms | p99 ms | batched ms/query | recall@10 | build s |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in search:
        lines.append(f"| {r['n']:,} | {r['index']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['batch_ms_per_query']:.3f} | "
                     f"{r['recall@10']:.3f} | {r['build_s']:.1f} |")
    if hybrid:
        lines += ["", "| documents | mode | dense index | search p50 ms | p99 ms |", "|---:|---|---|---:|---:|"]
        for r in hybrid["search"]:
            lines.append(f"| {r['n']:,} | {r['mode']} | {r['index']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
        u = hybrid["upsert"]
        lines += ["", f"Upserts through the engine, base vectors cached: lexical index on {u['on']:.0f} documents/s, off "
                  f"{u['off']:.0f} documents/s ({u['on'] / u['off']:.0%} of dense-only)."]
    return "\n".join(lines) + "\n"


def served_as(url: str) -> str:
    """What the server's ``--runtime auto --precision auto`` chose on this CPU, and the timings it chose by
    (its ``/metrics``: ``embedlift_base_info`` and ``embedlift_base_load_timing_seconds``)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    info = families["embedlift_base_info"].samples[0].labels
    timed = families.get("embedlift_base_load_timing_seconds")
    timings = ", ".join(f"{s.labels['candidate']} {s.value * 1e3:.1f} ms" for s in timed.samples) if timed else "nothing timed"
    return f"on {info['runtime']} in {info['precision']} (`--runtime auto --precision auto`; at load, 36 short questions: {timings})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10, help="seconds per load point (default 10)")
    p.add_argument("--infinity", default=os.environ.get("INFINITY"), help="infinity_emb script of its own venv (skipped when absent)")
    p.add_argument("--sizes", default="10000,100000,1000000", help="index sizes for the FAISS rows")
    p.add_argument("--hybrid-sizes", default="10000,100000", help="collection sizes (documents) for the hybrid rows")
    p.add_argument("--skip", default="", help="comma list of parts to skip: runtimes,http,infinity,engine,faiss,hybrid")
    p.add_argument("--store", choices=["embedded", "postgres"], default="embedded",
                   help="postgres adds section 7: the stores side by side on a PostgreSQL started for the run (benchmarks/stores.py)")
    p.add_argument("--store-sizes", default="10000,100000", help="collection sizes in windows for section 7")
    p.add_argument("--out", type=Path, default=RESULTS / "serving.md", help="where the tables go (default benchmarks/results/serving.md)")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if shutil.which("wrk") is None and "http" not in skip:
        sys.exit("wrk is not installed: apt-get install -y wrk (make bench-serving does)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    queries, passages = load_texts()
    tmp = Path(tempfile.mkdtemp(prefix="embedlift-bench-"))
    print(f"machine: {machine()}", flush=True)
    print(f"{len(queries)} queries (first 12 words of each Lyft question), {len(passages)} passages", flush=True)
    print("1. in-process ceiling", flush=True)
    c = ceiling(queries, passages)
    print(f"  best {c['best']:.1f} q/s at bs {c['best_bs']}; single p50 {c['single_p50']:.1f} ms; passages {c['passage_best']:.1f}/s", flush=True)
    runtime_rows: list[dict] = []
    if "runtimes" not in skip:
        print("1b. runtime x precision, in process", flush=True)
        runtime_rows = runtimes(queries, passages, tmp)
    http: list[dict] = []
    ready: dict[str, float] = {}
    ingest: dict | None = None
    served = served_infinity = ""
    if "http" not in skip:
        print("2. embedlift over HTTP", flush=True)
        proc, url, ready["embedlift"] = embedlift_server(tmp)
        try:
            served = served_as(url)
            print(f"  the server's base runs {served}", flush=True)
            http += run_loads("embedlift", url, "/embed",
                              lambda g, kind: {"input": g, "input_type": "query" if kind == "query" else "document", "truncate": True},
                              queries, passages, tmp, args.duration)
            ingest = ingestion(url, passages)
        finally:
            stop(proc)
        if args.infinity and "infinity" not in skip:
            served_infinity = infinity_dtype(runtime_rows)
            print(f"3. infinity over HTTP (its torch engine, --dtype {served_infinity})", flush=True)
            proc, url, ready["infinity"] = infinity_server(args.infinity, tmp, served_infinity)
            try:
                http += run_loads("infinity", url, "/embeddings", lambda g, kind: {"input": g, "model": "minilm"},
                                  queries, passages, tmp, args.duration)
            finally:
                stop(proc)
        elif "infinity" not in skip:
            print("3. infinity: skipped (no --infinity / $INFINITY)", flush=True)
    engine = {}
    if "engine" not in skip:
        print("4. engine parts", flush=True)
        engine = engine_parts(queries, tmp)
        print(f"  {json.dumps(engine, default=float)}", flush=True)
    search: list[dict] = []
    if "faiss" not in skip:
        print("5. FAISS search", flush=True)
        search = faiss_search([int(s) for s in args.sizes.split(",")], queries, passages)
    hybrid = None
    if "hybrid" not in skip:
        print("6. hybrid search and upserts", flush=True)
        hybrid = hybrid_search([int(s) for s in args.hybrid_sizes.split(",")], queries, passages, tmp)
    stores = None
    if args.store == "postgres":
        import stores as store_bench

        print("7. stores: embedded and PostgreSQL + pgvector", flush=True)
        stores = store_bench.run(queries, passages, tmp, [int(s) for s in args.store_sizes.split(",")], args.duration)
    text = (report(c, http, engine, search, ready, hybrid, runtime_rows, ingest) if engine
            else json.dumps({"ceiling": c, "runtimes": runtime_rows, "http": http, "search": search, "hybrid": hybrid}, default=float))
    if served:
        text += f"\nembedlift's server ran its base {served}.\n"
    if served_infinity:
        text += f"infinity ran its torch engine with `--dtype {served_infinity}` (`infinity_dtype`).\n"
    if stores is not None:
        text += store_bench.report(stores)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
