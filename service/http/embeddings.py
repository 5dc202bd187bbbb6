"""Embeddings: embedlift's ``/embed`` and the OpenAI-compatible ``/v1/embeddings`` and ``/v1/models``."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from litestar import Controller, Response, get, post
from litestar.params import JSONBody

from embedlift.models.bpe import decode, is_token_ids
from embedlift.models.errors import InvalidInputError
from embedlift.service.engine import BASE, EmbedResult
from embedlift.service.http.state import EngineDep
from embedlift.service.http.openapi import READ, SECURITY, errors
from embedlift.service.schemas import (
    Embedding,
    EmbedRequest,
    EmbedResponse,
    ModelCard,
    ModelList,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    Usage,
    WindowEmbedding,
)

ADAPTER_HEADER = "x-embedlift-adapter"
WINDOWS_HEADER = "x-embedlift-windows"
DOCUMENT_SUFFIX = ":document"


def encode_vector(v: np.ndarray, encoding_format: str) -> list[float] | str:
    """A float list, or base64 of little-endian float32 (what the openai SDK asks for by default)."""
    if encoding_format == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode()
    values: list[float] = v.tolist()
    return values


def encode_result(result: EmbedResult, encoding_format: str) -> list[Embedding]:
    windows = result.window_vectors
    return [
        Embedding(
            index=i,
            embedding=encode_vector(v, encoding_format),
            windows=None
            if windows is None
            else [WindowEmbedding(span=span, embedding=encode_vector(w, encoding_format)) for span, w in zip(*windows[i], strict=True)],
        )
        for i, v in enumerate(result.vectors)
    ]


def result_headers(result: EmbedResult) -> dict[str, str]:
    return {ADAPTER_HEADER: result.adapter, WINDOWS_HEADER: ",".join(map(str, result.windows))}


async def openai_texts(value: Any, model: str) -> tuple[list[str], int | None]:
    """OpenAI's ``input`` as texts, and the number of token ids when it came as ids (``models/bpe.py``: decoded
    with the encoding the client used, as LangChain's ``OpenAIEmbeddings`` sends by default)."""
    if isinstance(value, str):
        return [value], None
    if is_token_ids(value):
        return await asyncio.to_thread(decode, value, model)
    if any(not isinstance(v, str) for v in value):
        raise InvalidInputError("input must be a string, a list of strings, a list of token ids or a list of lists of token ids, not a mix", field="input")
    return list(value), None


class EmbedController(Controller):
    """Embeddings: embedlift's own route and the OpenAI-compatible one."""

    tags = ["embeddings"]
    opt = READ
    security = SECURITY

    @post("/embed", status_code=200, responses=errors(400, 401, 403, 404, 413, 429, 502, 503))
    async def embed(self, data: JSONBody[EmbedRequest], engine: EngineDep) -> Response[EmbedResponse]:
        """Embed queries (through the adapter) or documents (base space unless the adapter applies to both).

        An input longer than the model's window is the normalised mean of its windows (``x-embedlift-windows``
        says how many each input had); ``truncate`` embeds only the first window; ``return_windows`` adds every
        window's vector and span."""
        texts = [data.input] if isinstance(data.input, str) else data.input
        result = await engine.embed(
            texts, data.input_type, data.adapter, normalize=data.normalize, truncate=data.truncate, return_windows=data.return_windows
        )
        body = EmbedResponse(
            data=encode_result(result, data.encoding_format),
            model=engine.base.name,
            adapter=result.adapter,
            usage=Usage(prompt_tokens=result.tokens, total_tokens=result.tokens),
        )
        return Response(body, headers=result_headers(result))

    @post("/v1/embeddings", status_code=200, responses=errors(400, 401, 403, 404, 413, 429, 502, 503, openai=True))
    async def openai_embeddings(self, data: JSONBody[OpenAIEmbeddingRequest], engine: EngineDep) -> Response[OpenAIEmbeddingResponse]:
        """OpenAI-compatible. ``model``: ``base``, ``active`` or an adapter name; ``<name>:document`` embeds
        documents (plain names embed queries). ``input`` may be token ids (LangChain's default): they are decoded
        with the encoding tiktoken uses for ``model`` (``cl100k_base`` for names it does not know) and the text
        embedded as usual; ``usage`` counts the ids received."""
        texts, ids = await openai_texts(data.input, data.model)
        name, role = data.model, "query"
        if name.endswith(DOCUMENT_SUFFIX):
            name, role = name[: -len(DOCUMENT_SUFFIX)], "document"
        if data.dimensions is not None and data.dimensions != engine.base.dim:
            raise InvalidInputError(
                f"dimensions={data.dimensions} is not supported: {engine.base.name} returns {engine.base.dim} dimensions; omit the parameter",
                field="dimensions",
            )
        result = await engine.embed(texts, role, None if name == "active" else name, allow_blank=ids is not None)  # type: ignore[arg-type]
        used = ids if ids is not None else result.tokens  # ids: what the client counted and sent
        body = OpenAIEmbeddingResponse(
            data=encode_result(result, data.encoding_format),
            model=data.model,
            usage=Usage(prompt_tokens=used, total_tokens=used),
        )
        return Response(body, headers=result_headers(result))

    @get("/v1/models", responses=errors(401, 403, 503, openai=True))
    async def models(self, engine: EngineDep) -> ModelList:
        """The names ``/v1/embeddings`` accepts as ``model``."""
        names = ["active", BASE, *(a.name for a in engine.adapters())]
        return ModelList(data=[ModelCard(id=n) for n in names])
