"""Collections: create, list, get, delete, re-index; upsert, get and delete documents; search."""

from __future__ import annotations

import asyncio

from litestar import Controller, Response, delete, get, post, put
from litestar.params import FromPath, JSONBody

from embedlift.models.errors import InvalidInputError
from embedlift.service.http.embeddings import ADAPTER_HEADER
from embedlift.service.http.jobs import accepted
from embedlift.service.http.state import EngineDep
from embedlift.service.http.openapi import ADMIN, READ, SECURITY, NamePath, OptionalBodyOperation, documented, errors
from embedlift.service.schemas import (
    CollectionCreate,
    CollectionInfo,
    CollectionList,
    DeleteRequest,
    DeleteResponse,
    JobAccepted,
    SearchRequest,
    SearchResponse,
    StoredDocument,
    UpsertRequest,
    UpsertResponse,
)


class CollectionsController(Controller):
    """Collections of documents: create, upsert, delete, get, search."""

    path = "/collections"
    tags = ["collections"]
    security = SECURITY

    @put("/{name:str}", opt=ADMIN, status_code=200, operation_class=OptionalBodyOperation, responses={201: documented(CollectionInfo, "created"), **errors(400, 401, 403, 409, 503)})
    async def create(self, name: NamePath, engine: EngineDep, data: JSONBody[CollectionCreate | None] = None) -> Response[CollectionInfo]:
        """Create a collection (idempotent: the same settings again answer 200; other settings, 409)."""
        info, created = await engine.create_collection(name, data)
        return Response(info, status_code=201 if created else 200)

    @get("/", opt=READ, responses=errors(401, 403, 503))
    async def list_collections(self, engine: EngineDep) -> CollectionList:
        """Every collection with its counts; one built with another base shows ``status: base_mismatch``."""
        return CollectionList(collections=await asyncio.to_thread(engine.collections_info))

    @get("/{name:str}", opt=READ, responses=errors(401, 403, 404, 503))
    async def get_collection(self, name: NamePath, engine: EngineDep) -> CollectionInfo:
        return await asyncio.to_thread(engine.collection_info, name)

    @delete("/{name:str}", opt=ADMIN, status_code=204, responses=errors(401, 403, 404, 503))
    async def delete_collection(self, name: NamePath, engine: EngineDep) -> None:
        """Delete a collection and its documents (the directory is renamed aside first, then removed)."""
        await engine.delete_collection(name)

    @post("/{name:str}/reindex", opt=ADMIN, status_code=202, responses=errors(401, 403, 404, 409, 429, 503))
    async def reindex(self, name: NamePath, engine: EngineDep) -> Response[JobAccepted]:
        """Re-embed a collection built with another base (``status: base_mismatch``, e.g. after serving a
        fine-tuned base) from its stored texts onto this server's base, in the background: ``GET /jobs/{id}``
        shows documents done of total. The new vectors replace the old in one transaction when all are done;
        until then the collection answers 409 naming the job (its old vectors belong to the other base)."""
        return accepted(await engine.reindex(name))

    @post("/{name:str}/documents", opt=ADMIN, status_code=200, responses={202: documented(JobAccepted, "a background job (large upserts)"), **errors(400, 401, 403, 404, 409, 413, 429, 502, 503)})
    async def upsert(self, name: NamePath, data: JSONBody[UpsertRequest], engine: EngineDep) -> Response[UpsertResponse]:
        """Insert or replace documents by id. Long documents are stored as their windows. Past
        ``sync_upsert_documents`` documents the upsert runs as a background job (202, ``GET /jobs/{id}``)."""
        result = await engine.upsert(name, data.documents)
        if isinstance(result, UpsertResponse):
            return Response(result)
        return accepted(result)  # type: ignore[return-value]

    @post("/{name:str}/documents/delete", opt=ADMIN, status_code=200, responses=errors(400, 401, 403, 404, 409, 503))
    async def delete_documents(self, name: NamePath, data: JSONBody[DeleteRequest], engine: EngineDep) -> DeleteResponse:
        """Delete documents by id; ids not in the collection are listed in ``missing``."""
        return await engine.delete_documents(name, data.ids)

    @get("/{name:str}/documents/{doc_id:str}", opt=READ, responses=errors(401, 403, 404, 409, 503))
    async def get_document(self, name: NamePath, doc_id: FromPath[str], engine: EngineDep) -> StoredDocument:
        return await engine.get_document(name, doc_id)

    @post("/{name:str}/search", opt=READ, status_code=200, responses=errors(400, 401, 403, 404, 409, 413, 429, 502, 503))
    async def search(self, name: NamePath, data: JSONBody[SearchRequest], engine: EngineDep) -> Response[SearchResponse]:
        """Top-``k`` documents for ``query`` (``{"hits"}``) or for each of ``queries`` (``{"results"}``), one hit
        per document (its best window, whose span is reported): dense, lexical (BM25) or hybrid (both fused), with
        metadata filters, a score threshold and an offset; each result says the mode used."""
        single = isinstance(data.query, str)
        if single == isinstance(data.queries, list):
            raise InvalidInputError("send exactly one of `query` (a string) or `queries` (a list of strings)", field="query")
        result = await engine.search(
            name, data.query if single else data.queries, data.k, data.adapter, data.filter,  # type: ignore[arg-type]
            mode=data.mode, fusion=data.fusion, alpha=data.alpha, threshold=data.score_threshold, offset=data.offset,
        )
        return Response(result, headers={ADAPTER_HEADER: result.adapter})
