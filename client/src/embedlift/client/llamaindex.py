"""LlamaIndex integration (``pip install embedlift-client[llamaindex]``).

- ``EmbedliftEmbedding`` (a ``BaseEmbedding``): query embeddings through the query role (the active or named
  adapter), text embeddings through the document role, so an index built with it embeds nodes as documents
  and questions as queries.
- ``EmbedliftRetriever`` (a ``BaseRetriever``): an embedlift collection searched by the server (dense, lexical
  or hybrid, with filters, ``k`` and a score threshold), returning ``NodeWithScore``.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from pydantic import Field, PrivateAttr

from embedlift.client.api import EMBED_BATCH, AsyncClient, Client, PerLoop
from embedlift.client.calls import SearchOptions, match, vectors
from embedlift.client.schemas import Fusion, Mode, SearchResponse


class EmbedliftEmbedding(BaseEmbedding):
    """embedlift's embeddings for LlamaIndex: queries and texts (documents) each in their own role.

    Args:
        base_url: The embedlift server (default ``$EMBEDLIFT_URL``, else ``http://127.0.0.1:8080``).
        api_key: Its key (default ``$EMBEDLIFT_API_KEY``).
        adapter: The adapter for queries (``None``: the server's active one; ``"base"``: none).
        embed_batch_size: Texts per request (LlamaIndex batches nodes by it).
    """

    base_url: str | None = Field(default=None, description="the embedlift server")
    adapter: str | None = Field(default=None, description="adapter for queries (None: the active one; 'base': none)")
    timeout: float = 60.0
    max_retries: int = 3
    _client: Client = PrivateAttr()
    _async_client: PerLoop = PrivateAttr()

    def __init__(
        self, base_url: str | None = None, *, api_key: str | None = None, adapter: str | None = None,
        embed_batch_size: int = EMBED_BATCH, model_name: str = "embedlift", timeout: float = 60.0, max_retries: int = 3, **kwargs: Any,
    ) -> None:
        super().__init__(embed_batch_size=embed_batch_size, model_name=model_name, **kwargs)
        self.base_url, self.adapter, self.timeout, self.max_retries = base_url, adapter, timeout, max_retries
        self._client = Client(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._async_client = PerLoop(lambda: AsyncClient(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries))

    @classmethod
    def class_name(cls) -> str:
        return "EmbedliftEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return vectors(self._client.embed([query], input_type="query", adapter=self.adapter))[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return vectors(self._client.embed(texts, input_type="document", adapter=self.adapter, batch_size=self.embed_batch_size))

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return vectors(await self._async_client.get().embed([query], input_type="query", adapter=self.adapter))[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._aget_text_embeddings([text]))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        answer = await self._async_client.get().embed(texts, input_type="document", adapter=self.adapter, batch_size=self.embed_batch_size)
        return vectors(answer)


def to_nodes(answer: SearchResponse) -> list[NodeWithScore]:
    """Hits as ``NodeWithScore``: a node per document (its id, text and metadata) with the hit's score. What
    embedlift knows of the match (its score, each side's, the best window's span) is under ``embedlift`` in the
    node's metadata, kept out of the LLM's and the embedder's view."""
    nodes = []
    for hit in answer.hits or []:
        node = TextNode(
            id_=hit.id, text=hit.text, metadata={**hit.metadata, "embedlift": match(hit, answer.mode_used)},
            excluded_llm_metadata_keys=["embedlift"], excluded_embed_metadata_keys=["embedlift"],
        )
        nodes.append(NodeWithScore(node=node, score=hit.score))
    return nodes


class EmbedliftRetriever(BaseRetriever):
    """An embedlift collection as a LlamaIndex retriever.

    Args:
        collection: The collection.
        k: Documents per query.
        mode: ``dense``, ``lexical`` or ``hybrid`` (``None``: hybrid where the collection has a lexical index).
        fusion, alpha: Hybrid fusion and its dense weight (``None``: the collection's or the adapter's learned one).
        filter: embedlift's metadata filter.
        score_threshold: Drop hits scoring less.
        adapter: The adapter for the query (``None``: the active one).
        base_url, api_key, timeout, max_retries: As ``Client``'s.
    """

    def __init__(
        self, collection: str, *, base_url: str | None = None, api_key: str | None = None, k: int = 10, mode: Mode | None = None,
        fusion: Fusion = "weighted", alpha: float | None = None, filter: dict[str, Any] | None = None,
        score_threshold: float | None = None, adapter: str | None = None, timeout: float = 60.0, max_retries: int = 3,
        callback_manager: CallbackManager | None = None, verbose: bool = False,
    ) -> None:
        super().__init__(callback_manager=callback_manager, verbose=verbose)
        self.collection = collection
        self.options = SearchOptions(k=k, mode=mode, fusion=fusion, alpha=alpha, filter=filter, score_threshold=score_threshold, adapter=adapter)
        self._client = Client(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._async_client = PerLoop(lambda: AsyncClient(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries))

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return to_nodes(self._client.search(self.collection, query_bundle.query_str, **self.options))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return to_nodes(await self._async_client.get().search(self.collection, query_bundle.query_str, **self.options))
