"""Long texts, never silently truncated.

A base model reads only its first ``max_seq_length`` tokens. A document longer than that is split into
overlapping windows (character spans of the original text, cut at word boundaries), each window is embedded
on its own, and a document scores against a query by the best of its windows. A query (or an input to
``/embed``) longer than the window is pooled: the normalised mean of its windows' vectors.

Both training and evaluation score documents this way, so an adapter is trained for the scoring it is
served with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from embedlift.models.encoders import Encoder, Role

Span = tuple[int, int]


def _mid_word(text: str, pos: int) -> bool:
    """True when ``pos`` falls between two alphanumeric characters, i.e. cutting there splits a word."""
    return 0 < pos < len(text) and text[pos - 1].isalnum() and text[pos].isalnum()


def plan_windows(text: str, offsets: Sequence[Span], size: int, stride: int) -> list[Span]:
    """Cut ``text`` into overlapping windows of at most ``size`` tokens, ``stride`` tokens apart.

    Args:
        text: The text the offsets index into.
        offsets: Character span of each token, as a fast tokenizer's ``offset_mapping`` gives it
            (special tokens excluded).
        size: Maximum tokens per window.
        stride: Tokens between window starts; ``stride < size`` makes windows overlap.

    Returns:
        Character spans, in order, whose union covers every token of ``text``. A text that fits
        in one window gives ``[(0, len(text))]``. Window edges are moved back to a word boundary when
        one is near, so that re-tokenizing a window's text gives the same tokens (a cut inside a word
        re-tokenizes into more pieces and could overflow the model's window).
    """
    if size < 1 or not 1 <= stride <= size:
        raise ValueError(f"window size must be >= 1 and 1 <= stride <= size, got size={size}, stride={stride}")
    n = len(offsets)
    if n <= size:
        return [(0, len(text))]
    slack = max(1, size // 8)  # how far an edge may move back to reach a word boundary
    spans: list[Span] = []
    start = 0
    while True:
        end = min(start + size, n)  # exclusive token index
        if end < n:
            for cand in range(end, max(start + 1, end - slack) - 1, -1):
                if not _mid_word(text, offsets[cand - 1][1]):
                    end = cand
                    break
        spans.append((offsets[start][0] if spans else 0, offsets[end - 1][1] if end < n else len(text)))
        if end >= n:
            return spans
        nxt = min(start + stride, end)
        for cand in range(nxt, max(start + 1, nxt - slack) - 1, -1):
            if not _mid_word(text, offsets[cand][0]):
                nxt = cand
                break
        start = nxt


@dataclass(frozen=True)
class WindowedVectors:
    """Every window of a list of documents, embedded.

    Attributes:
        vectors: ``(n_windows, d)`` float32, L2-normalised, windows of one document contiguous.
        owner: ``(n_windows,)`` int64, the index of the document each window belongs to (non-decreasing).
        spans: Character span of each window in its document's text.
        n_docs: Number of documents.
    """

    vectors: np.ndarray
    owner: np.ndarray
    spans: list[Span]
    n_docs: int

    @property
    def n_windowed(self) -> int:
        """How many documents needed more than one window."""
        counts = np.bincount(self.owner, minlength=self.n_docs)
        return int((counts > 1).sum())

    def bounds(self) -> np.ndarray:
        """``(n_docs + 1,)`` window offsets: document ``i``'s windows are ``bounds[i]:bounds[i + 1]``."""
        return np.r_[0, np.cumsum(np.bincount(self.owner, minlength=self.n_docs))]

    def per_document(self) -> list[tuple[list[Span], np.ndarray]]:
        """Each document's window spans and vectors, in document order (its windows are contiguous)."""
        bounds = self.bounds()
        return [(self.spans[a:b], self.vectors[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def map(self, vectors: np.ndarray) -> WindowedVectors:
        """The same windows with other vectors (e.g. the adapter's document view)."""
        return WindowedVectors(vectors=vectors, owner=self.owner, spans=self.spans, n_docs=self.n_docs)


def embed_documents(encoder: Encoder, texts: Sequence[str], *, windows: bool = True) -> WindowedVectors:
    """Embed documents window by window.

    Args:
        encoder: The base encoder (usually wrapped by the cache).
        texts: Document texts.
        windows: ``False`` embeds each document whole, so the model truncates it to its window. Only for
            comparisons (the "truncated" rows of the quality benchmark); callers say so when they use it.
    """
    spans = encoder.split(texts, "document") if windows else [[(0, len(t))] for t in texts]
    flat = [text[a:b] for text, doc_spans in zip(texts, spans, strict=True) for a, b in doc_spans]
    vectors = encoder.encode(flat, "document") if flat else np.zeros((0, encoder.dim), np.float32)
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), [len(s) for s in spans])
    return WindowedVectors(
        vectors=vectors, owner=owner, spans=[s for doc_spans in spans for s in doc_spans], n_docs=len(texts)
    )


def embed_pooled(
    encoder: Encoder, texts: Sequence[str], role: Role, *, spans: Sequence[Sequence[Span]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Embed texts one vector each: a text longer than the window gets the normalised mean of its windows.

    Args:
        spans: The texts' windows when the caller already has them (``encoder.split``), to tokenize once.

    Returns:
        ``(vectors (n, d) float32 normalised, n_windows (n,) int64)``.
    """
    spans = encoder.split(texts, role) if spans is None else spans
    flat, counts = window_texts(texts, spans)
    if not flat:
        return np.zeros((0, encoder.dim), np.float32), counts
    return pool(encoder.encode(flat, role), counts), counts


def window_texts(texts: Sequence[str], spans: Sequence[Sequence[Span]]) -> tuple[list[str], np.ndarray]:
    """``(every window's text in order, windows per text)``."""
    flat = [text[a:b] for text, text_spans in zip(texts, spans, strict=True) for a, b in text_spans]
    return flat, np.array([len(s) for s in spans], dtype=np.int64)


def pool(window_vectors: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One vector per text from its windows' (``counts`` per text, in order): the normalised mean."""
    if len(window_vectors) == len(counts):
        return window_vectors
    owner = np.repeat(np.arange(len(counts)), counts)
    pooled = np.zeros((len(counts), window_vectors.shape[1]), np.float32)
    np.add.at(pooled, owner, window_vectors)
    return normalize(pooled)


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation, float32; a zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def best_window_scores(scores: np.ndarray, owner: np.ndarray, n_docs: int) -> np.ndarray:
    """Per-document scores as the maximum over each document's windows.

    Args:
        scores: ``(n_queries, n_windows)`` similarities.
        owner: ``(n_windows,)`` document index per window, non-decreasing (as ``WindowedVectors`` keeps it).
        n_docs: Number of documents; every document must own at least one window.

    Returns:
        ``(n_queries, n_docs)`` scores.
    """
    if scores.shape[1] == n_docs:  # one window per document
        return scores
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    return np.maximum.reduceat(scores, starts, axis=1)
