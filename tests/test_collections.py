"""Collections without HTTP: the real model on each store (SQLite files with FAISS, and a real PostgreSQL with
pgvector: tests that take ``homes`` run on both), checked against brute force."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from embedlift.models.cache import CachedEncoder, EmbeddingCache
from embedlift.models.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError
from embedlift.models.windows import embed_documents, embed_pooled
from embedlift.service.collections import CollectionManager, NewDocument
from embedlift.service.collections.collection import SearchPlan

from tests.helpers import run_cli

TOPICS = ["revenue growth", "ride sharing drivers", "autonomous vehicles", "insurance costs", "bike and scooter rentals"]
LONG = " ".join(f"Paragraph {i} discusses {TOPICS[i % 5]} in detail for the annual report." for i in range(120))


@pytest.fixture(scope="module")
def encoder(minilm, tmp_path_factory):
    return CachedEncoder(minilm, EmbeddingCache(tmp_path_factory.mktemp("cc") / "c.sqlite3"), progress=False)


def documents(encoder, items):
    """NewDocuments with real base window vectors."""
    embedded = embed_documents(encoder, [t for _, t, _ in items])
    return [
        NewDocument(id=i, text=t, metadata=m, spans=spans, vectors=vectors)
        for (i, t, m), (spans, vectors) in zip(items, embedded.per_document(), strict=True)
    ]


def dense(c, q, k, where=None):
    """Dense search of query vectors, each query's hits."""
    return [f.hits for f in c.search(q, [""] * len(q), SearchPlan(k=k, where=where))]


def corpus(n=40):
    return [(f"doc-{i}", f"Document {i} is about {TOPICS[i % 5]} and item {i}.", {"topic": TOPICS[i % 5], "even": i % 2 == 0, "n": i}) for i in range(n)]


def brute_force(encoder, items, query, k):
    """Best-window cosine of every document, ids sorted by score."""
    q, _ = embed_pooled(encoder, [query], "query")
    scores = {}
    for doc in documents(encoder, items):
        scores[doc.id] = float((doc.vectors @ q[0]).max())
    return sorted(scores, key=lambda d: -scores[d])[:k], scores


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_search_matches_brute_force_one_hit_per_document(encoder, homes, index):
    manager = homes(encoder.fingerprint, encoder.dim)
    c, created = manager.create("docs", index)
    assert created
    items = corpus() + [("long", LONG, {"topic": "long"})]
    c.upsert(documents(encoder, items))
    q, _ = embed_pooled(encoder, ["autonomous vehicles"], "query")
    hits = dense(c, q, 5)[0]
    expected, scores = brute_force(encoder, items, "autonomous vehicles", 5)
    assert [h.id for h in hits] == expected
    for h in hits:
        assert h.score == pytest.approx(scores[h.id], abs=1e-5)
    assert len({h.id for h in hits}) == len(hits)
    long_hit = next(h for h in dense(c, q, 50)[0] if h.id == "long")
    a, b = long_hit.span
    assert 0 <= a < b <= len(LONG) and long_hit.text == LONG  # the best window's span, whole text returned


