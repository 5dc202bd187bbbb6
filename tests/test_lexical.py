"""Hybrid retrieval's parts: BM25 against a reference computed by hand and against bm25s, the collection's lexical
index against exact scores through writes, deletes, compaction, restarts and a background build, fusion math on
known lists, and metadata filters against a brute-force evaluation (hypothesis)."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import Counter

import numpy as np
import pytest
from embedlift.models.errors import ConflictError, InvalidInputError
from embedlift.models.fusion import (
    DEFAULT_ALPHA,
    fuse_rows,
    minmax,
    ranked,
    rrf,
    weighted,
)
from embedlift.models.lexical import K1, B, BM25Matrix, LexicalSettings, analyzer
from embedlift.models.windows import (
    WindowedVectors,
    best_window_scores,
    embed_documents,
)
from embedlift.service.collections import CollectionManager, NewDocument
from embedlift.service.collections.collection import SearchPlan
from embedlift.service.collections.filters import matches, parse
from embedlift.training.hybrid import ALPHA_GRID, fit_alpha, hybrid_scores
from embedlift.training.metrics import per_query_metrics
from embedlift.training.retrieval import EmbeddedDataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CORPUS = [
    "Lyft's revenue grew as riders returned to the platform in 2021.",
    "Drivers are independent contractors; reclassification would raise costs.",
    "Riders and drivers use the Lyft app to request and accept rides.",
    "Insurance reserves for auto liability claims may prove inadequate.",
    "Revenue, revenue, revenue: the word repeated changes term frequency.",
]
QUERIES = ["lyft revenue growth", "driver reclassification costs", "revenue revenue insurance", "of the and"]


def by_hand(texts: list[str], query: str) -> list[float]:
    """Lucene's BM25 written out term by term, from the analyzer's terms."""
    a = analyzer("english")
    docs = [a.terms(t) for t in texts]
    n, avg = len(docs), sum(map(len, docs)) / len(docs)
    scores = []
    for d in docs:
        tf, total = Counter(d), 0.0
        for term in a.terms(query):  # a repeated query term counts each time
            df = sum(1 for other in docs if term in other)
            if df and tf[term]:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                total += idf * tf[term] / (tf[term] + K1 * (1 - B + B * len(d) / avg))
        scores.append(total)
    return scores


def test_bm25_equals_the_formula_computed_by_hand():
    matrix = BM25Matrix(CORPUS).scores(QUERIES)
    for qi, q in enumerate(QUERIES):
        np.testing.assert_allclose(matrix[qi], by_hand(CORPUS, q), rtol=1e-12, atol=1e-12)
    assert matrix[3].max() == 0  # stop words only: no term, no score
    assert analyzer("english").terms("The Riders are riding") == ["rider", "ride"]  # stop words out, stemmed


# words, stop words, digits, underscores, punctuation, accents, dashes; then a capital sigma and a letter whose
# lower case is longer, with which a text is analysed window by window instead
_PIECES = list("ab cdXY_9 -.,'\n") + ["the", "Riders", "é", "ß", "—", "ride", "ΟΔΟς"]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=40).map("".join)
_ODD_TEXT = st.lists(st.sampled_from([*_PIECES, "ΟΔΟΣ", "İ"]), max_size=40).map("".join)
_CUTS = st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(_TEXT, _ODD_TEXT), cuts=_CUTS)
def test_window_counts_from_one_analysis_equal_each_window_analysed_alone(text, cuts):
    """Upserts analyse a document once and count each window from it (windows overlap): exactly what analysing
    each window's slice gives, windows cut inside a word included."""
    english = analyzer("english")
    spans = [(min(a, b, len(text)), min(max(a, b), len(text))) for a, b in cuts]
    assert english.window_counts(text, spans) == [english.counts(text[a:b]) for a, b in spans]
    assert (english.analyse(text) is None) == ("Σ" in text or "İ" in text)  # those alone are analysed window by window


