"""``Client`` and ``AsyncClient`` against a real server on the real model: each route's typed answer equals what
the route answers over raw HTTP; background jobs are waited for; errors raise with the status, the server's
message and the field."""

from __future__ import annotations

import asyncio
import math
import shutil

import httpx
import msgspec
import pytest

from embedlift.client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    Document,
    NotFoundError,
    PermissionDeniedError,
    RequestTooLargeError,
)
from embedlift.client.schemas import EmbedResponse, JobInfo, SearchResponse, UpsertResponse

from conftest import ADMIN_KEY, CORPUS, READ_KEY, SYNC_UPSERT

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def raw(server, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers=AUTH, timeout=60, **kwargs)


def close(a: list[list[float]], b: list[list[float]], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and all(math.isclose(p, q, abs_tol=tol) for p, q in zip(x, y)) for x, y in zip(a, b))


def as_json(value: object) -> object:
    """What the value is on the wire (tuples become lists)."""
    return msgspec.json.decode(msgspec.json.encode(value))


def vectors(answer: EmbedResponse) -> list[list[float]]:
    return [item.embedding for item in answer.data]  # type: ignore[misc]


@pytest.mark.parametrize("role", ["query", "document"])
def test_embed_equals_the_route_and_batches_within_limits(embedlift_server, client, role):
    texts = list(CORPUS.values())
    got = client.embed(texts, input_type=role)
    expected = raw(embedlift_server, "POST", "/embed", json={"input": texts, "input_type": role}).json()
    assert got.adapter == expected["adapter"] == "tuned@1"  # documents stay in base space (apply_to: query)
    assert close(vectors(got), [d["embedding"] for d in expected["data"]])
    assert [d.index for d in got.data] == list(range(len(texts)))
    many = [f"question {i} about {t[:40]}" for i, t in enumerate(texts * 43)]  # 301 texts, 3 requests of 128
    batched = client.embed(many, input_type=role, batch_size=128)
    assert [d.index for d in batched.data] == list(range(len(many)))
    assert close(vectors(batched)[250:260], vectors(client.embed(many[250:260], input_type=role)))
    windowed = client.embed(CORPUS["long"], input_type=role, return_windows=True).data[0].windows
    expected_windows = raw(embedlift_server, "POST", "/embed", json={"input": CORPUS["long"], "input_type": role, "return_windows": True}).json()
    assert windowed is not None and len(windowed) > 1 and [list(w.span) for w in windowed] == [w["span"] for w in expected_windows["data"][0]["windows"]]
    assert close([w.embedding for w in windowed], [w["embedding"] for w in expected_windows["data"][0]["windows"]])  # type: ignore[misc]
    assert batched.usage.total_tokens == sum(client.embed(part, input_type=role).usage.total_tokens for part in (many[:150], many[150:]))


def test_collections_documents_and_search(embedlift_server, client, docs):
    name = "client-roundtrip"
    created = client.create_collection(name, lexical={"language": "english"}, alpha=0.5)
    assert created.status == "ready" and created.lexical is not None and created.lexical.language == "english"
    assert client.create_collection(name, lexical={"language": "english"}, alpha=0.5) == created
    with pytest.raises(ConflictError):
        client.create_collection(name, index="hnsw")
    assert name in [c.name for c in client.list_collections()]

    small = client.upsert(name, [Document(id="revenue", text=CORPUS["revenue"], metadata={"year": 2021})])
    assert isinstance(small, UpsertResponse) and small.upserted == 1
    bulk = [{"id": f"note-{i}", "text": f"Note {i}: {text}"} for i, text in enumerate(list(CORPUS.values()) * 2)]
    assert len(bulk) > SYNC_UPSERT  # a background job on the server: waited for
    done = client.upsert(name, bulk)
    assert isinstance(done, UpsertResponse) and done.upserted == len(bulk) and done.windowed == 2
    job = client.upsert(name, docs + [{"id": f"extra-{i}", "text": f"Extra {i}"} for i in range(SYNC_UPSERT)], wait=False)
    assert isinstance(job, JobInfo) and job.kind == "upsert"
    finished = client.wait(job, timeout=60)
    assert finished.status == "succeeded" and finished.result["upserted"] == len(docs) + SYNC_UPSERT

    stored = client.get_document(name, "long")
    assert stored.text == CORPUS["long"] and stored.windows > 1
    assert client.get_collection(name).documents == len(bulk) + len(docs) + SYNC_UPSERT  # "revenue" was replaced

    for options in [{}, {"mode": "dense"}, {"mode": "lexical"}, {"mode": "hybrid", "fusion": "rrf"},
                    {"k": 3, "filter": {"year": {"$gte": 2021}}}, {"k": 2, "offset": 1, "alpha": 0.9, "score_threshold": 0.0}]:
        got = client.search(name, "How much did revenue grow in 2021?", **options)
        expected = raw(embedlift_server, "POST", f"/collections/{name}/search", json={"query": "How much did revenue grow in 2021?", **options})
        assert isinstance(got, SearchResponse) and as_json(got) == expected.json(), options
    assert client.search(name, "revenue growth", k=1).hits[0].id == "revenue"
    batch = client.search(name, ["revenue growth", "autonomous vehicle division"], k=1, mode="lexical")
    assert [r.hits[0].id for r in batch.results] == ["revenue", "long"]

    deleted = client.delete_documents(name, ["revenue", "nope"])
    assert deleted.deleted == 1 and deleted.missing == ["nope"]
    with pytest.raises(NotFoundError) as missing:
        client.get_document(name, "revenue")
    assert missing.value.status_code == 404 and "revenue" in missing.value.message
    client.delete_collection(name)
    with pytest.raises(NotFoundError):
        client.get_collection(name)