def test_filter_upsert_replace_delete(encoder, homes):
    manager = homes(encoder.fingerprint, encoder.dim)
    c, _ = manager.create("docs")
    c.upsert(documents(encoder, corpus()))
    q, _ = embed_pooled(encoder, ["revenue growth"], "query")
    hits = dense(c, q, 10, where={"topic": "insurance costs", "even": True})[0]
    assert hits and all(h.metadata["topic"] == "insurance costs" and h.metadata["even"] is True for h in hits)
    assert dense(c, q, 3, where={"n": 7})[0][0].id == "doc-7"
    assert dense(c, q, 3, where={"topic": "nothing"})[0] == []
    # re-upserting an id replaces it (text, metadata and vectors)
    c.upsert(documents(encoder, [("doc-7", "Quarterly revenue growth accelerated strongly.", {"topic": "new"})]))
    assert c.store.get("doc-7").metadata == {"topic": "new"}
    assert dense(c, q, 1)[0][0].id == "doc-7"
    assert c.counts() == (40, 40)
    assert c.delete(["doc-7", "missing"]) == ["missing"]
    assert "doc-7" not in [h.id for h in dense(c, q, 40)[0]]
    assert c.counts() == (39, 39)
    # any JSON key filters, those SQLite's paths cannot quote too (test_lexical's brute-force comparison)
    c.upsert(documents(encoder, [("odd-keys", "Keys with quotes and backslashes.", {'a"b': 1, "c\\": "x", "": True})]))
    for where in ({'a"b': 1}, {"c\\": "x"}, {"": True}, {'a"b': {"$gte": 1}, "": {"$exists": True}}):
        assert [h.id for h in dense(c, q, 40, where=where)[0]] == ["odd-keys"], where
    assert dense(c, q, 3, where={'a"b': 2})[0] == []


def test_hnsw_deletes_are_filtered_then_rebuilt(encoder, tmp_path, monkeypatch):
    from embedlift.service.collections import faiss_index

    monkeypatch.setattr(faiss_index, "REBUILD_MIN", 4)
    manager = CollectionManager(tmp_path, encoder.fingerprint, encoder.dim)
    manager.load_all()
    c, _ = manager.create("h", "hnsw")
    c.upsert(documents(encoder, corpus(20)))
    q, _ = embed_pooled(encoder, ["ride sharing drivers"], "query")
    gone = [h.id for h in dense(c, q, 8)[0]]
    c.delete(gone)
    deadline = time.time() + 30
    while c.base_index.rebuilding and time.time() < deadline:
        time.sleep(0.05)
    hits = dense(c, q, 20)[0]
    assert not set(gone) & {h.id for h in hits} and len(hits) == 12
    assert c.base_index.ntotal == 12  # the graph was rebuilt without the deleted ids


def test_restart_serves_the_same_documents(encoder, homes):
    manager = homes(encoder.fingerprint, encoder.dim)
    c, _ = manager.create("docs")
    c.upsert(documents(encoder, corpus()))
    c.delete(["doc-3"])
    q, _ = embed_pooled(encoder, ["bike rentals"], "query")
    before = [(h.id, h.score) for h in dense(c, q, 10)[0]]
    manager.close()
    again = homes(encoder.fingerprint, encoder.dim)
    c2 = again.get("docs")
    after = [(h.id, h.score) for h in dense(c2, q, 10)[0]]
    assert after == before and c2.counts() == (39, 39)


def test_names_conflicts_and_unknown(encoder, homes, tmp_path):
    manager = homes(encoder.fingerprint, encoder.dim)
    for bad in ["../x", ".hidden", "a/b", ""]:
        with pytest.raises(InvalidInputError, match="invalid collection name"):
            manager.create(bad)
    manager.create("a")
    assert manager.create("a")[1] is False  # same settings: idempotent
    with pytest.raises(ConflictError, match="other settings"):
        manager.create("a", "hnsw")
    with pytest.raises(NotFoundError, match="unknown collection 'b'"):
        manager.get("b")
    manager.delete("a")
    assert manager.names() == [] and homes(encoder.fingerprint, encoder.dim).names() == []
    assert not any(tmp_path.iterdir())  # nothing left behind in the directory (the embedded store's home)