def test_window_counts_equal_each_window_analysed_alone_on_the_lyft_windows(lyft, minilm):
    """The same on real documents and the windows the real model's tokenizer plans for them."""
    from embedlift.models.windows import embed_documents

    english = analyzer("english")
    texts = list(lyft["corpus"].values())[:60]
    for text, (spans, _) in zip(texts, embed_documents(minilm, texts).per_document(), strict=True):
        assert len(spans) > 1 or len(text) < 2000
        assert english.window_counts(text, spans) == [english.counts(text[a:b]) for a, b in spans]


def test_bm25_equals_bm25s_lucene_on_the_lyft_corpus(lyft):
    """bm25s (method lucene, same k1 and b) over the same analysed terms scores every Lyft chunk alike."""
    import bm25s

    a = analyzer("english")
    doc_ids = list(lyft["corpus"])[:200]
    texts = [lyft["corpus"][d] for d in doc_ids]
    queries = [lyft["queries"][q] for q in list(lyft["queries"])[:60]]
    ours = BM25Matrix(texts).scores(queries)
    reference = bm25s.BM25(method="lucene", k1=K1, b=B)
    reference.index([a.terms(t) for t in texts], show_progress=False)
    for qi, q in enumerate(queries):
        terms = [t for t in a.terms(q) if t in reference.vocab_dict]
        expected = reference.get_scores(terms) if terms else np.zeros(len(texts))
        np.testing.assert_allclose(ours[qi], expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ the collection's index
def docs_of(encoder, items):
    embedded = embed_documents(encoder, [t for _, t, _ in items])
    return [NewDocument(id=i, text=t, metadata=m, spans=s, vectors=v) for (i, t, m), (s, v) in zip(items, embedded.per_document(), strict=True)]


LONG = " ".join(f"Section {i} covers {['revenue', 'drivers', 'insurance', 'scooters'][i % 4]} in depth." for i in range(60))


def items(n: int, offset: int = 0):
    words = ["revenue", "drivers", "insurance", "scooters", "autonomous", "riders"]
    return [(f"d{i}", f"Item {i} on {words[i % 6]} and {words[(i * 7) % 6]} in market {i % 5}.", {"n": i}) for i in range(offset, offset + n)] + [
        (f"long{offset}", LONG, {"n": -1})
    ]


def exact(collection, query: str) -> dict[str, float]:
    """BM25 of every document of the collection (its best window), computed from scratch over its windows."""
    doc_ids, texts, windowed = collection.store.all_documents()
    windows = [texts[o][a:b] for o, (a, b) in zip(windowed.owner.tolist(), windowed.spans, strict=True)]
    per_doc = best_window_scores(BM25Matrix(windows).scores([query]), windowed.owner, windowed.n_docs)[0]
    return {d: float(s) for d, s in zip(doc_ids, per_doc, strict=True) if s > 0}


def lexical_hits(collection, query: str, k: int = 50) -> dict[str, float]:
    found = collection.search(None, [query], SearchPlan(k=k, mode="lexical"))[0]
    assert found.mode_used == "lexical", found.note
    return {h.id: h.score for h in found.hits}


def agree(collection, queries=("revenue drivers", "insurance scooters market", "section revenue depth")) -> None:
    for q in queries:
        want, got = exact(collection, q), lexical_hits(collection, q)
        assert got.keys() == set(sorted(want, key=lambda d: (-want[d], d))[: len(got)]) and got
        for d, score in got.items():
            assert score == pytest.approx(want[d], rel=1e-9)
        # a short page: only the best windows are sorted (the partition path), the result is still the top k
        top = lexical_hits(collection, q, k=3)
        assert sorted(top.values(), reverse=True) == pytest.approx(sorted(want.values(), reverse=True)[:3], rel=1e-9)
        assert all(score == pytest.approx(want[d], rel=1e-9) for d, score in top.items())


def test_the_lexical_index_scores_exactly_through_writes_deletes_compaction_and_restart(hashing, homes, monkeypatch):
    """On both stores: in memory (with compaction of deleted windows) and in PostgreSQL's SQL."""
    from embedlift.service.collections import lexical_index

    monkeypatch.setattr(lexical_index, "COMPACT_MIN", 8)
    manager = homes(hashing.fingerprint, hashing.dim, hashing.spec)
    c, _ = manager.create("docs")
    assert c.lexical_status == "ready"
    c.upsert(docs_of(hashing, items(30)))
    assert any(len(d.spans) > 1 for d in docs_of(hashing, items(1)))  # long documents are scored by windows
    agree(c)
    c.upsert(docs_of(hashing, [("d3", "Replaced text about insurance claims.", {"n": 3})]))  # re-upsert
    c.delete(["d4", "d5", "d6", "d7", "d8", "d9", "d10", "d11", "d12", "d13"])  # past COMPACT_MIN: compacted
    if homes.kind == "embedded":
        assert c.lexical_index._n == c.lexical_index.windows
    c.upsert(docs_of(hashing, items(10, offset=100)))
    agree(c)
    before = {q: lexical_hits(c, q) for q in ("revenue drivers", "insurance")}
    manager.close()
    again = homes(hashing.fingerprint, hashing.dim, hashing.spec)
    c2 = again.get("docs")
    assert c2.lexical_status == "ready" and {q: lexical_hits(c2, q) for q in before} == before
    agree(c2)


def test_documents_without_indexable_terms_are_stored_searched_densely_and_reloaded(hashing, homes):
    """A write whose every window has no terms (stopwords, digits alone, punctuation: benchmarks/fuzz.py found
    the upsert answering 500 after the store had committed it) is stored and indexed with zero terms, on both
    stores and through a restart; it is found densely, never lexically, and does not shift BM25's statistics."""
    manager = homes(hashing.fingerprint, hashing.dim, hashing.spec)
    c, _ = manager.create("docs")
    termless = [("t1", "of the and", {"n": 1}), ("t2", "... ,,, !!!", {"n": 2})]
    c.upsert(docs_of(hashing, termless[:1]))  # alone: the write's postings are empty
    c.upsert(docs_of(hashing, termless[1:] + items(6)))
    assert c.counts()[0] == 9
    agree(c)
    assert not {"t1", "t2"} & lexical_hits(c, "revenue drivers").keys()
    q = hashing.encode(["of the and"], "query")
    found = c.search(q, ["of the and"], SearchPlan(k=1, mode="dense"))[0]
    assert [h.id for h in found.hits] == ["t1"]
    manager.close()
    again = homes(hashing.fingerprint, hashing.dim, hashing.spec)
    c2 = again.get("docs")
    assert c2.lexical_status == "ready" and c2.counts()[0] == 9
    agree(c2)
    c2.delete(["t1"])
    agree(c2)


def test_a_word_longer_than_a_term_is_indexed_by_its_first_255_characters(hashing, homes):
    """A base64 blob or a hash is one "word" of thousands of characters: its term is its first ``MAX_TERM_CHARS``
    (as Lucene's maxTokenLength), on both stores (whole, PostgreSQL could not index the posting: the upsert
    failed), and a query with the same blob finds it."""
    import base64
    import random

    from embedlift.models.lexical import MAX_TERM_CHARS

    blob = base64.b32encode(random.Random(0).randbytes(3000)).decode().lower()  # 4,800 characters, incompressible
    assert analyzer("english").terms(f"see {blob} end") == ["see", blob[:MAX_TERM_CHARS], "end"]
    manager = homes(hashing.fingerprint, hashing.dim, hashing.spec)
    c, _ = manager.create("docs")
    c.upsert(docs_of(hashing, [("blob", f"An attachment: {blob}", {})] + items(5)))
    assert list(lexical_hits(c, blob)) == ["blob"]
    agree(c)


def test_a_collection_without_postings_gets_them_built_in_the_background(hashing, tmp_path):
    """A collection written before lexical indexes existed (no postings, no record of them) is served dense at
    start while its index is built, then ranks as exactly as a new one."""
    manager = CollectionManager(tmp_path, hashing.fingerprint, hashing.dim, hashing.spec)
    manager.load_all()
    c, _ = manager.create("old")
    c.upsert(docs_of(hashing, items(40)))
    manager.close()
    with sqlite3.connect(tmp_path / "old" / "collection.sqlite3") as db:  # as an earlier version left it
        db.execute("DELETE FROM postings")
        db.execute("DELETE FROM meta WHERE key = 'postings'")
        config = json.loads(db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
        del config["lexical"], config["alpha"]
        db.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(config),))
    reopened = CollectionManager(tmp_path, hashing.fingerprint, hashing.dim, hashing.spec)
    reopened.load_all()
    c = reopened.get("old")
    assert c.config.lexical is not None and c.config.lexical.language == "english"
    deadline = time.time() + 30
    while c.lexical_status != "ready" and time.time() < deadline:
        time.sleep(0.05)
    assert c.lexical_status == "ready"
    agree(c)


