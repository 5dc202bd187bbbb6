"""Token ids on their way through a request, and forward passes sized by tokens.

A query used to be tokenised three times: to plan its windows, to count its tokens for ``usage``, and again
inside ``SentenceTransformer.encode``. Now window planning keeps the model input ids of every text that fits
in one window (``TokenMemo``), the queue's token budget reads their lengths, and the model is handed the ids
(``LocalEncoder.encode``); an input is tokenised again only if its ids were evicted before it reached the model.

``token_batches`` sizes forward passes as TEI's ``max-batch-tokens`` does: inputs sorted longest first, each
pass holding as many as fit in a budget of padded tokens (inputs x the longest), so 64 short questions run as
one pass and 16 full-window passages as another, instead of a fixed count of either.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np


class Tokenize:
    """A model's tokenizer with one fixed setting: no special tokens, no truncation, no padding.

    A fast tokenizer's Rust ``tokenizers.Tokenizer`` is called directly (a copy of its own, those settings set
    once). transformers' wrapper sets them again on every call and turns each encoding into dicts and a
    ``BatchEncoding``. For one of the benchmark's short questions that took 31 us, against 19 us called directly
    (a short script timing both; the ids and offsets are the same), on the event loop of every request. A slow
    (Python) tokenizer goes through the wrapper. Thread-safe: nothing is set per call.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._rust: Any = None
        if backend is not None:
            from tokenizers import Tokenizer

            self._rust = Tokenizer.from_str(backend.to_str())
            self._rust.no_truncation()
            self._rust.no_padding()
            # as the wrapper passes it: whether text that spells a special token (``[SEP]``) is split as words
            self._rust.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text."""
        if self._rust is None:
            return list(self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"])
        return [e.ids for e in self._rust.encode_batch(list(texts), add_special_tokens=False)]

    def ids_and_offsets(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """The ids of each text and each token's character span in it."""
        if self._rust is None:
            enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            return list(enc["input_ids"]), [[tuple(o) for o in offsets] for offsets in enc["offset_mapping"]]
        encodings = self._rust.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]


class TokenMemo:
    """The most recent ``max_entries`` values by key (thread-safe), each taken at most once.

    Entries live from window planning (a request thread) to the forward pass (the batch worker); ``take``
    removes them, so the memo holds only what is in flight and its bound is only a safety net.
    """

    def __init__(self, max_entries: int = 8192) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: Hashable, value: np.ndarray) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            return self._items.get(key)

    def take(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


def token_batches(lengths: Sequence[int], max_tokens: int, max_inputs: int) -> list[np.ndarray]:
    """Indices of ``lengths`` grouped into forward passes.

    Inputs are taken longest first; a pass grows while ``inputs x longest <= max_tokens`` (padded tokens) and
    it has at most ``max_inputs`` inputs. An input longer than the budget runs alone. Sorting keeps padding
    small, as sentence-transformers' own length sort does.
    """
    if max_tokens < 1 or max_inputs < 1:
        raise ValueError(f"max_tokens and max_inputs must be >= 1, got {max_tokens}, {max_inputs}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    passes: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(1, int(lengths[order[start]]))
        size = max(1, min(max_inputs, max_tokens // longest))
        passes.append(order[start : start + size])
        start += size
    return passes


def pad(ids: Sequence[np.ndarray], pad_id: int, *, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, ``(n, longest)`` int64, padded on the side the tokenizer pads
    (``left`` for the decoder-style embedding models whose tokenizers say ``padding_side="left"``)."""
    longest = max(len(x) for x in ids)
    input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), longest), dtype=np.int64)
    for i, x in enumerate(ids):
        where = slice(longest - len(x), longest) if left else slice(0, len(x))
        input_ids[i, where] = x
        mask[i, where] = 1
    return input_ids, mask