def test_hnsw_settings_a_store_cannot_build_are_refused_at_creation(encoder, homes):
    """FAISS takes every setting the API allows; pgvector only its own bounds, refused when the collection is
    created (a 400 naming them) rather than when its index is built at 20,000 windows or searched (it answered
    500 with ef_search past 1000: benchmarks/fuzz.py)."""
    manager = homes(encoder.fingerprint, encoder.dim)
    pgvector_refuses = [  # (name, index, settings, the field named)
        ("m", "hnsw", {"hnsw_m": 128}, "hnsw_m"), ("ef-c", "auto", {"hnsw_m": 32, "ef_construction": 40}, "ef_construction"),
        ("ef-s", "auto", {"ef_search": 2277}, "ef_search"), ("ef-c-max", "hnsw", {"ef_construction": 4096}, "ef_construction"),
    ]
    for name, index, settings, field in pgvector_refuses:
        if homes.kind == "postgres":
            with pytest.raises(InvalidInputError, match="pgvector's, which takes") as err:
                manager.create(name, index, **settings)
            assert err.value.field == field
        else:
            c, _ = manager.create(name, index, **settings)
            c.upsert(documents(encoder, corpus(30)))
            q, _ = embed_pooled(encoder, ["revenue growth"], "query")
            assert len(dense(c, q, 5)[0]) == 5
    c, _ = manager.create("flat", "flat", hnsw_m=128, ef_search=4096)  # never builds an HNSW index: any store
    assert c.config.index == "flat"


@pytest.mark.parametrize("dim", [3072, 4608])
def test_a_base_wider_than_pgvectors_hnsw_is_searched_exactly_or_by_halfvec(dim, homes):
    """OpenAI's text-embedding-3-large has 3,072 dimensions; pgvector's HNSW takes ``vector`` up to 2,000 and
    ``halfvec`` up to 4,000. Up to 4,000 the index orders candidates by the half-precision casts and the hits keep
    their float32 scores; past it ``hnsw`` is refused at creation and ``auto`` stays exact. FAISS takes any."""
    from embedlift.models.spec import BaseSpec, load_base

    wide = load_base(BaseSpec(model=f"hashing:{dim}"))
    manager = homes(wide.fingerprint, wide.dim)
    items = corpus(30)
    if homes.kind == "postgres" and dim > 4000:
        with pytest.raises(InvalidInputError, match="at most 4000 dimensions"):
            manager.create("wide", "hnsw")
        c, _ = manager.create("wide", "auto")
    else:
        c, _ = manager.create("wide", "hnsw")
    c.upsert(documents(wide, items))
    assert c.kind == ("flat" if homes.kind == "postgres" and dim > 4000 else "hnsw")
    q, _ = embed_pooled(wide, ["revenue growth", "insurance costs"], "query")
    docs = documents(wide, items)
    for qi, hits in enumerate(dense(c, q, 5)):
        exact = {d.id: float(np.max(d.vectors @ q[qi])) for d in docs}
        assert [h.score for h in hits] == pytest.approx(sorted(exact.values(), reverse=True)[:5], abs=1e-6)  # the top 5 (ties in any order)
        assert all(h.score == pytest.approx(exact[h.id], abs=1e-6) for h in hits)  # each its float32 score, not halfvec's


def test_another_base_is_refused_and_reindex_fixes_it(encoder, tmp_path):
    """A collection built with another base is listed but refused, naming both fingerprints and the
    re-index command; `embedlift reindex` re-embeds its stored texts onto this base."""
    data_dir = tmp_path / "data"
    other = CollectionManager(data_dir / "collections", "other-model:0123456789abcdef", encoder.dim)
    other.load_all()
    c, _ = other.create("docs")
    c.upsert(documents(encoder, corpus(10)))  # vectors do not matter: they are about to be replaced
    other.close()
    manager = CollectionManager(data_dir / "collections", encoder.fingerprint, encoder.dim)
    manager.load_all()
    with pytest.raises(ConflictError) as err:
        manager.get("docs")
    assert "other-model:0123456789abcdef" in err.value.message and encoder.fingerprint in err.value.message
    assert "embedlift reindex docs" in err.value.message
    manager.close()
    out = run_cli("reindex", "docs", "--data-dir", str(data_dir), "--cache", str(tmp_path / "c.sqlite3"))
    assert out.returncode == 0, out.stderr
    fixed = CollectionManager(data_dir / "collections", encoder.fingerprint, encoder.dim)
    fixed.load_all()
    c = fixed.get("docs")
    q, _ = embed_pooled(encoder, ["insurance costs"], "query")
    expected, _ = brute_force(encoder, corpus(10), "insurance costs", 3)
    assert [h.id for h in dense(c, q, 3)[0]] == expected


