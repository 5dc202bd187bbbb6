"""Every request and response body of embedlift's HTTP API, as msgspec Structs: the wire types, one per thing.

They live in the client distribution (``embedlift-client``: httpx and msgspec only) and the service imports
them from here, so what a client sends and parses is the very type the server validates and answers with:
the two cannot drift. Requests reject unknown fields and declare their limits, so the OpenAPI spec is exact
and bad input is a 400 that names the field. The embedding responses use OpenAI's shape on both routes, so one
parser reads both.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import UNSET, Meta, UnsetType

#: Collection, adapter and dataset names: they become directory and file names.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
#: How a collection is searched: exact while small then HNSW (``auto``), always exact, always approximate.
IndexKind = Literal["auto", "flat", "hnsw"]
#: How hybrid search fuses its two rankings: min-max normalised weighted sum, or reciprocal rank fusion.
Fusion = Literal["weighted", "rrf"]
FUSIONS: tuple[Fusion, ...] = get_args(Fusion)
#: What a search ranks by: the adapted dense vectors, BM25, or both fused.
Mode = Literal["dense", "lexical", "hybrid"]
MODES: tuple[Mode, ...] = get_args(Mode)
#: The languages a collection's lexical index analyses (Snowball stemmers, Lucene's stop words).
Language = Literal[
    "english", "german", "dutch", "french", "spanish", "portuguese", "italian", "russian", "swedish", "norwegian", "danish", "turkish",
]
LANGUAGES: tuple[Language, ...] = get_args(Language)


class LexicalSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How a collection's texts are analysed for its lexical index (recorded with a learned fusion weight, which
    applies only where they match)."""

    language: Language = "english"


def spec(**json_schema: Any) -> dict[str, Any]:
    """Schema keywords for the OpenAPI spec only: Litestar drops constraints nested inside a list's items and
    bounds of 0 (falsy), and cannot express "not only whitespace", which msgspec or the handler enforce. Keeps
    the spec exact."""
    return {"extra": json_schema}


# Blank = only whitespace, with JSON Schema's (ECMA-262's) whitespace, so the spec's pattern and the server's
# check (`is_blank`, whose 400 says which input) agree on every character.
WHITESPACE = r"\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NOT_BLANK = f"[^{WHITESPACE}]"
_NOT_BLANK = re.compile(NOT_BLANK)


def is_blank(text: str) -> bool:
    return _NOT_BLANK.search(text) is None


# What a collection stores holds no U+0000 (PostgreSQL cannot, SQLite's JSON functions cut strings at it): the
# spec's patterns for a document's id and text (the server's 400 names the part; metadata is checked likewise).
NO_NUL = r"^[^\u0000]*$"
STORED_TEXT = rf"^[^\u0000]*[^{WHITESPACE}\u0000][^\u0000]*$"

Texts = str | list[str]
Name = Annotated[str, Meta(pattern=NAME_PATTERN)]  # the one pattern for collection, adapter, dataset names


class EmbedRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /embed``."""

    input: Annotated[Texts, Meta(extra_json_schema=spec(pattern=NOT_BLANK, minItems=1, items={"type": "string", "pattern": NOT_BLANK}))]
    input_type: Literal["query", "document"] = "query"
    adapter: str | None = None  # None: the active adapter; "base": none
    normalize: bool = True
    encoding_format: Literal["float", "base64"] = "float"
    truncate: bool = False  # embed only an input's first window instead of pooling all of them
    return_windows: bool = False  # also return each window's own vector and character span


class WindowEmbedding(msgspec.Struct, kw_only=True):
    """One window of a long input: its character span in the input and its vector."""

    span: tuple[int, int]
    embedding: list[float] | str


class Embedding(msgspec.Struct, kw_only=True, omit_defaults=True):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: little-endian float32
    windows: list[WindowEmbedding] | None = None  # only with return_windows


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbedResponse(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    adapter: str  # "name@version", or "base"
    usage: Usage


#: A token id of cl100k_base (``models/bpe.py``): its 100256 ranks and its five special tokens.
CL100K_ID = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100255}, {"enum": [100257, 100258, 100259, 100260, 100276]}]}


class OpenAIEmbeddingRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/embeddings``: OpenAI's request. Unknown fields are ignored, as OpenAI-compatible servers do."""

    # Text, or token ids (what LangChain's OpenAIEmbeddings sends by default: decoded with its encoding).
    input: Annotated[
        str | list[str | int | list[int]],
        Meta(extra_json_schema=spec(oneOf=[
            {"type": "string", "pattern": NOT_BLANK},
            {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": NOT_BLANK}},
            {"type": "array", "minItems": 1, "items": CL100K_ID},
            {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": CL100K_ID}},
        ])),
    ]
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
    label: str  # name@version, as responses' x-embedlift-adapter says
    kind: str
    apply_to: str
    base_fingerprint: str
    created: str
    active: bool
    metrics: dict[str, object] = {}


class AdapterList(msgspec.Struct, kw_only=True):
    active: str | None
    adapters: list[AdapterInfo]


class AdapterRegister(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /adapters`` as JSON: register the checkpoint directory ``name`` of the adapters directory."""

    name: Name


class ActiveAdapter(msgspec.Struct, kw_only=True):
    """The adapter now served when a request names none (``None``: the base)."""

    active: str | None


# ---------------------------------------------------------------------------------------- collections
class CollectionCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``PUT /collections/{name}``. ``auto`` (default): exact search while small, HNSW once past 20,000
    windows (converted in the background); ``flat``: always exact; ``hnsw``: always approximate.
    ``lexical``: the BM25 index's language (``null``: no lexical index); ``alpha``: the collection's dense weight
    in weighted hybrid fusion (default: the active adapter's learned one, else embedlift's default)."""

    index: IndexKind = "auto"
    hnsw_m: Annotated[int, Meta(ge=4, le=128)] = 32
    ef_construction: Annotated[int, Meta(ge=8, le=4096)] = 200
    ef_search: Annotated[int, Meta(ge=1, le=4096)] = 128
    lexical: LexicalSettings | None | UnsetType = UNSET  # unset: English; null: no lexical index
    alpha: Annotated[float, Meta(ge=0, le=1, extra_json_schema=spec(minimum=0))] | None = None

    def lexical_settings(self) -> LexicalSettings | None:
        return LexicalSettings() if isinstance(self.lexical, UnsetType) else self.lexical


class FusionInfo(msgspec.Struct, kw_only=True):
    """The dense weight a hybrid search of this collection uses when the request gives none, and where it comes
    from: ``collection``, ``adapter <name@version>`` (learned in training, for these lexical settings),
    ``base`` (a fine-tuned base's), or ``default`` (with why a learned one does not apply)."""

    alpha: float
    source: str


class CollectionInfo(msgspec.Struct, kw_only=True):
    name: str
    status: Literal["ready", "base_mismatch", "reindexing", "damaged"]
    index: str | None = None
    base_fingerprint: str | None = None
    dim: int | None = None
    created: str | None = None
    problem: str | None = None  # with ``damaged``: which file and what to do
    documents: int | None = None
    windows: int | None = None
    searching_with: Literal["flat", "hnsw"] | None = None  # with ``index: auto``, which one serves now
    job: str | None = None  # with ``reindexing``: the job re-indexing it (``GET /jobs/{job}`` shows progress)
    lexical: LexicalSettings | None = None
    lexical_status: Literal["off", "building", "ready"] | None = None  # ``building``: searches are dense meanwhile
    fusion: FusionInfo | None = None


class CollectionList(msgspec.Struct, kw_only=True):
    collections: list[CollectionInfo]


class Document(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: Annotated[str, Meta(min_length=1, max_length=512, extra_json_schema=spec(pattern=NO_NUL))]
    text: Annotated[str, Meta(extra_json_schema=spec(pattern=STORED_TEXT))]
    metadata: dict[str, Any] = {}


class UpsertRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    documents: Annotated[list[Document], Meta(min_length=1)]


class UpsertResponse(msgspec.Struct, kw_only=True):
    upserted: int
    windows: int  # windows stored (a document longer than the model's window has several)
    windowed: int  # documents that needed more than one window


class DeleteRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    ids: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, extra_json_schema=spec(items={"type": "string", "minLength": 1}))]


class DeleteResponse(msgspec.Struct, kw_only=True):
    deleted: int
    missing: list[str]


class StoredDocument(msgspec.Struct, kw_only=True):
    """A document as stored: its text, metadata and how many windows it was indexed as."""

    id: str
    text: str
    metadata: dict[str, Any]
    windows: int


Scalar = str | int | float | bool | None


class SearchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``query`` (one) or ``queries`` (a batch). ``mode``: ``dense``, ``lexical`` (BM25) or ``hybrid`` (default:
    hybrid when the collection's lexical index is ready, else dense); ``fusion`` and ``alpha`` (the dense weight)
    for hybrid; ``filter``: metadata conditions (see the ``Filter`` schema); ``score_threshold`` drops hits
    scoring less; ``offset`` skips that many hits (pages)."""

    query: Annotated[str, Meta(extra_json_schema=spec(pattern=NOT_BLANK))] | UnsetType = UNSET
    queries: Annotated[list[str], Meta(min_length=1, extra_json_schema=spec(items={"type": "string", "pattern": NOT_BLANK}))] | UnsetType = UNSET
    k: Annotated[int, Meta(ge=1)] = 10
    adapter: str | None = None
    filter: dict[str, Any] | None = None
    mode: Mode | None = None
    fusion: Fusion = "weighted"
    alpha: Annotated[float, Meta(ge=0, le=1, extra_json_schema=spec(minimum=0))] | None = None
    score_threshold: float | None = None
    offset: Annotated[int, Meta(ge=0)] = 0


class HitScores(msgspec.Struct, kw_only=True):
    """Each side's own score of a hit (``null`` where that side did not return the document)."""

    dense: float | None = None
    lexical: float | None = None


class SearchHit(msgspec.Struct, kw_only=True):
    """One document found by a search: its best window's score and span, and the whole document."""

    id: str
    score: float
    text: str
    metadata: dict[str, Any]
    span: tuple[int, int]  # characters of the best-matching window in the document's text
    window: int
    scores: HitScores | None = None  # dense and lexical scores (``score`` is the fused one in hybrid mode)


class SearchResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    hits: list[SearchHit]
    mode_used: Mode
    note: str | None = None  # why mode_used is not the mode asked for


class SearchResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    adapter: str
    hits: list[SearchHit] | None = None  # for "query"
    results: list[SearchResult] | None = None  # for "queries"
    mode_used: Mode | None = None  # for "query" (each of "results" has its own)
    note: str | None = None


# ------------------------------------------------------------------------------------------------ eval
class EvalDataset(msgspec.Struct, kw_only=True):
    """LlamaIndex's ``EmbeddingQAFinetuneDataset`` JSON: the edge's one dataset type (``engine.dataset_of`` maps
    it to the training library's ``QADataset``)."""

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant_docs: dict[str, list[str]]
    mode: str = "text"


class EvalRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A dataset inline, or a collection with queries and their relevant document ids."""

    dataset: EvalDataset | None = None
    dataset_name: Name | None = None  # a stored dataset: NAME.json in the server's datasets directory
    collection: str | None = None
    queries: dict[str, str] | None = None
    relevant_docs: dict[str, list[str]] | None = None
    adapters: list[str] | None = None  # default: the active adapter (the base is always compared)
    k: Annotated[
        list[Annotated[int, Meta(ge=1, le=1000)]],
        Meta(min_length=1, max_length=20, extra_json_schema=spec(items={"type": "integer", "minimum": 1, "maximum": 1000})),
    ] = msgspec.field(default_factory=lambda: [1, 3, 5, 10])
    per_query: bool = False  # also return each query's rank of its first relevant document, per model
    background: bool = False  # run as a job even when small
    mode: Literal["dense", "hybrid"] = "dense"  # hybrid adds the rows lexical and <model>+hybrid
    fusion: Fusion = "weighted"


class StoredDataset(msgspec.Struct, kw_only=True):
    name: str  # what ``POST /eval`` takes as ``dataset_name``
    bytes: int
    modified: str


class DatasetList(msgspec.Struct, kw_only=True):
    datasets: list[StoredDataset]


class EvalResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    metrics: dict[str, dict[str, float]]  # as `embedlift eval --json`
    models: dict[str, str]  # row name -> name@version
    queries: int
    documents: int
    windowed: int
    ranks: dict[str, dict[str, int]] | None = None


class JobInfo(msgspec.Struct, kw_only=True):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed"]
    done: int
    total: int
    result: Any = None
    error: str | None = None


class JobAccepted(msgspec.Struct, kw_only=True):
    job: JobInfo


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok", "loading"]


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Native error shape of every route but ``/v1/*`` and ``/tei/*``. ``field``: the body field (or query
    parameter) at fault, as a path (``documents[3].text``), where the error is about one."""

    status_code: int
    code: str
    detail: str
    field: str | None = None


class OpenAIErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(msgspec.Struct, kw_only=True):
    """``/v1/*`` errors, in OpenAI's ``{"error": {...}}`` shape."""

    error: OpenAIErrorDetail


# ------------------------------------------------------------------------------------------------- TEI
#: The ``prompt_name`` values TEI clients send that embedlift maps to a role (query; the rest documents).
PromptName = Literal["query", "document", "passage", "text", "corpus"]
#: TEI's ``inputs``: one text or a list of them, none blank.
TEIInputs = Annotated[
    str | list[str],
    Meta(extra_json_schema=spec(oneOf=[
        {"type": "string", "pattern": NOT_BLANK},
        {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": NOT_BLANK}},
    ])),
]

class TEIEmbedRequest(msgspec.Struct, kw_only=True):
    """``POST /tei/embed`` (and ``/tei``): text-embeddings-inference's request. ``truncate`` and
    ``truncation_direction`` are accepted, but a long input is always windowed, never cut."""

    inputs: TEIInputs
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Literal["left", "right", "Left", "Right"] = "right"
    prompt_name: PromptName | None = None
    dimensions: Annotated[int, Meta(ge=1)] | None = None


class TEITokenizeRequest(msgspec.Struct, kw_only=True):
    """``POST /tei/tokenize``."""

    inputs: TEIInputs
    add_special_tokens: bool = True
    prompt_name: PromptName | None = None


class TEIToken(msgspec.Struct, kw_only=True):
    id: int
    text: str
    special: bool
    start: int | None = None
    stop: int | None = None


class TEIInfo(msgspec.Struct, kw_only=True):
    """``GET /tei/info``: TEI's fields that clients read, and the dimension."""

    model_id: str
    model_dtype: str
    model_type: dict[str, Any]
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_client_batch_size: int
    auto_truncate: bool
    version: str
    dimension: int


class TEIError(msgspec.Struct, kw_only=True):
    """TEI's error body."""

    error: str
    error_type: str
