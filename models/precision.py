"""Where a local base runs and in which precision, and the check that keeps a faster precision honest.

- ``resolve_device``: ``auto`` is a CUDA device when torch sees one, else the CPU; ``cuda``/``cuda:N`` without
  one is refused with what torch reports.
- ``resolve_precision``: ``auto`` is bf16 on a CPU with AMX or AVX-512 BF16 (where torch's bf16 kernels are
  fast) and on CUDA devices that support it, fp16 on other CUDA devices, fp32 otherwise.
- ``timed``: on a CPU, what ``auto`` leaves open is timed on ``TIMING`` when the base loads: ``--precision auto``'s
  bf16 is kept only if it also *runs* faster than fp32 (by ``SPEEDUP``), and ``--runtime auto`` takes OpenVINO
  only if it runs faster than torch. The CPU flags are not enough: on a Xeon whose AMX is not exposed (a VM) bf16
  ran 25-30% slower than fp32 through both torch and OpenVINO, while an AMD EPYC with the same AVX-512 BF16 flag ran
  it 1.7x faster; OpenVINO fp32 ran 2.1x torch fp32 on that EPYC and 0.7-1.0x on that Xeon. An explicit
  ``--precision`` or ``--runtime`` is run as asked.
- ``PROBE``: a fixed set of texts (short queries and passages that fill the model's window) embedded in fp32 and
  in the chosen precision when a base loads; below ``MIN_COSINE`` the base falls back to fp32 and logs both
  numbers. A precision that passes is *lossless* for embedlift: it keeps the float32 fingerprint, so caches,
  collections and adapters stay interchangeable with float32.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np

from embedlift.models.errors import InvalidInputError

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16", "fp16")
MIN_COSINE = 0.9999
SPEEDUP = 1.05  # on a CPU, auto leaves torch fp32 (then fp32) only for what runs TIMING at least this much faster

_PASSAGE = (
    "The company's revenue depends on the number of riders and drivers using its platform, the frequency of "
    "rides, and the prices charged. Competition, regulation of independent contractors, insurance costs and the "
    "pace of recovery in urban travel all affect results; the company may need additional capital, and its "
    "ability to attract and retain drivers during periods of high demand is uncertain. "
)
PROBE: tuple[str, ...] = (
    "How many active riders did the company report?",
    "What are the main risk factors?",
    "insurance reserves",
    "Who acquired the autonomous vehicle division?",
    "Drivers may be reclassified as employees.",
    "Bikes and scooters operate in several cities.",
    _PASSAGE * 3,  # past a 256-token window: cut at the model's limit, as long windows are
    (_PASSAGE * 2)[::-1],
)
# The timing set: 36 short questions, the shape of most forward passes a server runs (a query batch); its
# ratio bf16/fp32 was within a few percent of the full-window passages' on the CPUs measured.
TIMING: tuple[str, ...] = PROBE[:6] * 6


def cpu_bf16_instructions() -> list[str]:
    """The bf16 instructions torch sees on this CPU, of those its bf16 kernels use natively: AMX tiles and
    AVX-512 BF16 (the benchmarks name them with the machine they ran on)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    return [name for name, check in checks if getattr(cpu, check, lambda: False)()]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs torch's bf16 kernels natively (AMX tiles or AVX-512 BF16)."""
    return bool(cpu_bf16_instructions())


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` or ``cpu``; a CUDA device torch cannot see is refused."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise InvalidInputError(f"--device {device} asked for, but torch {torch.__version__} ({built}) sees no CUDA device; use --device cpu or auto")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0")
        return device
    if device != "cpu":
        raise InvalidInputError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def resolve_precision(precision: str, device: str) -> Precision:
    """The precision ``auto`` means on ``device`` (an explicit one is returned as it is)."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise InvalidInputError("--precision fp16 runs on CUDA devices only; on a CPU use bf16 (auto picks it where it is fast)")
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


@contextlib.contextmanager
def autocast(device: str, precision: str) -> Iterator[None]:
    """Run the enclosed forward passes in ``precision`` (fp32: as they are)."""
    if precision == "fp32":
        yield
        return
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype):
        yield


def timed(runs: Sequence[Callable[[], object]], repeats: int = 3) -> list[float]:
    """The fastest of ``repeats`` timed calls of each run, in seconds. The runs take turns, so a burst of load
    from elsewhere on the machine falls on all of them; each timed call follows an untimed one of the same run,
    which plans its shapes the first time and, later, lets the threads of the run before it (torch's OpenMP
    workers, OpenVINO's) go idle before the clock starts: in a server only one of them runs."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            run()
            started = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def min_cosine(reference: np.ndarray, other: np.ndarray) -> float:
    """The smallest cosine between matching rows (both L2-normalised)."""
    return float(np.min(np.sum(reference.astype(np.float64) * other.astype(np.float64), axis=1)))


def checked(reference: Callable[[Sequence[str]], np.ndarray], candidate: Callable[[Sequence[str]], np.ndarray], what: str, name: str) -> tuple[bool, float]:
    """``(keep the candidate, the probe's minimum cosine to the reference)``: the candidate (a precision or a
    runtime, named ``what`` in the log) is kept if its vectors of ``PROBE`` stay within ``MIN_COSINE`` of the
    reference's (torch in fp32), else not, logged with both numbers."""
    fidelity = min_cosine(reference(PROBE), candidate(PROBE))
    if fidelity < MIN_COSINE:
        logger.warning("%s in %s: minimum cosine to torch fp32 on the probe set %.6f < %.4f; running in torch fp32", name, what, fidelity, MIN_COSINE)
        return False, fidelity
    logger.info("%s runs in %s (minimum cosine to torch fp32 on the probe set %.6f)", name, what, fidelity)
    return True, fidelity