def test_postings_of_another_analyzer_are_rebuilt_while_dense_serves(hashing, homes):
    """Postings cleared (as when the analyzer changes) are rebuilt in the background on the next start, on both
    stores; meanwhile lexical searches fall back to dense and say so."""
    manager = homes(hashing.fingerprint, hashing.dim, hashing.spec)
    c, _ = manager.create("docs")
    c.upsert(docs_of(hashing, items(40)))
    c.store.mark_postings(None)
    manager.close()
    reopened = homes(hashing.fingerprint, hashing.dim, hashing.spec)
    c = reopened.get("docs")
    deadline = time.time() + 30
    while c.lexical_status != "ready" and time.time() < deadline:
        time.sleep(0.05)
    assert c.lexical_status == "ready"
    agree(c)


def test_reindexing_onto_another_base_rebuilds_the_postings_for_its_windows(hashing, homes):
    """Another base cuts other windows: a re-index stages their postings with their vectors and swaps both in one
    transaction, so the lexical index of the re-indexed collection is exact for the new windows."""
    from embedlift.models.spec import BaseSpec, load_base
    from embedlift.service.collections import reindex

    other = load_base(BaseSpec(model="hashing:64", max_seq_length=24))  # shorter windows: more of them
    manager = homes(hashing.fingerprint, hashing.dim, hashing.spec)
    c, _ = manager.create("docs")
    c.upsert(docs_of(hashing, items(20)))
    windows_before = c.counts()[1]
    store = c.store
    config, windows = reindex(store, other, batch=8)
    assert config.base_fingerprint == other.fingerprint and windows > windows_before
    manager.close()
    moved = homes(other.fingerprint, other.dim, other.spec)
    c2 = moved.get("docs")
    assert c2.lexical_status == "ready" and c2.lexical_index.windows == windows
    agree(c2)


