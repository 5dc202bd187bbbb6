"""The service's plain-Python engine: base encoder, base-embedding cache and adapter registry.

HTTP controllers only resolve a request, call the engine and shape the answer (infinity's split), so every
behaviour here is testable without a server. A request resolves its adapter once, at its start, and uses
that object to the end: swapping the active adapter replaces one reference under a lock and never changes
what an in-flight request computes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedlift.models.cache import CachedEncoder, EmbeddingCache
from embedlift.models.checkpoint import CONFIG_FILE, Checkpoint, load_checkpoint
from embedlift.models.encoders import Encoder, Role, load_encoder
from embedlift.models.errors import EmbedliftError, NotFoundError
from embedlift.models.windows import embed_pooled
from embedlift.service.settings import Settings

logger = logging.getLogger(__name__)

BASE = "base"


@dataclass(frozen=True)
class LoadedAdapter:
    """A registered adapter: the loaded checkpoint and its registry version."""

    checkpoint: Checkpoint
    version: int

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class EmbedResult:
    """Vectors for a request and what produced them.

    Attributes:
        vectors: ``(n, d)`` float32.
        adapter: ``name@version`` of the adapter used, or ``base``.
        windows: Windows each input was split into (1 = it fitted the model's window).
        tokens: Tokens the inputs cost the base model.
    """

    vectors: np.ndarray
    adapter: str
    windows: list[int]
    tokens: int


class Engine:
    """Owns the base encoder and the adapters; thread-safe.

    Args:
        encoder: The base, wrapped by the base-embedding cache.
        adapters: Checkpoints to register (each at version 1).
        active: Name of the adapter to activate, or ``None`` to serve the base.
    """

    def __init__(self, encoder: CachedEncoder, adapters: Sequence[Checkpoint] = (), active: str | None = None) -> None:
        self.encoder = encoder
        self._lock = threading.Lock()
        self._adapters: dict[str, LoadedAdapter] = {c.name: LoadedAdapter(c, 1) for c in adapters}
        self._active: LoadedAdapter | None = None
        if active is not None:
            self._active = self._get(active)

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        """Load the base, open the cache under ``data_dir`` and register every checkpoint in ``adapters_dir``."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        base = load_encoder(settings.base, batch_size=settings.batch_size)
        encoder = CachedEncoder(base, EmbeddingCache(settings.data_dir / "base-embeddings.sqlite3"), progress=False)
        return cls(encoder, load_adapters_dir(settings.adapters_dir, base), settings.adapter)

    @property
    def base(self) -> Encoder:
        return self.encoder.inner

    @property
    def active(self) -> LoadedAdapter | None:
        return self._active

    def adapters(self) -> list[LoadedAdapter]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda a: a.name)

    def _get(self, name: str) -> LoadedAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            known = sorted(self._adapters)
            raise NotFoundError(
                f"unknown adapter {name!r}; available: {[BASE, *known]}"
            ) from None

    def resolve(self, name: str | None) -> LoadedAdapter | None:
        """``None``: the active adapter (or the base when none is active); ``"base"``: no adapter."""
        if name == BASE:
            return None
        with self._lock:
            return self._active if name is None else self._get(name)

    def embed(
        self,
        texts: Sequence[str],
        role: Role,
        adapter: str | None = None,
        *,
        normalize_output: bool = True,
        truncate: bool = False,
    ) -> EmbedResult:
        """Embed inputs through the base (cached) and the resolved adapter.

        An input longer than the model's window is the normalised mean of its windows' vectors (no content
        dropped) unless ``truncate`` asks for its first window only.
        """
        chosen = self.resolve(adapter)
        if truncate:
            spans = self.encoder.split(texts, role)
            vectors = self.encoder.encode([t[s[0][0] : s[0][1]] for t, s in zip(texts, spans, strict=True)], role)
            windows = [1] * len(texts)
        else:
            vectors, counts = embed_pooled(self.encoder, texts, role)
            windows = counts.tolist()
        if chosen is not None:
            a = chosen.checkpoint.adapter
            apply = a.transform_query if role == "query" else a.transform_document
            vectors = apply(vectors, normalize=normalize_output)
        tokens = sum(self.encoder.count_tokens(texts))
        return EmbedResult(vectors=vectors, adapter=chosen.label if chosen else BASE, windows=windows, tokens=tokens)


def load_adapters_dir(adapters_dir: Path, base: Encoder) -> list[Checkpoint]:
    """Every checkpoint directly under ``adapters_dir`` that loads for ``base``; others are logged and skipped
    (one bad checkpoint must not keep the service from starting)."""
    if not adapters_dir.is_dir():
        return []
    loaded = []
    for path in sorted(p for p in adapters_dir.iterdir() if (p / CONFIG_FILE).is_file() and not p.name.startswith(".")):
        try:
            loaded.append(load_checkpoint(path, expected_fingerprint=base.fingerprint))
        except EmbedliftError as exc:
            logger.warning("skipping adapter %s: %s", path, exc.message)
    return loaded
