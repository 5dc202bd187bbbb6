"""LangChain integration (``pip install embedlift-client[langchain]``).

- ``EmbedliftEmbeddings``: ``embed_query`` embeds as a query (through the active or the named adapter),
  ``embed_documents`` as documents, so one object handed to a LangChain vector store gives each side its own
  role. (``OpenAIEmbeddings`` pointed at ``/v1/embeddings`` sends both sides through the query adapter.)
- ``EmbedliftRetriever``: an embedlift collection as a retriever: dense, lexical or hybrid search with its
  filters, ``k`` and score threshold, done by the server.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, PrivateAttr

from embedlift.client.api import EMBED_BATCH, AsyncClient, Client, PerLoop
from embedlift.client.calls import SearchOptions, match, vectors
from embedlift.client.schemas import Fusion, Mode, SearchHit


class EmbedliftEmbeddings(Embeddings):
    """embedlift's embeddings for LangChain, queries and documents each in their own role.

    Args:
        base_url: The embedlift server (default ``$EMBEDLIFT_URL``, else ``http://127.0.0.1:8080``).
        api_key: Its key (default ``$EMBEDLIFT_API_KEY``).
        adapter: The adapter for queries (``None``: the server's active one; ``"base"``: none). Documents stay in
            the base's space unless the adapter was trained for both sides; the server decides, as for ``/embed``.
        batch_size: Texts per request (the client splits further if the server's token budget needs it).
        timeout, max_retries: As ``Client``'s.
    """

    def __init__(
        self, base_url: str | None = None, *, api_key: str | None = None, adapter: str | None = None, batch_size: int = EMBED_BATCH,
        timeout: float = 60.0, max_retries: int = 3,
    ) -> None:
        self.adapter = adapter
        self.batch_size = batch_size
        self.client = Client(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.async_client = PerLoop(lambda: AsyncClient(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries))

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        answer = self.client.embed(texts, input_type="document", adapter=self.adapter, batch_size=self.batch_size)
        return vectors(answer)

    def embed_query(self, text: str) -> list[float]:
        answer = self.client.embed([text], input_type="query", adapter=self.adapter)
        return vectors(answer)[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        answer = await self.async_client.get().embed(texts, input_type="document", adapter=self.adapter, batch_size=self.batch_size)
        return vectors(answer)

    async def aembed_query(self, text: str) -> list[float]:
        answer = await self.async_client.get().embed([text], input_type="query", adapter=self.adapter)
        return vectors(answer)[0]


def to_document(hit: SearchHit, mode_used: str | None) -> Document:
    """A hit as a LangChain ``Document``: the document's text and metadata, its id, and what embedlift knows of
    the match (score, each side's score, the best window's span) under the one key ``embedlift``."""
    return Document(id=hit.id, page_content=hit.text, metadata={**hit.metadata, "embedlift": match(hit, mode_used)})


class EmbedliftRetriever(BaseRetriever):
    """An embedlift collection as a LangChain retriever (``invoke``/``ainvoke`` a question, get ``Document``s).

    Fields: ``collection``; ``k`` (LangChain's default 4); ``mode`` (``dense`` / ``lexical`` / ``hybrid``;
    ``None``: hybrid where the collection has a lexical index); ``fusion``, ``alpha``; ``filter`` (embedlift's
    metadata filter); ``score_threshold``; ``adapter``; and the server's ``base_url`` / ``api_key``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    collection: str
    base_url: str | None = None
    api_key: str | None = None
    k: int = 4
    mode: Mode | None = None
    fusion: Fusion = "weighted"
    alpha: float | None = None
    filter: dict[str, Any] | None = None
    score_threshold: float | None = None
    adapter: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    _client: Client = PrivateAttr()
    _async_client: PerLoop = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._client = Client(self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=self.max_retries)
        self._async_client = PerLoop(lambda: AsyncClient(self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=self.max_retries))

    def _options(self) -> SearchOptions:
        return SearchOptions(
            k=self.k, mode=self.mode, fusion=self.fusion, alpha=self.alpha, filter=self.filter,
            score_threshold=self.score_threshold, adapter=self.adapter,
        )

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        answer = self._client.search(self.collection, query, **self._options())
        return [to_document(hit, answer.mode_used) for hit in answer.hits or []]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun) -> list[Document]:
        answer = await self._async_client.get().search(self.collection, query, **self._options())
        return [to_document(hit, answer.mode_used) for hit in answer.hits or []]