def test_lexical_search_falls_back_to_dense_and_says_why(hashing, homes):
    manager = homes(hashing.fingerprint, hashing.dim, hashing.spec)
    c, _ = manager.create("docs")
    c.upsert(docs_of(hashing, items(5)))
    q = hashing.encode(["of the and"], "query")
    found = c.search(q, ["of the and"], SearchPlan(k=3, mode="hybrid"))[0]
    assert found.mode_used == "dense" and "no indexable terms" in found.note and len(found.hits) == 3
    plain, _ = manager.create("plain", lexical=None)
    plain.upsert(docs_of(hashing, items(5)))
    with pytest.raises(ConflictError, match="has no lexical index"):
        plain.search(q, ["revenue"], SearchPlan(k=3, mode="lexical"))


# --------------------------------------------------------------------------------------------- fusion
def test_weighted_fusion_on_known_lists():
    dense = {"a": 0.9, "b": 0.5, "c": 0.1}
    lexical = {"b": 12.0, "d": 4.0}
    assert minmax(dense) == {"a": 1.0, "b": 0.5, "c": 0.0}
    fused = weighted(dense, lexical, alpha=0.5)
    assert fused == pytest.approx({"a": 0.5, "b": 0.75, "c": 0.0, "d": 0.0})  # d: lexical minimum, absent on dense
    assert ranked(fused) == ["b", "a", "c", "d"]  # ties by key
    assert weighted(dense, {}, alpha=0.3) == pytest.approx({"a": 0.3, "b": 0.15, "c": 0.0})  # one side empty
    assert weighted({"x": 2.0, "y": 2.0}, {}, alpha=1.0) == {"x": 1.0, "y": 1.0}  # all tied: all normalised to 1
    assert weighted(dense, lexical, alpha=1.0) == pytest.approx({**minmax(dense), "d": 0.0})  # alpha 1: dense only


