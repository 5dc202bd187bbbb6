"""The LangChain and LlamaIndex integrations with the real ``langchain-core`` and ``llama-index-core`` against a real
server: vectors equal ``/embed``'s for the same texts and roles, a retriever's results equal ``/search``'s, and
each framework's own vector store gets documents embedded as documents and questions as queries."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from conftest import ADMIN_KEY, CORPUS

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
QUESTION = "How much did revenue grow in 2021?"


def embed(server, texts: list[str], role: str) -> list[list[float]]:
    r = httpx.post(f"{server.url}/embed", json={"input": texts, "input_type": role}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


def search(server, collection: str, body: dict) -> list[dict]:
    r = httpx.post(f"{server.url}/collections/{collection}/search", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["hits"]


def close(a: list[list[float]], b: list[list[float]]) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and all(math.isclose(p, q, abs_tol=1e-5) for p, q in zip(x, y)) for x, y in zip(a, b))


TEXTS = list(CORPUS.values())


# ---------------------------------------------------------------------------------------------- LangChain
def test_langchain_embeddings_use_each_role(embedlift_server):
    from embedlift.client.langchain import EmbedliftEmbeddings

    embeddings = EmbedliftEmbeddings(embedlift_server.url, api_key=ADMIN_KEY, batch_size=3)
    assert close(embeddings.embed_documents(TEXTS), embed(embedlift_server, TEXTS, "document"))
    assert close([embeddings.embed_query(QUESTION)], embed(embedlift_server, [QUESTION], "query"))
    assert not close([embeddings.embed_query(QUESTION)], embed(embedlift_server, [QUESTION], "document"))  # the adapter applies
    assert close(asyncio.run(embeddings.aembed_documents(TEXTS)), embed(embedlift_server, TEXTS, "document"))
    assert close([asyncio.run(embeddings.aembed_query(QUESTION))], embed(embedlift_server, [QUESTION], "query"))
    base = EmbedliftEmbeddings(embedlift_server.url, api_key=ADMIN_KEY, adapter="base")
    assert close([base.embed_query(QUESTION)], embed(embedlift_server, [QUESTION], "document"))  # no adapter: base space


def test_langchain_vector_store_gets_documents_and_queries_in_their_roles(embedlift_server):
    from langchain_core.vectorstores import InMemoryVectorStore

    from embedlift.client.langchain import EmbedliftEmbeddings

    store = InMemoryVectorStore(embedding=EmbedliftEmbeddings(embedlift_server.url, api_key=ADMIN_KEY))
    store.add_texts(TEXTS, ids=list(CORPUS))
    assert close([store.store["drivers"]["vector"]], embed(embedlift_server, [CORPUS["drivers"]], "document"))
    assert store.similarity_search(QUESTION, k=1)[0].id == "revenue"


@pytest.mark.parametrize("options", [{}, {"mode": "lexical", "k": 2}, {"mode": "hybrid", "alpha": 0.8, "filter": {"year": 2021}},
                                     {"mode": "dense", "score_threshold": 0.3}])
def test_langchain_retriever_equals_search(embedlift_server, collection, options):
    from embedlift.client.langchain import EmbedliftRetriever

    retriever = EmbedliftRetriever(collection=collection, base_url=embedlift_server.url, api_key=ADMIN_KEY, **options)
    expected = search(embedlift_server, collection, {"query": QUESTION, "k": 4, **options})
    for documents in (retriever.invoke(QUESTION), asyncio.run(retriever.ainvoke(QUESTION))):
        assert [d.id for d in documents] == [h["id"] for h in expected] and documents
        assert [d.page_content for d in documents] == [h["text"] for h in expected]
        assert [d.metadata["embedlift"]["score"] for d in documents] == [h["score"] for h in expected]
        assert [{k: v for k, v in d.metadata.items() if k != "embedlift"} for d in documents] == [h["metadata"] for h in expected]
        assert [d.metadata["embedlift"]["span"] for d in documents] == [h["span"] for h in expected]


# ---------------------------------------------------------------------------------------------- LlamaIndex
def test_llamaindex_embedding_uses_each_role(embedlift_server):
    from embedlift.client.llamaindex import EmbedliftEmbedding

    model = EmbedliftEmbedding(embedlift_server.url, api_key=ADMIN_KEY, embed_batch_size=4)
    assert close(model.get_text_embedding_batch(TEXTS), embed(embedlift_server, TEXTS, "document"))
    assert close([model.get_text_embedding(TEXTS[0])], embed(embedlift_server, TEXTS[:1], "document"))
    assert close([model.get_query_embedding(QUESTION)], embed(embedlift_server, [QUESTION], "query"))
    assert close([asyncio.run(model.aget_query_embedding(QUESTION))], embed(embedlift_server, [QUESTION], "query"))
    assert close(asyncio.run(model.aget_text_embedding_batch(TEXTS)), embed(embedlift_server, TEXTS, "document"))


def test_llamaindex_vector_store_index_embeds_nodes_as_documents(embedlift_server):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    from embedlift.client.llamaindex import EmbedliftEmbedding

    model = EmbedliftEmbedding(embedlift_server.url, api_key=ADMIN_KEY)
    index = VectorStoreIndex([TextNode(id_=k, text=v) for k, v in CORPUS.items()], embed_model=model)
    stored = index.vector_store.get("drivers")
    assert close([stored], embed(embedlift_server, [CORPUS["drivers"]], "document"))
    assert index.as_retriever(similarity_top_k=1).retrieve(QUESTION)[0].node.node_id == "revenue"


@pytest.mark.parametrize("options", [{}, {"mode": "lexical", "k": 2}, {"mode": "hybrid", "fusion": "rrf", "filter": {"topic": {"$in": ["finance", "risk"]}}}])
def test_llamaindex_retriever_equals_search(embedlift_server, collection, options):
    from embedlift.client.llamaindex import EmbedliftRetriever

    retriever = EmbedliftRetriever(collection, base_url=embedlift_server.url, api_key=ADMIN_KEY, **options)
    expected = search(embedlift_server, collection, {"query": QUESTION, "k": 10, **options})
    for nodes in (retriever.retrieve(QUESTION), asyncio.run(retriever.aretrieve(QUESTION))):
        assert [n.node.node_id for n in nodes] == [h["id"] for h in expected] and nodes
        assert [n.score for n in nodes] == [h["score"] for h in expected]
        assert [n.node.get_content() for n in nodes] == [h["text"] for h in expected]
        assert [{k: v for k, v in n.node.metadata.items() if k != "embedlift"} for n in nodes] == [h["metadata"] for h in expected]
        assert "embedlift" not in nodes[0].node.get_content(metadata_mode="llm")  # match details stay out of prompts
