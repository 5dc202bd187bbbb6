"""A remote base: any server that speaks the OpenAI embeddings protocol, through the official ``openai`` SDK.

OpenAI's ``text-embedding-3-small``, or vLLM, TEI, infinity, Ollama, embedlift itself: the model is a black
box the adapter is trained on and served over. With the base-embedding cache in front (``CachedEncoder``),
each distinct text costs one API call, ever.

- Identity: the fingerprint hashes the normalised base URL, the model and ``dimensions`` (and the prompts),
  so two servers that both call a model ``base`` never share cache entries. It never contains the API key.
- Requests: batches of at most ``max_batch`` inputs and about ``max_batch_tokens`` estimated tokens, at most
  ``max_concurrency`` in flight. Retries with exponential backoff on 408/409/429/5xx and timeouts, honouring
  ``Retry-After``, are the SDK's own (``max_retries``). A wrong key or an unknown model fails at once with
  a message that says so (the SDK does not retry 401/403/404).
- Long inputs: the remote truncates (or refuses) past its own limit (8191 tokens for OpenAI). tiktoken
  would download its encodings at run time, so windows are cut either by a configured Hugging Face
  tokenizer (``tokenizer=``, loaded locally) or by a conservative character budget:
  ``max_input_tokens * chars_per_token`` characters (default 2 characters per token, well under English's
  ~4, so a window never overflows), cut back to a word boundary.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from tqdm.auto import tqdm

from embedlift.models.encoders import Encoder, Role
from embedlift.models.errors import InvalidInputError, RemoteError
from embedlift.models.spec import BaseSpec
from embedlift.models.windows import Span, normalize, plan_windows

PREFIX = "openai:"
OPENAI_URL = "https://api.openai.com/v1"
KNOWN_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}


def normalize_base_url(url: str) -> str:
    """``HTTP://Host:80/v1/`` and ``http://host/v1`` are one server: lower-case scheme and host, default port
    dropped, no trailing slash."""
    parts = urlsplit(str(url).strip())
    host = (parts.hostname or "").lower()
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    netloc = host if parts.port in (None, default) else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


def plan_char_windows(text: str, size: int, stride: int) -> list[Span]:
    """Overlapping windows of at most ``size`` characters, ``stride`` apart, edges moved back to a space when
    one is in the second half of the window. Their union covers the text."""
    if len(text) <= size:
        return [(0, len(text))]
    spans: list[Span] = []
    start = 0
    while True:
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + size // 2, end)
            if cut > start:
                end = cut
        spans.append((start, end))
        if end >= len(text):
            return spans
        nxt = min(start + stride, end)
        space = text.rfind(" ", start + 1, nxt)
        start = space + 1 if space > start else nxt


class OpenAIEncoder(Encoder):
    """A base served over the OpenAI embeddings protocol.

    Args:
        model: The remote's model name (``text-embedding-3-small``; for embedlift itself ``base``).
        base_url: The API root (``https://api.openai.com/v1``, ``http://127.0.0.1:8080/v1``); default
            ``OPENAI_BASE_URL`` or OpenAI's.
        api_key: Default ``OPENAI_API_KEY``; servers without auth accept any value (``"unused"`` then).
        dimensions: Ask the remote for shorter vectors (``text-embedding-3-*`` support it).
        query_prompt: Prefix added to queries (part of the fingerprint and the cache key).
        document_prompt: Prefix added to documents.
        max_batch: Inputs per request (OpenAI allows 2048).
        max_batch_tokens: Estimated tokens per request (OpenAI allows 300k).
        max_concurrency: Requests in flight.
        max_retries: Retries of 408/409/429/5xx and timeouts, with backoff honouring ``Retry-After``.
        timeout: Seconds per request.
        max_input_tokens: The remote's per-input limit (8191 for OpenAI).
        chars_per_token: The character budget's assumption when no ``tokenizer`` is given.
        tokenizer: A Hugging Face tokenizer (local path or cached hub id) that counts like the remote's.
        progress: Show a progress bar for runs of more than one batch.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        dimensions: int | None = None,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        max_batch: int = 256,
        max_batch_tokens: int = 250_000,
        max_concurrency: int = 4,
        max_retries: int = 6,
        timeout: float = 60.0,
        max_input_tokens: int = 8191,
        chars_per_token: float = 2.0,
        tokenizer: str | None = None,
        progress: bool = True,
        **ignored: Any,
    ) -> None:
        import openai

        if not model:
            raise InvalidInputError("a remote base needs a model name: --base openai:<model>")
        try:
            self.client = openai.OpenAI(base_url=base_url, api_key=api_key or None, max_retries=max_retries, timeout=timeout)
        except openai.OpenAIError as exc:  # no key anywhere
            raise InvalidInputError(f"{exc} (for a server without auth, set OPENAI_API_KEY=unused)") from exc
        self.model = model
        self.base_url = normalize_base_url(str(self.client.base_url))
        self.dimensions = dimensions
        self.name = f"{PREFIX}{model}"
        self._prompts: dict[Role, str] = {"query": query_prompt or "", "document": document_prompt or ""}
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.max_concurrency = max_concurrency
        self.max_input_tokens = max_input_tokens
        self.chars_per_token = chars_per_token
        self.progress = progress
        self.tokenizer_name = tokenizer
        self.tokenizer = None
        if tokenizer is not None:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            except Exception as exc:
                raise InvalidInputError(f"cannot load tokenizer {tokenizer!r} for windowing: {exc}") from exc
        identity = {"base_url": self.base_url, "model": model, "dimensions": dimensions, "prompts": self._prompts}
        digest = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=8).hexdigest()
        self.fingerprint = f"openai-{model.replace('/', '-')}:{digest}"
        self._dim: int | None = dimensions or (KNOWN_DIMS.get(model) if self.base_url == OPENAI_URL else None)
        self.requests = 0  # API calls made (tests and logs)

    @property
    def dim(self) -> int:  # type: ignore[override]
        """Known from ``dimensions`` or the model's name; otherwise asked of the remote once."""
        if self._dim is None:
            self._dim = int(self._call(["dimension probe"]).shape[1])
        return self._dim

    @property
    def needs_dim(self) -> bool:
        return self._dim is None

    def set_dim(self, dim: int) -> None:
        """The dimension as the base-embedding cache knows it (saves the probe call)."""
        self._dim = dim

    @property
    def spec(self) -> BaseSpec:
        return BaseSpec(
            model=self.name, query_prompt=self._prompts["query"], document_prompt=self._prompts["document"],
            base_url=self.base_url, dimensions=self.dimensions, tokenizer=self.tokenizer_name, max_input_tokens=self.max_input_tokens,
        )

    def prompt(self, role: Role) -> str:
        return self._prompts[role]

    # -------------------------------------------------------------------------------------------- calls
    def _call(self, inputs: list[str]) -> np.ndarray:
        import openai

        kwargs: dict[str, Any] = {"model": self.model, "input": inputs, "encoding_format": "float"}
        if self.dimensions is not None:
            kwargs["dimensions"] = self.dimensions
        try:
            self.requests += 1
            response = self.client.embeddings.create(**kwargs)
        except openai.AuthenticationError as exc:
            raise RemoteError(f"{self.base_url} refused the API key (401): set OPENAI_API_KEY or --openai-api-key") from exc
        except openai.PermissionDeniedError as exc:
            raise RemoteError(f"{self.base_url} denied access to model {self.model!r} (403): {_message(exc)}") from exc
        except openai.NotFoundError as exc:
            raise RemoteError(f"{self.base_url} has no model {self.model!r} (404): {_message(exc)}") from exc
        except openai.BadRequestError as exc:
            raise RemoteError(f"{self.base_url} rejected the request (400): {_message(exc)}") from exc
        except openai.APIStatusError as exc:
            raise RemoteError(f"{self.base_url} failed after retries ({exc.status_code}): {_message(exc)}") from exc
        except openai.APIConnectionError as exc:  # includes timeouts, after the SDK's retries
            raise RemoteError(f"cannot reach {self.base_url} after retries: {exc}") from exc
        data = sorted(response.data, key=lambda d: d.index)
        if len(data) != len(inputs):
            raise RemoteError(f"{self.base_url} returned {len(data)} embeddings for {len(inputs)} inputs")
        vectors = np.asarray([d.embedding for d in data], dtype=np.float32)
        if vectors.ndim != 2 or not np.isfinite(vectors).all():
            raise RemoteError(f"{self.base_url} returned malformed embeddings (shape {vectors.shape})")
        return normalize(vectors)  # cosine everywhere; not every OpenAI-protocol server normalises

    def _batches(self, texts: list[str]) -> list[tuple[int, int]]:
        """Consecutive [start, end) ranges within the input and token budgets."""
        ranges, start, tokens = [], 0, 0
        for i, text in enumerate(texts):
            cost = self._estimate(text)
            if i > start and (i - start >= self.max_batch or tokens + cost > self.max_batch_tokens):
                ranges.append((start, i))
                start, tokens = i, 0
            tokens += cost
        if start < len(texts):
            ranges.append((start, len(texts)))
        return ranges

    def encode(self, texts: Sequence[str], role: Role) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        prefix = self._prompts[role]
        inputs = [prefix + t for t in texts]
        ranges = self._batches(inputs)
        out: list[np.ndarray | None] = [None] * len(ranges)
        bar = tqdm(total=len(inputs), desc=f"embedding ({self.name})", unit="text", file=sys.stderr,
                   disable=not self.progress or len(ranges) <= 1)
        with bar, ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = {pool.submit(self._call, inputs[a:b]): n for n, (a, b) in enumerate(ranges)}
            for future, n in futures.items():
                out[n] = future.result()
                bar.update(ranges[n][1] - ranges[n][0])
        vectors: np.ndarray = np.concatenate([v for v in out if v is not None])
        if self._dim is None:
            self._dim = vectors.shape[1]
        return vectors

    # ------------------------------------------------------------------------------------------ windows
    def _estimate(self, text: str) -> int:
        return int(len(text) / self.chars_per_token) + 1

    def split(self, texts: Sequence[str], role: Role) -> list[list[Span]]:
        budget = self.max_input_tokens - (len(self._prompts[role]) // 2 + 2)
        if self.tokenizer is not None:
            enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            return [plan_windows(t, o, budget, max(1, budget * 3 // 4)) for t, o in zip(texts, enc["offset_mapping"], strict=True)]
        size = int(budget * self.chars_per_token)
        return [plan_char_windows(t, size, max(1, size * 3 // 4)) for t in texts]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Real counts with a ``tokenizer``, else an estimate of about 4 characters per token."""
        if self.tokenizer is not None and texts:
            return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        return [max(1, len(t) // 4) for t in texts]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "dim": self._dim,  # known once anything was embedded; describing must not call the remote
            "source": self.name,
            "base_url": self.base_url,
            "dimensions": self.dimensions,
            "query_prompt": self._prompts["query"],
            "document_prompt": self._prompts["document"],
            "max_input_tokens": self.max_input_tokens,
            "tokenizer": self.tokenizer_name,
        }


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(exc)