def test_rrf_on_known_lists():
    fused = rrf({"a": 3.0, "b": 2.0, "c": 1.0}, {"c": 9.0, "a": 1.0})
    assert fused == pytest.approx({"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61})
    assert ranked(fused) == ["a", "c", "b"]
    assert ranked(rrf({"x": 1.0, "y": 1.0}, {})) == ["x", "y"]  # tied scores: ranked by key, so x first


def test_fused_matrices_keep_only_candidates():
    dense = np.array([[0.9, 0.1, 0.5, 0.2]])
    lexical = np.array([[0.0, 3.0, 1.0, 0.0]])
    fused = fuse_rows(dense, lexical, "weighted", 0.5, n=2)  # dense candidates 0, 2; lexical 1, 2
    assert fused[0, 3] == -np.inf and fused[0, 2] == pytest.approx(0.5 * 0.0 + 0.5 * 0.0)
    assert fused[0, 0] == pytest.approx(0.5) and fused[0, 1] == pytest.approx(0.5)


# -------------------------------------------------------------------------------------------- filters
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.5, 1.0, -2.5]), st.sampled_from(["a", "b", "1"]))
METADATA = st.dictionaries(st.sampled_from(["x", "y", "z"]), VALUES, max_size=3)
NUMBER = st.one_of(st.integers(-3, 3), st.sampled_from([0.5, -1.5]))
# Filters may name what no document holds: U+0000, which a PostgreSQL store cannot hold (nor take as a parameter)
ASKED = st.one_of(VALUES, st.just("a\x00"))
CONDITION = st.one_of(
    ASKED,
    st.builds(lambda v: {"$eq": v}, ASKED), st.builds(lambda v: {"$ne": v}, ASKED),
    st.builds(lambda op, v: {op: v}, st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), NUMBER),
    st.builds(lambda op, v: {op: v}, st.sampled_from(["$in", "$nin"]), st.lists(ASKED, min_size=1, max_size=3)),
    st.builds(lambda v: {"$exists": v}, st.booleans()),
)
# Stored keys SQLite's JSON paths cannot quote ('q"', 'b\\', '') beside plain ones; and one no document can hold.
STORED_KEYS = ["x", "y", "z", 'q"', "b\\", ""]
LEAF = st.dictionaries(st.sampled_from([*STORED_KEYS, "x\x00"]), CONDITION, min_size=1, max_size=2)
FILTER = st.recursive(LEAF, lambda inner: st.builds(lambda op, parts: {op: parts}, st.sampled_from(["$and", "$or"]), st.lists(inner, min_size=1, max_size=3)), max_leaves=6)


@pytest.fixture(scope="module")
def filtered(hashing, module_homes):
    """One collection of random metadata per store (SQLite's JSON functions, PostgreSQL's JSONB)."""
    import random

    rng = random.Random(0)
    values = [None, True, False, -3, 0, 1, 2, 1.0, 0.5, -2.5, "a", "b", "1"]
    manager = module_homes(hashing.fingerprint, hashing.dim, hashing.spec)
    c, _ = manager.create("f")
    meta = {f"m{i}": {k: rng.choice(values) for k in STORED_KEYS if rng.random() < 0.7} for i in range(120)}
    c.upsert(docs_of(hashing, [(d, f"document {d} about revenue and riders", m) for d, m in meta.items()]))
    return c, meta


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(where=FILTER)
def test_filters_select_exactly_what_a_brute_force_evaluation_selects(filtered, where):
    c, meta = filtered
    expected = {d for d, m in meta.items() if matches(parse(where), m)}
    store_keys = c.store.matching(where)
    docs = c.store.documents(sorted({int(k) >> 16 for k in store_keys}))
    assert {v[0] for v in docs.values()} == expected
    q = np.ones((1, c.config.dim), np.float32) / np.sqrt(c.config.dim)
    for mode in ("dense", "lexical", "hybrid"):
        hits = c.search(q, ["revenue riders"], SearchPlan(k=200, mode=mode, where=where))[0].hits
        assert {h.id for h in hits} == expected, mode  # every mode filters, and every match is found


