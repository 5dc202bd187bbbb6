"""A model-free base encoder: hashed character n-grams, for tests and smoke checks where the model is not the
subject (stores, indexes, the registry, auth, limits, the HTTP layer).

It is a real ``Encoder`` (``--base hashing:<dim>``): texts sharing words get close vectors, it windows long
texts and counts tokens like a model (a token is a word or a punctuation mark), it is deterministic across
processes and machines (CRC32, never Python's salted ``hash``), and it loads in milliseconds without torch.
Its vectors are no good for real retrieval: use it where what is tested is what embedlift does with vectors.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedlift.models.encoders import Encoder, Role
from embedlift.models.errors import InvalidInputError
from embedlift.models.spec import HASHING_PREFIX, BaseSpec
from embedlift.models.windows import Span, normalize, plan_windows

_TOKEN = re.compile(r"\w+|[^\w\s]")
NGRAMS = (3, 4, 5)
VERSION = 1  # part of the fingerprint: a change to the hashing scheme is another base


class HashingEncoder(Encoder):
    """Signed feature hashing of each word's character n-grams (``#word#`` padded), L2-normalised.

    Args:
        dim: Output dimension.
        query_prompt: Text prefixed to queries before hashing.
        document_prompt: Text prefixed to documents.
        max_seq_length: Tokens the "model" reads; longer texts are split into windows.
        window_tokens: Tokens per window (default: ``max_seq_length`` less the longest prompt's tokens).
        window_stride: Tokens between window starts (default three quarters of the window).
    """

    def __init__(
        self,
        dim: int = 256,
        *,
        query_prompt: str = "",
        document_prompt: str = "",
        max_seq_length: int = 128,
        window_tokens: int | None = None,
        window_stride: int | None = None,
    ) -> None:
        if not 8 <= dim <= 65536:
            raise InvalidInputError(f"hashing dimension must be between 8 and 65536, got {dim}")
        self.dim = dim
        self.name = f"{HASHING_PREFIX}{dim}"
        self._prompts: dict[Role, str] = {"query": query_prompt, "document": document_prompt}
        self.max_seq_length = max_seq_length
        longest = max(len(_TOKEN.findall(p)) for p in self._prompts.values())
        self.window_tokens = window_tokens or max(8, max_seq_length - longest)
        if self.window_tokens > max_seq_length - longest:
            raise InvalidInputError(f"window_tokens must be at most {max_seq_length - longest} for {self.name}, got {self.window_tokens}")
        self.window_stride = window_stride or max(1, self.window_tokens * 3 // 4)
        if not 1 <= self.window_stride <= self.window_tokens:
            raise InvalidInputError(f"window_stride must be between 1 and window_tokens={self.window_tokens}, got {self.window_stride}")
        from embedlift.models.encoders import _digest

        self.fingerprint = f"hashing-{dim}:" + _digest(
            {"version": VERSION, "ngrams": NGRAMS, "prompts": self._prompts, "max_seq_length": max_seq_length}
        )
        self.calls = 0  # encode calls (tests: what the cache saved)

    @classmethod
    def from_spec(cls, spec: BaseSpec) -> HashingEncoder:
        assert spec.model is not None
        try:
            dim = int(spec.model[len(HASHING_PREFIX):])
        except ValueError:
            raise InvalidInputError(f"a hashing base is named hashing:<dimension>, e.g. hashing:256, got {spec.model!r}") from None
        return cls(
            dim, query_prompt=spec.query_prompt or "", document_prompt=spec.document_prompt or "",
            max_seq_length=spec.max_seq_length or 128, window_tokens=spec.window_tokens, window_stride=spec.window_stride,
        )

    @property
    def spec(self) -> BaseSpec:
        return BaseSpec(
            model=self.name, query_prompt=self._prompts["query"], document_prompt=self._prompts["document"],
            max_seq_length=self.max_seq_length, window_tokens=self.window_tokens, window_stride=self.window_stride,
        )

    def prompt(self, role: Role) -> str:
        return self._prompts[role]

    def _vector(self, text: str) -> np.ndarray:
        out = np.zeros(self.dim, np.float32)
        for word in _TOKEN.findall(text.lower()):
            padded = f"#{word}#"
            for n in NGRAMS:
                for i in range(max(1, len(padded) - n + 1)):
                    h = zlib.crc32(padded[i : i + n].encode())
                    out[h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        return out

    def encode(self, texts: Sequence[str], role: Role) -> np.ndarray:
        self.calls += 1
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        prefix = self._prompts[role]
        return normalize(np.stack([self._vector(prefix + t) for t in texts]))

    def split(self, texts: Sequence[str], role: Role) -> list[list[Span]]:
        return [
            plan_windows(t, [m.span() for m in _TOKEN.finditer(t)], self.window_tokens, self.window_stride) for t in texts
        ]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(_TOKEN.findall(t)) + 2 for t in texts]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(), "source": self.name, "max_seq_length": self.max_seq_length, "query_prompt": self._prompts["query"],
            "document_prompt": self._prompts["document"], "window_tokens": self.window_tokens, "window_stride": self.window_stride,
        }
