"""text-embeddings-inference's protocol under ``/tei``, for the clients that speak it: LlamaIndex's
``TextEmbeddingsInference`` (``POST {base_url}/embed``) and huggingface_hub's ``InferenceClient(model=URL)
.feature_extraction`` (``POST {URL}``), which send ``{"inputs": ...}`` and read back a bare list of vectors.

Role: TEI clients send queries and documents alike, so ``/tei`` embeds documents (base space, unless the
adapter applies to both) unless ``prompt_name`` is ``query``; the same routes under ``/tei/query`` embed queries
(a query-side client points its base URL there). The adapter is the active one, or ``?adapter=``. A long input
is windowed, never cut (``truncate`` is accepted and ignored). Auth, limits and statuses are the service's;
errors have TEI's body, ``{"error", "error_type"}`` (``errors.py``).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from litestar import Controller, get, post
from litestar.params import JSONBody, QueryParameter

from embedlift.models.encoders import Role
from embedlift.models.errors import InvalidInputError
from embedlift.service import limits
from embedlift.service.http.openapi import READ, SECURITY, errors
from embedlift.service.http.state import EngineDep, SettingsDep
from embedlift.service.schemas import TEIEmbedRequest, TEIInfo, TEIToken, TEITokenizeRequest

def role_of(prompt_name: str | None, default: Role) -> Role:
    """The role a TEI ``prompt_name`` asks for (``None``: the route's; the body's schema allows only
    ``PromptName``'s values)."""
    if prompt_name is None:
        return default
    return "query" if prompt_name == "query" else "document"


AdapterQuery = Annotated[str | None, QueryParameter(name="adapter", description="adapter (default: the active one; `base`: none)")]


def texts_of(inputs: str | list[str]) -> list[str]:
    return [inputs] if isinstance(inputs, str) else list(inputs)


class TEIController(Controller):
    """TEI's routes: embed, info, tokenize; under ``/tei`` (documents) and ``/tei/query`` (queries)."""

    path = "/tei"
    tags = ["tei"]
    opt = READ
    security = SECURITY

    async def _embed(self, data: TEIEmbedRequest, engine: Any, adapter: str | None, default: Role) -> list[list[float]]:
        limits.check_texts(texts_of(data.inputs), engine.settings, "inputs")  # TEI's field name in the message
        if data.dimensions is not None and data.dimensions != engine.base.dim:
            raise InvalidInputError(f"dimensions={data.dimensions} is not supported: {engine.base.name} returns {engine.base.dim}; omit it", field="dimensions")
        result = await engine.embed(texts_of(data.inputs), role_of(data.prompt_name, default), adapter, normalize=data.normalize)
        vectors: list[list[float]] = result.vectors.tolist()
        return vectors

    # One handler per path (not one with a list of paths: Litestar keeps those in a set, so the spec's order
    # and operation ids would change from run to run).
    @post("/embed", status_code=200, responses=errors(400, 401, 403, 404, 413, 429, 502, 503, tei=True))
    async def embed(self, data: JSONBody[TEIEmbedRequest], engine: EngineDep, adapter: AdapterQuery = None) -> list[list[float]]:
        """TEI's ``/embed``: one vector per input, as documents unless ``prompt_name`` is ``query``."""
        return await self._embed(data, engine, adapter, "document")

    @post("/", status_code=200, responses=errors(400, 401, 403, 404, 413, 429, 502, 503, tei=True))
    async def embed_at_root(self, data: JSONBody[TEIEmbedRequest], engine: EngineDep, adapter: AdapterQuery = None) -> list[list[float]]:
        """``/embed`` at the base URL, where huggingface_hub's ``InferenceClient(model=URL)`` posts."""
        return await self._embed(data, engine, adapter, "document")

    @post("/query/embed", status_code=200, responses=errors(400, 401, 403, 404, 413, 429, 502, 503, tei=True))
    async def embed_queries(self, data: JSONBody[TEIEmbedRequest], engine: EngineDep, adapter: AdapterQuery = None) -> list[list[float]]:
        """TEI's ``/embed`` for the query side: one vector per input, through the adapter as queries."""
        return await self._embed(data, engine, adapter, "query")

    @post("/query", status_code=200, responses=errors(400, 401, 403, 404, 413, 429, 502, 503, tei=True))
    async def embed_queries_at_root(self, data: JSONBody[TEIEmbedRequest], engine: EngineDep, adapter: AdapterQuery = None) -> list[list[float]]:
        """The query side's ``/embed`` at its base URL."""
        return await self._embed(data, engine, adapter, "query")

    def _info(self, engine: Any, settings: Any) -> TEIInfo:
        base = engine.base
        described = base.describe()
        return TEIInfo(
            model_id=base.name, model_dtype=str(getattr(base, "precision", "float32")), model_type={"embedding": {"pooling": "mean"}},
            max_concurrent_requests=settings.max_concurrent, max_input_length=int(described.get("max_seq_length") or 0),
            max_batch_tokens=settings.max_request_tokens, max_client_batch_size=settings.max_inputs, auto_truncate=False,
            version="embedlift-0.1.0", dimension=base.dim,
        )

    @get("/info", responses=errors(401, 403, 503, tei=True))
    async def info(self, engine: EngineDep, settings: SettingsDep) -> TEIInfo:
        """The model and the limits, in TEI's fields (and the dimension)."""
        return self._info(engine, settings)

    @get("/query/info", responses=errors(401, 403, 503, tei=True))
    async def query_info(self, engine: EngineDep, settings: SettingsDep) -> TEIInfo:
        """``/info`` on the query side."""
        return self._info(engine, settings)

    async def _tokenize(self, data: TEITokenizeRequest, engine: Any, settings: Any) -> list[list[TEIToken]]:
        texts = texts_of(data.inputs)
        limits.check_texts(texts, settings, "inputs")
        tokenizer = getattr(getattr(engine.base, "model", None), "tokenizer", None)
        if tokenizer is None:
            raise InvalidInputError(f"the base {engine.base.name} has no local tokenizer to show")
        return await asyncio.to_thread(_tokens, tokenizer, texts, data.add_special_tokens)

    @post("/tokenize", status_code=200, responses=errors(400, 401, 403, 413, 503, tei=True))
    async def tokenize(self, data: JSONBody[TEITokenizeRequest], engine: EngineDep, settings: SettingsDep) -> list[list[TEIToken]]:
        """The base model's tokens of each input, with their character offsets."""
        return await self._tokenize(data, engine, settings)

    @post("/query/tokenize", status_code=200, responses=errors(400, 401, 403, 413, 503, tei=True))
    async def query_tokenize(self, data: JSONBody[TEITokenizeRequest], engine: EngineDep, settings: SettingsDep) -> list[list[TEIToken]]:
        """``/tokenize`` on the query side."""
        return await self._tokenize(data, engine, settings)


def _tokens(tokenizer: Any, texts: list[str], special: bool) -> list[list[TEIToken]]:
    specials = set(tokenizer.all_special_ids)
    out = []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        out.append([
            TEIToken(id=i, text=text[a:b] if b > a else tokenizer.convert_ids_to_tokens(i), special=i in specials,
                     start=a if b > a else None, stop=b if b > a else None)
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ])
    return out