@pytest.mark.parametrize(
    "where,message",
    [
        ({"x": {"$gt": "a"}}, "filter.x.$gt takes a number"),
        ({"x": {"$between": [1, 2]}}, "unknown operator '$between'"),
        ({"$not": {"x": 1}}, "unknown operator '$not'"),
        ({"x": [1, 2]}, 'use {"$in": [...]}'),
        ({"x": {"$in": []}}, "filter.x.$in takes a list of 1 to 1024"),
        ({"x": {"$exists": 1}}, "takes true or false"),
        ({"$or": []}, "filter.$or must be a list of 1 to 1024 filters"),
        ({"x": {}}, "empty object"),
    ],
)
def test_bad_filters_name_the_field_and_what_is_allowed(where, message):
    with pytest.raises(InvalidInputError) as err:
        parse(where)
    assert message in err.value.message


# --------------------------------------------------------------------------------------------- alpha fit
def _split(n_queries: int, n_docs: int, lexical: np.ndarray) -> EmbeddedDataset:
    docs = WindowedVectors(np.eye(n_docs, dtype=np.float32), np.arange(n_docs), [(0, 1)] * n_docs, n_docs)
    return EmbeddedDataset(
        query_ids=[f"q{i}" for i in range(n_queries)], doc_ids=[f"d{j}" for j in range(n_docs)], queries=np.zeros((n_queries, 1), np.float32),
        docs=docs, relevant=[{i % n_docs} for i in range(n_queries)], query_windows=np.ones(n_queries, np.int64),
        lexical=lexical, lexical_settings=LexicalSettings(language="english"),
    )


def _scores(n_queries: int, n_docs: int, rank_of_relevant: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scores that put each query's relevant document at the given rank (0 = first), the rest in random order."""
    out = np.zeros((n_queries, n_docs))
    for i, rank in enumerate(rank_of_relevant):
        order = [j for j in rng.permutation(n_docs) if j != i % n_docs]
        order.insert(int(rank), i % n_docs)
        out[i, order] = np.linspace(1.0, 0.0, n_docs)
    return out


def test_fit_alpha_follows_strong_evidence_and_keeps_the_default_on_noise():
    rng = np.random.default_rng(0)
    n_q, n_d = 200, 40
    perfect = _scores(n_q, n_d, np.zeros(n_q, int), rng)
    poor = _scores(n_q, n_d, rng.integers(10, n_d, n_q), rng)
    # The lexical side is right and the dense side poor: the weight goes towards lexical, and the reverse.
    towards_lexical = fit_alpha(_split(n_q, n_d, perfect), poor, "mrr@10")
    towards_dense = fit_alpha(_split(n_q, n_d, poor), perfect, "mrr@10")
    assert towards_lexical.alpha < DEFAULT_ALPHA < towards_dense.alpha
    assert towards_dense.validation["hybrid"]["mrr@10"] == pytest.approx(1.0)
    # Two equally good, independent sides on 12 queries: the raw best alpha (0.8 here) is noise, the default stays.
    rng, few = np.random.default_rng(1), 12
    a = _scores(few, n_d, rng.integers(0, 4, few), rng)
    b = _scores(few, n_d, rng.integers(0, 4, few), rng)
    split = _split(few, n_d, a)
    mrr = {x: per_query_metrics(hybrid_scores(b, a, "weighted", x), split.doc_ids, split.relevant)["mrr@10"].mean() for x in ALPHA_GRID}
    assert max(mrr, key=mrr.__getitem__) == 0.8
    assert fit_alpha(split, b, "mrr@10").alpha == DEFAULT_ALPHA