def test_evaluate_inline_and_as_a_job(client):
    dataset = {
        "queries": {"q1": "How much revenue in 2021?", "q2": "Are drivers employees?", "q3": "What about Proposition 22?"},
        "corpus": CORPUS,
        "relevant_docs": {"q1": ["revenue"], "q2": ["drivers"], "q3": ["regulation"]},
    }
    small = {**dataset, "corpus": {k: CORPUS[k] for k in ("revenue", "drivers", "regulation")}}
    inline = client.evaluate(dataset=small, k=[1, 3])
    assert set(inline.metrics) == {"base", "tuned"} and inline.queries == 3 and 0 <= inline.metrics["base"]["hit_rate@1"] <= 1
    background = client.evaluate(dataset=dataset, k=[1, 3], background=True)  # a job, waited for
    job = client.evaluate(dataset=dataset, k=[1, 3], wait=False)
    assert isinstance(job, JobInfo) and job.kind == "eval"
    assert client.wait(job.id).result["metrics"] == as_json(background.metrics)
    assert background.documents == len(CORPUS) and background.windowed == 1
    assert client.datasets() == []


def test_adapters_register_upload_activate_rollback_delete(embedlift_server, client):
    listed = client.adapters()
    assert listed.active == "tuned@1" and [a.name for a in listed.adapters] == ["tuned"]
    shutil.copytree(embedlift_server.spare, embedlift_server.adapters_dir / "spare", dirs_exist_ok=True)
    registered = client.register_adapter("spare")
    assert registered.label == "spare@1" and not registered.active
    uploaded = client.upload_adapter(embedlift_server.spare, name="uploaded")  # a directory, sent as a tar
    assert uploaded.name == "uploaded" and uploaded.base_fingerprint == registered.base_fingerprint
    assert client.activate("uploaded").active == "uploaded@1"
    query = client.embed("Are drivers employees?")
    assert query.adapter == "uploaded@1"
    assert client.rollback().active == "tuned@1"
    with pytest.raises(ConflictError):
        client.delete_adapter("tuned")  # the active one
    client.delete_adapter("spare")
    client.delete_adapter("uploaded")
    assert [a.name for a in client.adapters().adapters] == ["tuned"]


def test_errors_carry_status_message_and_field(embedlift_server, client, collection):
    with pytest.raises(BadRequestError) as blank:
        client.upsert(collection, [{"id": "x", "text": "fine"}, {"id": "y", "text": "   "}])
    assert blank.value.status_code == 400 and blank.value.field == "documents[1].text" and "empty text" in blank.value.message
    with pytest.raises(BadRequestError) as typed:
        client.upsert(collection, [{"id": "x", "text": 3}])
    assert typed.value.field == "documents[0].text" and "Expected `str`" in typed.value.message
    with pytest.raises(BadRequestError) as bad_filter:
        client.search(collection, "revenue", filter={"year": {"$gt": "2020"}})
    assert bad_filter.value.field == "filter.year.$gt" and "takes a number" in bad_filter.value.message
    with pytest.raises(BadRequestError) as bad_mode:
        client.search(collection, "revenue", mode="sparse")  # type: ignore[typeddict-item]
    assert bad_mode.value.field == "mode" and "'hybrid'" in bad_mode.value.message
    with pytest.raises(RequestTooLargeError) as too_many:
        client.search(collection, "revenue", k=100_000)
    assert too_many.value.field == "k" and too_many.value.code == "too_large"
    with pytest.raises(NotFoundError) as unknown:
        client.embed("x", adapter="nope")
    assert unknown.value.field == "adapter" and "unknown adapter 'nope'" in unknown.value.message
    with pytest.raises(AuthenticationError):
        Client(embedlift_server.url, api_key="").search(collection, "revenue")
    with Client(embedlift_server.url, api_key=READ_KEY) as reader:
        assert reader.search(collection, "revenue", k=1).hits
        with pytest.raises(PermissionDeniedError) as forbidden:
            reader.delete_collection(collection)
        assert forbidden.value.status_code == 403


def test_async_client(embedlift_server, client, collection):
    async def scenario():
        async with AsyncClient(embedlift_server.url, api_key=ADMIN_KEY) as aclient:
            queries = [f"question {i}: {t[:30]}" for i, t in enumerate(list(CORPUS.values()) * 10)]
            embedded, hits, info = await asyncio.gather(
                aclient.embed(queries, batch_size=16), aclient.search(collection, "revenue growth", k=2), aclient.get_collection(collection),
            )
            done = await aclient.upsert(collection, [{"id": f"a-{i}", "text": f"Async note {i}"} for i in range(SYNC_UPSERT + 2)])
            with pytest.raises(NotFoundError):
                await aclient.job("no-such-job")
            return embedded, hits, info, done

    before = client.search(collection, "revenue growth", k=2)  # the upsert below changes BM25's statistics
    embedded, hits, info, done = asyncio.run(scenario())
    assert close(vectors(embedded), vectors(client.embed([f"question {i}: {t[:30]}" for i, t in enumerate(list(CORPUS.values()) * 10)])))
    assert as_json(hits) == as_json(before)
    assert info.documents == len(CORPUS) and done.upserted == SYNC_UPSERT + 2