class FailingEncoder:
    """The real encoder that fails on its n-th call: a re-index that dies half-way."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.calls, self.fail_at = inner, 0, fail_at
        self.fingerprint, self.dim, self.spec = inner.fingerprint, inner.dim, inner.spec

    def split(self, texts, role):
        return self.inner.split(texts, role)

    def encode(self, texts, role):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed mid re-index")
        return self.inner.encode(texts, role)


def test_a_failed_reindex_leaves_the_last_good_state(encoder, homes):
    """Staged windows are swapped in by one transaction: a re-index that dies after some batches leaves the
    old vectors and base; the next one completes and serves."""
    from embedlift.service.collections import reindex

    other = homes("other-model:0123456789abcdef", encoder.dim)
    c, _ = other.create("docs")
    c.upsert(documents(encoder, corpus(12)))
    store = other.open_store("docs")
    before = store.iter_windows().__next__()
    with pytest.raises(RuntimeError, match="killed mid re-index"):
        reindex(store, FailingEncoder(encoder, fail_at=2), batch=4)
    assert store.read_config().base_fingerprint == "other-model:0123456789abcdef"
    after = store.iter_windows().__next__()
    assert (before[0] == after[0]).all() and (before[1] == after[1]).all()
    progress = []
    config, windows = reindex(store, encoder, batch=4, report=lambda done, total: progress.append((done, total)))
    assert config.base_fingerprint == encoder.fingerprint and windows == 12
    assert progress == [(0, 12), (4, 12), (8, 12), (12, 12)]
    store.close()
    other.close()
    manager = homes(encoder.fingerprint, encoder.dim)
    q, _ = embed_pooled(encoder, ["insurance costs"], "query")
    assert [h.id for h in dense(manager.get("docs"), q, 3)[0]] == brute_force(encoder, corpus(12), "insurance costs", 3)[0]


CRASHER = textwrap.dedent(
    """
    import sys, numpy as np
    from pathlib import Path
    from embedlift.service.collections import CollectionManager, NewDocument
    where, dim = sys.argv[1], 8
    if where.startswith("postgresql://"):
        from embedlift.service.collections.postgres import PostgresHome
        from embedlift.service.database import Database
        home = PostgresHome(Database(where).open())
    else:
        home = Path(where)
    m = CollectionManager(home, "fake:0", dim); m.load_all()
    c = m.get("docs")
    rng = np.random.default_rng(0)
    for batch in range(10_000):
        docs = [NewDocument(id=f"b{batch}-{i}", text="t" * 50, metadata={"batch": batch},
                            spans=[(0, 25), (20, 50)], vectors=rng.random((2, dim), dtype=np.float32)) for i in range(50)]
        c.upsert(docs)
        print(f"ack {batch}", flush=True)
    """
)


def test_a_crash_mid_write_keeps_every_acknowledged_write(homes, tmp_path):
    """SIGKILL a process that upserts in a loop: every batch it acknowledged is there, whole, and nothing
    half-written is (each document has all of its windows)."""
    m = homes("fake:0", 8)
    m.create("docs")
    m.close()
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, homes.url or str(tmp_path)], stdout=subprocess.PIPE, text=True)
    acked = -1
    for line in proc.stdout:
        acked = int(line.split()[1])
        if acked >= 20:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    m = homes("fake:0", 8)
    c = m.get("docs")
    docs, windows = c.counts()
    assert docs >= 50 * (acked + 1) and docs % 50 == 0  # whole batches only
    assert windows == 2 * docs
    for batch in range(acked + 1):
        assert c.store.get(f"b{batch}-49") is not None
    assert sum(len(k) for k, _ in c.store.iter_windows()) == windows
    if homes.kind == "embedded":
        assert c.base_index.ntotal == windows


def test_auto_index_turns_to_hnsw_past_the_threshold_and_keeps_every_write(encoder, tmp_path, monkeypatch):
    """``auto`` searches exactly while small; past AUTO_HNSW_WINDOWS it builds HNSW in the background, replays
    the writes made meanwhile, and a restart opens it as HNSW. Results stay those of brute force."""
    from embedlift.service.collections import faiss_index

    monkeypatch.setattr(faiss_index, "AUTO_HNSW_WINDOWS", 30)
    manager = CollectionManager(tmp_path, encoder.fingerprint, encoder.dim)
    manager.load_all()
    c, _ = manager.create("grow")
    assert c.config.index == "auto" and c.kind == "flat"
    items = corpus(40)
    c.upsert(documents(encoder, items[:20]))
    assert c.kind == "flat"
    c.upsert(documents(encoder, items[20:]))  # 40 windows >= 30: conversion starts in the background
    c.delete(["doc-3"])  # a write during the conversion
    deadline = time.time() + 30
    while c.kind != "hnsw" and time.time() < deadline:
        time.sleep(0.05)
    assert c.kind == "hnsw"
    expected, _ = brute_force(encoder, [i for i in items if i[0] != "doc-3"], "autonomous vehicles", 5)
    q, _ = embed_pooled(encoder, ["autonomous vehicles"], "query")
    assert [h.id for h in dense(c, q, 5)[0]] == expected
    manager.close()
    reopened = CollectionManager(tmp_path, encoder.fingerprint, encoder.dim)
    reopened.load_all()
    c2 = reopened.get("grow")
    assert c2.kind == "hnsw"
    assert [h.id for h in dense(c2, q, 5)[0]] == expected


@pytest.mark.parametrize("homes", ["postgres"], indirect=True)
def test_auto_index_on_postgres_searches_exactly_while_small_then_on_hnsw(encoder, homes, monkeypatch):
    """On PostgreSQL ``auto`` scans exactly below the threshold and uses pgvector's HNSW index past it; a
    filter still finds ``k`` documents (iterative scan) and results equal brute force's on this small set."""
    from embedlift.service.collections import postgres

    monkeypatch.setattr(postgres, "AUTO_HNSW_WINDOWS", 30)
    manager = homes(encoder.fingerprint, encoder.dim)
    c, _ = manager.create("grow")
    items = corpus(40)
    c.upsert(documents(encoder, items[:20]))
    assert c.kind == "flat"
    c.upsert(documents(encoder, items[20:]))
    assert c.kind == "hnsw"
    q, _ = embed_pooled(encoder, ["autonomous vehicles"], "query")
    assert [h.id for h in dense(c, q, 5)[0]] == brute_force(encoder, items, "autonomous vehicles", 5)[0]
    only = [i for i in items if i[2]["topic"] == "insurance costs"]
    hits = dense(c, q, 5, where={"topic": "insurance costs"})[0]
    assert [h.id for h in hits] == brute_force(encoder, only, "autonomous vehicles", 5)[0]


