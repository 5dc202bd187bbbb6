"""Every request and response body of the service, as msgspec Structs.

Requests reject unknown fields and declare their limits, so the OpenAPI spec is exact and bad input is a 400
that names the field. The embedding responses use OpenAI's shape on both routes, so one parser reads both.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Texts = str | list[str]


class EmbedRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /embed``."""

    input: Texts
    input_type: Literal["query", "document"] = "query"
    adapter: str | None = None  # None: the active adapter; "base": none
    normalize: bool = True
    encoding_format: Literal["float", "base64"] = "float"
    truncate: bool = False  # embed only an input's first window instead of pooling all of them


class Embedding(msgspec.Struct, kw_only=True):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: little-endian float32


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbedResponse(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    adapter: str  # "name@version", or "base"
    usage: Usage


class OpenAIEmbeddingRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/embeddings``: OpenAI's request. Unknown fields are ignored, as OpenAI-compatible servers do."""

    input: str | list[str | int | list[int]]  # token-id arrays are parsed only to be refused with a clear 400
    model: str = "active"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None


class OpenAIEmbeddingResponse(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "embedlift"


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterInfo(msgspec.Struct, kw_only=True):
    name: str
    version: int
    kind: str
    apply_to: str
    base_fingerprint: str
    active: bool
    metrics: dict[str, object] = {}


class AdapterList(msgspec.Struct, kw_only=True):
    active: str | None
    adapters: list[AdapterInfo]


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok", "loading"]


class ErrorBody(msgspec.Struct, kw_only=True):
    """Native error shape of every route but ``/v1/*``."""

    status_code: int
    code: str
    detail: str


class OpenAIErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(msgspec.Struct, kw_only=True):
    """``/v1/*`` errors, in OpenAI's ``{"error": {...}}`` shape."""

    error: OpenAIErrorDetail
