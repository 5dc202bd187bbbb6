"""The GPU check, one prepared script of at most 5 minutes: per precision, in-process throughput and the minimum
cosine to CPU fp32; then ``embedlift serve`` on the device over HTTP at 1 and 32 clients of one question each.

    python benchmarks/gpu.py --export DIR            # here: fp16 weights (~45 MB) and the Lyft set, to carry
    python benchmarks/gpu.py --device cuda --model DIR/model --data DIR/train_dataset.json
    python benchmarks/gpu.py --device cpu --seconds 3   # the same script where no GPU is lent (how it is checked)

The weights travel as fp16 safetensors because a device call takes 64 MiB in all; on the device they are cast back
to fp32 before anything is measured, so every precision, and the CPU reference, starts from the same weights.
The load generator is Python (httpx, asyncio): wrk is not on the device. Prints one markdown table per part.

On the H200 machine (Python 3.12, torch 2.11, sentence-transformers 6.0.1, no package index) the in-process part
needs only the carried folder and msgspec; ``embedlift serve`` also needs what its image lacks, about 26 MiB of
wheels (``scripts/gpu-wheels.sh`` downloads them into ``.whl``). With the 45 MiB of weights that is over one call's
64 MiB, so it takes two calls on a warm machine (ignored paths it was sent stay there between calls): the first
carries the weights and runs ``--skip-http``, the second carries ``.whl`` and runs the whole script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import DATA, best_of_two, embedlift_server, machine, percentile, stop  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")


def export(out: Path) -> None:
    """The packaged MiniLM in fp16 safetensors and the Lyft questions, in ``out``."""
    from sentence_transformers import SentenceTransformer

    from embedlift.models.encoders import default_model_path

    model = SentenceTransformer(str(default_model_path()), device="cpu").half()
    model.save(str(out / "model"), safe_serialization=True)
    shutil.copyfile(DATA, out / "train_dataset.json")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")


def fp32_copy(model: str, tmp: Path) -> str:
    """``model`` with its weights cast to fp32, saved under ``tmp`` (a local directory embedlift loads as any)."""
    from sentence_transformers import SentenceTransformer

    path = tmp / "model-fp32"
    SentenceTransformer(model, device="cpu").float().save(str(path), safe_serialization=True)
    return str(path)


def in_process(model: str, device: str, queries: list[str], passages: list[str]) -> list[dict]:
    from embedlift.models.encoders import LocalEncoder
    from embedlift.models.errors import InvalidInputError
    from embedlift.models.precision import min_cosine

    cpu = LocalEncoder(model, device="cpu", precision="fp32", runtime="torch")
    windows = [p[a:b] for p in passages for a, b in cpu.split([p], "document")[0]][:256]
    reference = (cpu.encode(queries, "query"), cpu.encode(windows, "document"))
    del cpu
    rows = []
    for precision in PRECISIONS:
        try:
            encoder = LocalEncoder(model, device=device, precision=precision, runtime="torch")
        except InvalidInputError as exc:
            rows.append({"precision": precision, "refused": str(exc)})
            continue
        best_q, best_p, qv, pv = best_of_two(encoder, queries, windows)
        rows.append({"precision": precision, "ran": encoder.precision, "queries_per_s": best_q, "passages_per_s": best_p,
                     "min_cos_queries": min_cosine(reference[0], qv), "min_cos_passages": min_cosine(reference[1], pv)})
        print(f"  {precision} (ran {encoder.precision}): {best_q:.0f} q/s, {best_p:.0f} passages/s, min cos to CPU fp32 "
              f"{rows[-1]['min_cos_queries']:.6f} / {rows[-1]['min_cos_passages']:.6f}", flush=True)
        del encoder
    return rows


async def load(url: str, queries: list[str], clients: int, seconds: float) -> dict:
    """``clients`` loops, each posting one question at a time for ``seconds``."""
    latencies: list[float] = []
    errors = 0

    async def client(i: int, http: httpx.AsyncClient, until: float) -> None:
        nonlocal errors
        n = i
        while time.perf_counter() < until:
            body = {"input": [queries[n % len(queries)]], "input_type": "query", "truncate": True}
            t = time.perf_counter()
            r = await http.post(f"{url}/embed", json=body)
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200
            n += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        await asyncio.gather(*(client(i, http, time.perf_counter() + 1) for i in range(clients)))  # warm-up
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http, started + seconds) for i in range(clients)))
        elapsed = time.perf_counter() - started
    ms = [x * 1000 for x in latencies]
    return {"clients": clients, "rps": len(ms) / elapsed, "p50": percentile(ms, 50), "p99": percentile(ms, 99), "errors": errors}


def over_http(model: str, device: str, queries: list[str], tmp: Path, seconds: float) -> tuple[float, list[dict]]:
    proc, url, ready = embedlift_server(tmp, "--base", model, "--device", device)
    try:
        rows = []
        for clients in (1, 32):
            rows.append(asyncio.run(load(url, queries, clients, seconds)))
            r = rows[-1]
            print(f"  {clients} clients: {r['rps']:.0f} requests/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, errors {r['errors']}", flush=True)
        return ready, rows
    finally:
        stop(proc)


def device_name(device: str) -> str:
    """What ran: the GPU's name and memory as torch reports them, or the CPU (``serving.machine``)."""
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        return f"{device}: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__} (CUDA {torch.version.cuda})"
    return f"{device}: {machine()}"


def report(device: str, runs: list[dict], ready: float, http: list[dict]) -> str:
    lines = [f"Device: {device_name(device)}", "", "| precision | ran as | queries/s | passages/s | min cosine to CPU fp32 (queries / passages) |",
             "|---|---|---:|---:|---:|"]
    for r in runs:
        if "refused" in r:
            lines.append(f"| {r['precision']} | refused: {r['refused']} | | | |")
        else:
            lines.append(f"| {r['precision']} | {r['ran']} | {r['queries_per_s']:.0f} | {r['passages_per_s']:.0f} | "
                         f"{r['min_cos_queries']:.6f} / {r['min_cos_passages']:.6f} |")
    if http:
        lines += ["", f"`embedlift serve --device {device}` (its defaults, cache off), ready in {ready:.1f} s:", "",
                  "| clients | requests/s | p50 ms | p99 ms | errors |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['clients']} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |" for r in http]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, help="write fp16 weights and the Lyft set to this folder, then stop")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", help="a sentence-transformers folder (default: the packaged MiniLM)")
    p.add_argument("--data", type=Path, default=DATA, help="the Lyft train_dataset.json")
    p.add_argument("--seconds", type=float, default=20, help="per HTTP load point")
    p.add_argument("--out", type=Path, help="also write the tables here")
    p.add_argument("--skip-http", action="store_true", help="the in-process part only")
    args = p.parse_args()
    if args.export:
        export(args.export)
        return 0
    from embedlift.models.encoders import default_model_path

    ds = json.loads(args.data.read_text())
    queries = [" ".join(q.split()[:12]) for q in ds["queries"].values()]
    passages = list(ds["corpus"].values())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = fp32_copy(args.model or str(default_model_path()), tmp)
        print(f"1. in process on {args.device}", flush=True)
        runs = in_process(model, args.device, queries, passages)
        ready, http = float("nan"), []
        if not args.skip_http:
            print(f"2. embedlift serve on {args.device}", flush=True)
            ready, http = over_http(model, args.device, queries, tmp, args.seconds)
    text = report(args.device, runs, ready, http)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(r["errors"] == 0 and np.isfinite(r["rps"]) for r in http) else 1


if __name__ == "__main__":
    sys.exit(main())
