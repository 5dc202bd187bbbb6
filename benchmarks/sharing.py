"""The model beside the event loop: why single-query throughput at 32 clients stops short of the model's own.

At 32 clients of one question each the server's model runs batches of about 16, and the event loop spends
about 0.4 ms of CPU per request on HTTP, JSON and tokenising, holding the GIL, on the same cores as the model's
threads. This script measures that sharing without HTTP: the base (as ``embedlift serve`` loads it, on its
``--runtime``/``--precision`` defaults) encodes the Lyft questions in batches of 16 alone, then beside a Python
thread that is busy for a given share of one core in 0.5 ms bursts (as the loop's requests are), at the switch
interval the server sets. Prints one markdown table.

    python benchmarks/sharing.py                     # 1 and 2 model threads, busy 0 / 20 / 35 / 50%
    python benchmarks/sharing.py --threads 2 --busy 0,0.35 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import load_texts, machine  # noqa: E402

from embedlift.models.encoders import LocalEncoder  # noqa: E402
from embedlift.service.http.app import SWITCH_INTERVAL  # noqa: E402

BATCH = 16
BURST = 0.0005  # seconds of work per burst of the busy thread


def busy(share: float, stop: threading.Event) -> None:
    """Pure Python work (it holds the GIL, as the loop's request handling does) for ``share`` of the time."""
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < BURST:
            sum(range(50))
        time.sleep(BURST * (1 - share) / share)


def measure(encoder: LocalEncoder, questions: list[str], share: float) -> tuple[float, float]:
    """``(queries/s, process CPU in cores)`` encoding ``questions`` in batches of 16 beside the busy thread."""
    stop = threading.Event()
    worker = threading.Thread(target=busy, args=(share, stop), daemon=True) if share else None
    if worker:
        worker.start()
    encoder.encode(questions[:BATCH], "query")
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(questions) - BATCH + 1, BATCH):
        encoder.encode(questions[i : i + BATCH], "query")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stop.set()
    if worker:
        worker.join()
    return (len(questions) // BATCH * BATCH) / wall, cpu / wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="model threads to measure (comma-separated)")
    parser.add_argument("--busy", default="0,0.2,0.35,0.5", help="shares of one core the Python thread is busy")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the table keeps each row's best")
    parser.add_argument("--questions", type=int, default=640)
    args = parser.parse_args()
    questions = load_texts()[0][: args.questions]
    shares = [float(s) for s in args.busy.split(",")]
    sys.setswitchinterval(SWITCH_INTERVAL)
    print(f"Machine: {machine()}.\n")
    print("| model threads | runtime precision | Python thread busy | queries/s | vs alone | process CPU (cores) |")
    print("|---:|---|---:|---:|---:|---:|")
    for threads in (int(t) for t in args.threads.split(",")):
        encoder = LocalEncoder(threads=threads)
        best: dict[float, tuple[float, float]] = {}
        for _ in range(args.rounds):  # interleaved, so a slow moment of the machine spreads over every share
            for share in shares:
                qps, cores = measure(encoder, questions, share)
                if qps > best.get(share, (0.0, 0.0))[0]:
                    best[share] = (qps, cores)
        alone = best.get(0.0, (0.0, 0.0))[0]
        for share in shares:
            qps, cores = best[share]
            ratio = f"{qps / alone:.2f}x" if alone else "-"
            print(f"| {threads} | {encoder.runtime} {encoder.precision} | {share:.0%} of a core | {qps:.0f} | {ratio} | {cores:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
