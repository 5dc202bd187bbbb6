"""How a local base's forward pass runs: token ids in, L2-normalised float32 sentence vectors out.

``auto`` (the default) times torch and OpenVINO at load on a CPU where OpenVINO is installed and runs the faster
(else torch); what runs is checked against torch fp32 at load (``models/precision.py``), and ``auto`` drops
OpenVINO if the conversion fails.

- ``TorchForward``: the sentence-transformers modules in torch, in fp32 or under ``torch.autocast`` (bf16,
  fp16). In fp32 it is the reference every other runtime and precision is checked against.
- ``OpenVINOForward``: the model's transformer (the first module) converted once with ``openvino.convert_model``
  (no optimum, no ONNX export) and compiled for the CPU in the chosen precision; its token embeddings go through
  the model's own pooling and normalisation modules in torch, exactly as the torch runtime's do. Dynamic batch
  and sequence shapes. The converted model is kept under ``cache_dir/<fingerprint>/`` and OpenVINO's compiled
  blobs under ``cache_dir/compiled/``, so a second start neither converts nor compiles.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embedlift.models.errors import InvalidInputError
from embedlift.models.precision import autocast

logger = logging.getLogger(__name__)

Runtime = Literal["auto", "torch", "openvino"]
RUNTIMES: tuple[Runtime, ...] = ("auto", "torch", "openvino")


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def runtime_candidates(runtime: str, device: str) -> tuple[Runtime, ...]:
    """The runtimes ``runtime`` leaves open on ``device``, in order of preference: ``auto`` is torch and OpenVINO on
    a CPU where the ``openvino`` extra is installed (the encoder times both at load: OpenVINO fp32 ran 2.1x torch
    fp32 on one 2-core CPU and 0.7-1.0x on another, ``benchmarks/serving.py``), else torch."""
    if runtime not in RUNTIMES:
        raise InvalidInputError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if runtime != "auto":
        return (runtime,)
    return ("torch", "openvino") if device == "cpu" and openvino_installed() else ("torch",)


def _features(model: Any, input_ids: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """The inputs the model's tokenizer would give it (``token_type_ids`` zeros where the model takes them)."""
    import torch

    features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if "token_type_ids" in getattr(model.tokenizer, "model_input_names", ()):
        features["token_type_ids"] = torch.zeros_like(features["input_ids"])
    return features


def _normalized(vectors: Any) -> np.ndarray:
    import torch

    return np.ascontiguousarray(torch.nn.functional.normalize(vectors.float(), p=2, dim=1).cpu().numpy(), dtype=np.float32)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the calling thread, and restored after.

    Around the pooling that follows an OpenVINO forward pass: torch's OpenMP workers, woken for a mean over a
    small batch, go on spinning after it, on the cores OpenVINO's threads need for the next pass. With one
    torch thread there, OpenVINO bf16 measured about 1.4x the queries/s at batches of 8 and 1.15-1.25x at
    batches of 16 on 2 cores (the benchmark's short questions); the pooling itself is a few microseconds.
    """
    import torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


class TorchForward:
    """The whole sentence-transformers model in torch on ``device``, in ``precision``."""

    def __init__(self, model: Any, device: str, precision: str) -> None:
        self.model, self.device, self.precision = model, device, precision

    def __call__(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        features = {k: v.to(self.device) for k, v in _features(self.model, input_ids, mask).items()}
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self.model(features)["sentence_embedding"]
        return _normalized(out)


class OpenVINOForward:
    """The model's transformer compiled by OpenVINO for the CPU; pooling and normalisation as the model's own.

    Args:
        model: The loaded ``SentenceTransformer`` (its first module must be a Hugging Face transformer).
        precision: ``fp32`` or ``bf16`` (OpenVINO's ``INFERENCE_PRECISION_HINT``).
        cache_dir: Where the converted and compiled models are kept.
        key: The converted model's folder name (the base's fingerprint: same weights, same model).
        threads: Inference threads (``INFERENCE_NUM_THREADS``).
    """

    def __init__(self, model: Any, precision: str, cache_dir: Path, key: str, threads: int) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise InvalidInputError("--runtime openvino needs the openvino package: pip install 'embedlift[openvino]'") from exc
        import torch

        if precision not in ("fp32", "bf16"):
            raise InvalidInputError(f"--runtime openvino runs fp32 or bf16 on the CPU, not {precision}")
        modules = list(model)
        transformer = getattr(modules[0], "auto_model", None)
        if transformer is None:
            raise InvalidInputError(f"--runtime openvino: the model's first module ({type(modules[0]).__name__}) is not a transformer")
        self.model, self._rest, self.precision = model, modules[1:], precision
        xml = cache_dir / key.replace(":", "-") / "model.xml"
        started = time.perf_counter()
        if not xml.exists():
            example = _features(model, np.ones((2, 8), np.int64), np.ones((2, 8), np.int64))
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent branches of the model code
                converted = ov.convert_model(transformer, example_input=example)
            xml.parent.mkdir(parents=True, exist_ok=True)
            tmp = xml.with_name("partial.xml")
            ov.save_model(converted, tmp, compress_to_fp16=False)  # the weights as they are (fp32)
            tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
            tmp.replace(xml)  # the .xml last: present means complete
            logger.info("converted %s for OpenVINO in %.1f s (%s)", key, time.perf_counter() - started, xml.parent)
        core = ov.Core()
        core.set_property({"CACHE_DIR": str(cache_dir / "compiled")})
        self._inputs = {i.get_any_name() for i in core.read_model(xml).inputs}
        self._compiled = core.compile_model(
            str(xml), "CPU",
            {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"},
        )
        self._request = self._compiled.create_infer_request()
        # What it really computes in: on a CPU without bf16 instructions OpenVINO compiles a bf16 hint as f32.
        ran = "bf16" if self._compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16 else "fp32"
        if ran != precision:
            logger.info("OpenVINO compiled %s as fp32: this CPU has no bf16 instructions (its capabilities: %s)", precision,
                        ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
        self.precision = ran
        logger.info("OpenVINO %s ready in %.1f s", ran, time.perf_counter() - started)

    def __call__(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        features = _features(self.model, input_ids, mask)
        # One request, reused: the batch worker is the only caller once the base has loaded.
        result = self._request.infer({k: v.numpy() for k, v in features.items() if k in self._inputs})
        out: dict[str, Any] = {"token_embeddings": torch.from_numpy(np.asarray(result[0])), "attention_mask": features["attention_mask"]}
        with torch.inference_mode(), torch_threads(1):
            for module in self._rest:
                out = module(out)
            return _normalized(out["sentence_embedding"])