def test_a_collection_on_another_base_is_reindexed_through_the_manager(encoder, homes):
    """The server's path (POST /collections/{c}/reindex): claim, re-embed, swap, serve; on both stores."""
    from embedlift.service.collections import reindex

    other = homes("other-model:0123456789abcdef", encoder.dim)
    c, _ = other.create("docs")
    c.upsert(documents(encoder, corpus(10)))
    other.close()
    manager = homes(encoder.fingerprint, encoder.dim)
    assert "docs" in manager.mismatched()
    with pytest.raises(ConflictError, match="other-model"):
        manager.get("docs")
    store = manager.claim_reindex("docs")
    reindex(store, encoder, batch=4)
    served = manager.finish_reindex("docs")
    q, _ = embed_pooled(encoder, ["insurance costs"], "query")
    assert [h.id for h in dense(served, q, 3)[0]] == brute_force(encoder, corpus(10), "insurance costs", 3)[0]
    assert [h.id for h in dense(homes(encoder.fingerprint, encoder.dim).get("docs"), q, 3)[0]] == [h.id for h in dense(served, q, 3)[0]]


@pytest.mark.parametrize("homes", ["postgres"], indirect=True)
def test_two_replicas_search_each_others_writes_at_once_in_every_index(encoder, homes, tmp_path):
    """Two managers over one database (two replicas): each one's lexical index lives in its memory and follows
    the write log; an ``apply_to: both`` adapter's view is one table in the database that both search (built
    once, kept current from the same log). A write or delete through one is searched through the other at once,
    exactly (the view against brute force over the mapped vectors of what the database holds)."""
    from embedlift.models.checkpoint import load_checkpoint

    from tests.helpers import make_adapter

    a, b = homes(encoder.fingerprint, encoder.dim), homes(encoder.fingerprint, encoder.dim)
    ca, _ = a.create("docs")
    ca.upsert(documents(encoder, corpus(20)))
    cb = b.get("docs")
    adapter = load_checkpoint(make_adapter(encoder, tmp_path / "both", apply_to="both"), expected=None).adapter
    q, _ = embed_pooled(encoder, ["autonomous vehicles"], "query")
    qa = adapter.transform_query(q)

    def view_ids(c):
        return [h.id for h in c.search(qa, ["autonomous vehicles"], SearchPlan(k=5), "both@1", adapter)[0].hits]

    def mapped_brute_force(items):
        scores = {d.id: float((adapter.transform_document(d.vectors) @ qa[0]).max()) for d in documents(encoder, items)}
        return sorted(scores, key=lambda d: -scores[d])[:5]

    view = ca.index_for("both@1", adapter)
    assert view.pending and cb.index_for("both@1", adapter).pending  # one view in the store, not built yet
    with pytest.raises(UnavailableError, match="being built"):
        view_ids(cb)
    view.build()
    assert not cb.index_for("both@1", adapter).pending  # built once, through a, for both
    assert view_ids(cb) == view_ids(ca) == mapped_brute_force(corpus(20))
    ca.upsert(documents(encoder, [("fresh", "Autonomous vehicles and robotaxis replace drivers.", {"topic": "new"})]))
    lexical = cb.search(None, ["robotaxis"], SearchPlan(k=3, mode="lexical"))[0]
    assert [h.id for h in lexical.hits] == ["fresh"]
    assert "fresh" in view_ids(cb) and view_ids(cb) == view_ids(ca)
    cb.delete(["fresh", "doc-2"])
    assert ca.search(None, ["robotaxis"], SearchPlan(k=3, mode="lexical"))[0].hits == []
    assert "fresh" not in view_ids(ca) and view_ids(ca) == view_ids(cb)
    assert view_ids(ca) == mapped_brute_force([c for c in corpus(20) if c[0] != "doc-2"])
    cb.drop_views(set())  # its adapter deleted: the table goes, for every replica
    with ca.store.db.transaction() as conn:
        assert conn.execute("SELECT count(*), to_regclass(%s) FROM embedlift.views", (view.table,)).fetchone() == (0, None)
    with pytest.raises(NotFoundError, match="dropped"):
        view_ids(ca)  # a replica that still has the adapter a moment longer
    hybrid = [cb.search(q, ["autonomous vehicles drivers"], SearchPlan(k=5, mode="hybrid"))[0].hits for _ in range(2)]
    assert [h.id for h in hybrid[0]] == [h.id for h in ca.search(q, ["autonomous vehicles drivers"], SearchPlan(k=5, mode="hybrid"))[0].hits]
    again = cb.index_for("both@2", adapter)
    again.build()
    b.delete("docs")  # a deleted collection takes its views' tables with it
    with ca.store.db.transaction() as conn:
        assert conn.execute("SELECT count(*), to_regclass(%s) FROM embedlift.views", (again.table,)).fetchone() == (0, None)
