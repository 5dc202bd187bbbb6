"""Dynamic batching: concurrent requests share one forward pass of the base model.

A request awaits ``BatchQueue.submit``'s future on the event loop (``Engine``), a background job waits on it in
its thread (``BatchedEncoder``). One worker thread owns the model: each time the model frees up it takes what is
queued (interactive work before bulk work, then arrival order) up to a budget of ``max_batch_tokens`` tokens and
``max_batch_inputs`` inputs, as TEI's ``max-batch-tokens`` budgets, and runs one ``encode`` per role (queries and
documents carry different prompts); the encoder splits that into forward passes by its own token budget. Each
caller's inputs are queued longest first, so the batches cut from a large bulk call are of like lengths and pad
little. A request larger than the budget is served over several batches; a queue already holding
``max_queued_inputs`` refuses more at once (429 with Retry-After), as infinity's batch handler does, instead of
growing a backlog that only times out later.

Token lengths come from ``Encoder.input_lengths`` in the caller's thread: a local base tokenises each input
there once and keeps the ids for the worker's forward pass (``models/tokens.py``).

Why a worker thread and not the event loop: the model call releases the GIL inside torch, so the loop keeps
tokenizing, looking up the cache and encoding JSON while it runs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from embedlift.models.encoders import Encoder, Role, WrappedEncoder
from embedlift.models.errors import OverloadedError, UnavailableError
from embedlift.service import metrics

logger = logging.getLogger(__name__)

INTERACTIVE, BULK = 0, 1


@dataclass
class _Work:
    """One caller's inputs, handed out longest first (``order``); ``done`` counts the inputs already embedded
    (a large call spans batches)."""

    texts: Sequence[str]
    role: Role
    lengths: np.ndarray
    out: np.ndarray
    future: Future[np.ndarray]
    order: np.ndarray = field(init=False)
    taken: int = 0  # inputs handed to a batch so far (positions in ``order``)
    done: int = 0

    def __post_init__(self) -> None:
        self.order = np.argsort(-self.lengths, kind="stable")


@dataclass
class BatchStats:
    """Counters for ``/metrics`` and the benchmark: how well requests coalesce."""

    batches: int = 0
    inputs: int = 0
    model_seconds: float = 0.0
    sizes: list[int] = field(default_factory=list)  # last few batch sizes (bounded)

    def record(self, n: int, seconds: float) -> None:
        self.batches += 1
        self.inputs += n
        self.model_seconds += seconds
        self.sizes.append(n)
        if len(self.sizes) > 1024:
            del self.sizes[:512]


class BatchQueue:
    """The queue in front of one encoder, and the worker thread that drains it.

    Args:
        encoder: The base model (its ``encode`` is only ever called from the worker thread).
        max_batch_inputs: Inputs per model call at most.
        max_batch_tokens: Tokens per model call at most (the budget a batch is filled up to; an input longer
            than it goes alone). Default: the encoder's own forward-pass budget (a local base's ``batch_tokens``).
        max_queued_inputs: Inputs waiting at most; more are refused with ``OverloadedError`` (429).
    """

    def __init__(
        self, encoder: Encoder, *, max_batch_inputs: int = 256, max_batch_tokens: int | None = None, max_queued_inputs: int = 4096
    ) -> None:
        if max_batch_inputs < 1 or max_queued_inputs < max_batch_inputs:
            raise ValueError(f"need 1 <= max_batch_inputs <= max_queued_inputs, got {max_batch_inputs}, {max_queued_inputs}")
        self.encoder = encoder
        self.max_batch_inputs = max_batch_inputs
        # a remote or hashing base has no forward-pass budget of its own: inputs alone bound its batches
        self.max_batch_tokens = max_batch_tokens or int(getattr(encoder, "batch_tokens", None) or 1 << 30)
        self.max_queued_inputs = max_queued_inputs
        self.stats = BatchStats()
        self._heap: list[tuple[int, int, _Work]] = []
        self._queued = 0  # inputs not yet handed to a batch
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="embedlift-batcher", daemon=True)
        self._worker.start()

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, texts: Sequence[str], role: Role, priority: int = INTERACTIVE) -> Future[np.ndarray]:
        """Queue inputs; the future resolves to their ``(n, dim)`` vectors in order."""
        future: Future[np.ndarray] = Future()
        if not texts:
            future.set_result(np.zeros((0, self.encoder.dim), np.float32))
            return future
        lengths = np.asarray(self.encoder.input_lengths(texts, role), dtype=np.int64)  # tokenised here, once
        with self._cond:
            if self._closed:
                raise UnavailableError("the service is shutting down")
            # Bulk work may wait for room (it is a background job, not a caller holding a connection);
            # an interactive request over the bound is refused at once.
            while priority == BULK and self._queued > 0 and self._queued + len(texts) > self.max_queued_inputs:
                self._cond.wait(0.1)
            if priority == INTERACTIVE and self._queued > 0 and self._queued + len(texts) > self.max_queued_inputs:
                raise OverloadedError(
                    f"{self._queued} inputs already queued for the model (maximum {self.max_queued_inputs}); retry shortly"
                )
            work = _Work(texts=texts, role=role, lengths=lengths, out=np.empty((len(texts), self.encoder.dim), np.float32), future=future)
            heapq.heappush(self._heap, (priority, next(self._order), work))
            self._queued += len(texts)
            self._cond.notify_all()
        return future

    def close(self) -> None:
        """Stop the worker after the batch in progress; queued callers get an error."""
        with self._cond:
            self._closed = True
            pending = [w for _, _, w in self._heap]
            self._heap.clear()
            self._cond.notify_all()
        for work in pending:
            if not work.future.done():
                work.future.set_exception(UnavailableError("the service is shutting down"))
        self._worker.join(timeout=30)

    # ---------------------------------------------------------------------------------------- worker
    def _take(self) -> list[tuple[_Work, int, int]]:
        """Slices ``(work, start, stop)`` (positions in each work's ``order``) for one batch, in priority then
        arrival order, within the token and input budgets (at least one input)."""
        batch: list[tuple[_Work, int, int]] = []
        inputs = tokens = 0
        while self._heap and inputs < self.max_batch_inputs:
            _, _, work = self._heap[0]
            if work.future.cancelled():  # the caller went away (a request cancelled on disconnect)
                heapq.heappop(self._heap)
                self._queued -= len(work.texts) - work.taken
                work.taken = len(work.texts)
                continue
            start = stop = work.taken
            while stop < len(work.texts) and inputs < self.max_batch_inputs:
                cost = int(work.lengths[work.order[stop]])
                if inputs and tokens + cost > self.max_batch_tokens:
                    break
                tokens += cost
                inputs += 1
                stop += 1
            if stop == start:
                break  # the budget is full
            batch.append((work, start, stop))
            work.taken = stop
            if work.taken == len(work.texts):
                heapq.heappop(self._heap)
            if tokens >= self.max_batch_tokens:
                break
        self._queued -= inputs
        self._cond.notify_all()  # bulk submitters waiting for room
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take()
            for role in ("query", "document"):
                part = [(w, a, b) for w, a, b in batch if w.role == role]
                if part:
                    self._encode(role, part)

    def _encode(self, role: Role, part: list[tuple[_Work, int, int]]) -> None:
        texts = [w.texts[i] for w, a, b in part for i in w.order[a:b]]
        started = time.perf_counter()
        try:
            vectors = self.encoder.encode(texts, role)
        except BaseException as exc:  # the callers get the error; the worker keeps serving
            for work, _, _ in part:
                if not work.future.done():
                    work.future.set_exception(exc)
                    self._drop(work)
            return
        self.stats.record(len(texts), time.perf_counter() - started)
        metrics.BATCH_INPUTS.observe(len(texts))
        offset = 0
        for work, a, b in part:
            work.out[work.order[a:b]] = vectors[offset : offset + b - a]
            offset += b - a
            work.done += b - a
            if work.done == len(work.texts) and not work.future.done():
                work.future.set_result(work.out)

    def _drop(self, work: _Work) -> None:
        """Remove a failed caller's remaining slices from the queue."""
        with self._cond:
            kept = [item for item in self._heap if item[2] is not work]
            if len(kept) != len(self._heap):
                self._queued -= len(work.texts) - work.taken
                work.taken = len(work.texts)
                self._heap = kept
                heapq.heapify(self._heap)


class BatchedEncoder(WrappedEncoder):
    """The base encoder seen through a ``BatchQueue``: same interface, calls coalesced with other threads'.

    Tokenizer work (``split``, ``count_tokens``) runs in the caller's thread; only ``encode`` is queued.
    ``priority`` is ``INTERACTIVE`` for requests and ``BULK`` for background jobs, so an index job does not
    hold up the questions of users.
    """

    def __init__(self, queue: BatchQueue, priority: int = INTERACTIVE) -> None:
        super().__init__(queue.encoder)
        self.queue = queue
        self.priority = priority

    def encode(self, texts: Sequence[str], role: Role) -> np.ndarray:
        return self.queue.submit(texts, role, self.priority).result()
