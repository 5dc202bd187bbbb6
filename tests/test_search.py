"""Search over HTTP (the app in process, on the model-free base): modes, fusion, alpha, threshold, offset and
filters as the spec states them, which alpha applies (request, collection, adapter, default) and why, and
bad input answered 400 with the field and the allowed values."""

from __future__ import annotations

import pytest

from embedlift.models.fusion import DEFAULT_ALPHA, LearnedFusion
from embedlift.models.lexical import LexicalSettings
from tests.helpers import app_client, make_adapter

TEXTS = {
    "rev": "Revenue grew 36% year over year as rides recovered across markets.",
    "drv": "Drivers may be reclassified as employees, which would raise costs.",
    "ins": "Insurance reserves may prove inadequate for auto liability claims.",
    "bike": "Bikes and scooters operate in several cities under local permits.",
    "av": "Autonomous vehicle efforts were sold to Toyota's Woven Planet.",
    "ride": "Riders request rides in the app; drivers accept them.",
}
DOCS = [{"id": k, "text": t, "metadata": {"n": i, "kind": "risk" if i % 2 else "fin"}} for i, (k, t) in enumerate(TEXTS.items())]


def with_fusion(path, alpha: float, language: str = "english"):
    """Give a checkpoint a learned fusion weight, as `embedlift train` records it."""
    import json

    config = json.loads((path / "config.json").read_text())
    config["fusion"] = {"alpha": alpha, "metric": "mrr@10", "validation": {}, "lexical": {"language": language}}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def client(hashing, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("search-adapters")
    with_fusion(make_adapter(hashing, adapters / "learned"), 0.8)
    with_fusion(make_adapter(hashing, adapters / "german", seed=1), 0.2, "german")
    with app_client(tmp_path_factory.mktemp("search-data"), adapters) as c:
        c.put("/collections/kb").raise_for_status()
        c.post("/collections/kb/documents", json={"documents": DOCS}).raise_for_status()
        yield c


def search(client, **body):
    r = client.post("/collections/kb/search", json={"k": 6, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_default_mode_is_hybrid_and_each_hit_carries_both_scores(client):
    body = search(client, query="revenue growth in markets")
    assert body["mode_used"] == "hybrid" and body["hits"][0]["id"] == "rev"
    top = body["hits"][0]
    assert top["scores"]["dense"] is not None and top["scores"]["lexical"] is not None
    assert [h["score"] for h in body["hits"]] == sorted((h["score"] for h in body["hits"]), reverse=True)
    lexical = search(client, query="revenue growth in markets", mode="lexical")
    assert lexical["mode_used"] == "lexical" and all(h["scores"]["dense"] is None for h in lexical["hits"])
    assert {h["id"] for h in lexical["hits"]} == {"rev"}  # BM25 finds only documents holding a query term
    dense = search(client, query="revenue growth in markets", mode="dense")
    assert len(dense["hits"]) == 6 and all(h["scores"]["lexical"] is None for h in dense["hits"])


def test_alpha_moves_hybrid_between_the_two_sides(client):
    q = "drivers scooters"
    lexical_only = [h["id"] for h in search(client, query=q, alpha=0.0)["hits"]]
    dense_only = [h["id"] for h in search(client, query=q, alpha=1.0)["hits"]]
    lexical = [h["id"] for h in search(client, query=q, mode="lexical")["hits"]]
    dense = [h["id"] for h in search(client, query=q, mode="dense")["hits"]]
    # min-max maps each side's weakest candidate to 0, as if absent: the others keep their side's order
    assert lexical_only[: len(lexical) - 1] == lexical[:-1] and len(lexical) >= 3
    assert dense_only[: len(dense) - 1] == dense[:-1]
    rrf = search(client, query=q, fusion="rrf")["hits"]
    for hit in rrf:
        expected = sum(1 / (60 + side.index(hit["id"]) + 1) for side in (dense, lexical) if hit["id"] in side)
        assert hit["score"] == pytest.approx(expected)


def test_threshold_offset_and_filters(client):
    full = search(client, query="drivers rides", mode="dense")["hits"]
    page = search(client, query="drivers rides", mode="dense", k=2, offset=2)["hits"]
    assert [h["id"] for h in page] == [h["id"] for h in full[2:4]]
    cut = full[2]["score"]
    kept = search(client, query="drivers rides", mode="dense", score_threshold=cut)["hits"]
    assert [h["id"] for h in kept] == [h["id"] for h in full[:3]]
    risky = search(client, query="drivers rides", filter={"$or": [{"kind": "risk"}, {"n": {"$gte": 4}}]})["hits"]
    assert {h["id"] for h in risky} == {"drv", "bike", "ride", "av"} and all(h["metadata"]["kind"] == "risk" or h["metadata"]["n"] >= 4 for h in risky)
    assert search(client, query="drivers", filter={"n": {"$in": [0, 2]}})["hits"][0]["id"] in ("rev", "ins")


def test_which_alpha_applies_and_the_collection_says_why(client):
    info = client.get("/collections/kb").json()
    assert info["lexical"] == {"language": "english"} and info["lexical_status"] == "ready"
    assert info["fusion"] == {"alpha": DEFAULT_ALPHA, "source": "default"}  # no adapter active
    client.post("/adapters/learned/activate").raise_for_status()
    assert client.get("/collections/kb").json()["fusion"] == {"alpha": 0.8, "source": "adapter learned@1"}
    q = "insurance claims for drivers"
    assert search(client, query=q)["hits"] == search(client, query=q, alpha=0.8)["hits"]  # the learned one serves
    client.post("/adapters/german/activate").raise_for_status()
    why = client.get("/collections/kb").json()["fusion"]
    assert why["alpha"] == DEFAULT_ALPHA and "fitted with lexical language german" in why["source"]
    client.post("/adapters/base/activate").raise_for_status()
    client.put("/collections/fixed", json={"alpha": 0.3}).raise_for_status()
    assert client.get("/collections/fixed").json()["fusion"] == {"alpha": 0.3, "source": "collection"}


def test_a_collection_without_a_lexical_index_searches_dense(client):
    client.put("/collections/plain", json={"lexical": None}).raise_for_status()
    client.post("/collections/plain/documents", json={"documents": DOCS}).raise_for_status()
    info = client.get("/collections/plain").json()
    assert info["lexical"] is None and info["lexical_status"] == "off" and info["fusion"] is None
    body = client.post("/collections/plain/search", json={"query": "revenue"}).json()
    assert body["mode_used"] == "dense"
    r = client.post("/collections/plain/search", json={"query": "revenue", "mode": "hybrid"})
    assert r.status_code == 409 and "no lexical index" in r.json()["detail"]  # the collection's state, not the request


def test_stop_words_only_is_dense_with_a_note(client):
    body = search(client, query="the of and a")
    assert body["mode_used"] == "dense" and "no indexable terms" in body["note"] and len(body["hits"]) == 6
    batch = client.post("/collections/kb/search", json={"queries": ["the and", "revenue"], "k": 2}).json()["results"]
    assert [r["mode_used"] for r in batch] == ["dense", "hybrid"] and "no indexable terms" in batch[0]["note"]


@pytest.mark.parametrize(
    "body,message",
    [
        ({"query": "x", "mode": "semantic"}, "mode Invalid enum value 'semantic'; allowed: 'dense', 'hybrid', 'lexical'"),
        ({"query": "x", "fusion": "max"}, "allowed: 'rrf', 'weighted'"),
        ({"query": "x", "alpha": 1.5}, "alpha Expected `float` <= 1.0"),
        ({"query": "x", "alpha": -0.1}, "alpha Expected `float` >= 0.0"),
        ({"query": "x", "offset": -1}, "offset Expected `int` >= 0"),
        ({"query": "x", "filter": {"n": {"$gte": "two"}}}, "filter.n.$gte takes a number, got 'two'"),
        ({"query": "x", "filter": {"n": {"$near": 1}}}, "unknown operator '$near'; allowed: ['$eq', '$ne'"),
        ({"query": "x", "k": 990, "offset": 20}, "k + offset = 1010 > maximum allowed 1000"),
    ],
)
def test_bad_search_input_is_a_400_naming_the_field(client, body, message):
    r = client.post("/collections/kb/search", json=body)
    assert r.status_code in (400, 413), r.text
    assert message in r.json()["detail"]


def test_learned_fusion_round_trips_through_the_checkpoint(hashing, tmp_path):
    from embedlift.models.checkpoint import read_config

    path = with_fusion(make_adapter(hashing, tmp_path / "a"), 0.65)
    assert read_config(path).fusion == LearnedFusion(alpha=0.65, lexical=LexicalSettings(language="english"))
