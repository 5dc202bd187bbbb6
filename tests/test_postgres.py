"""The PostgreSQL store behind real servers: replicas sharing one database, a database outage under load, the
store URL's password kept out of everything a user can see. (The store contract itself runs on both stores in
test_collections.py and test_lexical.py.)"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest

from tests.helpers import HASHING, run_cli, start_server, stop_server

pytestmark = pytest.mark.slow
PASSWORD = "s3cret-Pw-9f2"


def with_password(url: str) -> str:
    """The same database with a password in the URL (the test server trusts loopback, so it is accepted
    whatever it is: what is tested is that it never shows)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


def docs(n: int, prefix: str = "d") -> list[dict]:
    topics = ["revenue growth", "driver pay", "insurance reserves", "scooter fleet"]
    return [{"id": f"{prefix}{i}", "text": f"Note {i} on {topics[i % 4]} in region {i % 3}.", "metadata": {"topic": topics[i % 4], "i": i}} for i in range(n)]


@pytest.fixture
def replicas(postgres, tmp_path):
    """Three `embedlift serve` processes on 127.0.0.1 sharing one fresh database (each its own data and
    adapters directories: what they share is the database alone)."""
    url = with_password(postgres.create_database(f"r_{uuid.uuid4().hex[:10]}"))
    procs, urls = [], []
    try:
        for i in range(3):
            proc, base = start_server(tmp_path / f"data{i}", tmp_path / f"adapters{i}", "--base", HASHING, "--watch-interval", "1",
                                      env={"EMBEDLIFT_STORE": url, "EMBEDLIFT_CACHE_STORE": "store"})
            procs.append(proc)
            urls.append(base)
        yield urls
    finally:
        for proc in procs:
            stop_server(proc)
        for proc in procs:
            log = proc.stdout.read() if proc.stdout else ""
            assert PASSWORD not in log


def test_replicas_read_and_search_each_others_writes_at_once(replicas):
    a, b, c = replicas
    assert httpx.put(f"{a}/collections/notes", json={}).status_code == 201
    assert httpx.post(f"{a}/collections/notes/documents", json={"documents": docs(40)}).status_code == 200
    body = {"query": "insurance reserves region", "k": 5}
    answers = [httpx.post(f"{u}/collections/notes/search", json=body).json() for u in replicas]
    assert answers[0]["hits"] and answers[0] == answers[1] == answers[2]  # the same hits, scores and spans
    for mode in ("dense", "lexical", "hybrid"):
        got = [httpx.post(f"{u}/collections/notes/search", json={**body, "mode": mode, "filter": {"topic": "driver pay"}}).json() for u in replicas]
        assert got[0] == got[1] == got[2] and {h["metadata"]["topic"] for h in got[0]["hits"]} == {"driver pay"}
    # a write through one replica is read through the others at once
    assert httpx.post(f"{b}/collections/notes/documents", json={"documents": [{"id": "new", "text": "A zeppelin fleet for deliveries."}]}).status_code == 200
    assert httpx.get(f"{c}/collections/notes/documents/new").json()["text"] == "A zeppelin fleet for deliveries."
    top = httpx.post(f"{a}/collections/notes/search", json={"query": "zeppelin deliveries", "k": 1, "mode": "lexical"}).json()["hits"]
    assert [h["id"] for h in top] == ["new"]
    assert httpx.get(f"{c}/collections/notes").json()["documents"] == 41
    assert httpx.post(f"{c}/collections/notes/documents/delete", json={"ids": ["new"]}).json()["deleted"] == 1
    assert httpx.get(f"{a}/collections/notes/documents/new").status_code == 404
    # a background job submitted to one replica is reported by every replica
    bulk = httpx.post(f"{a}/collections/notes/documents", json={"documents": docs(300, prefix="bulk")})
    assert bulk.status_code == 202
    job = bulk.json()["job"]["id"]
    wait_for(lambda: httpx.get(f"{c}/jobs/{job}").json()["status"] == "succeeded", timeout=60)
    reports = [httpx.get(f"{u}/jobs/{job}").json() for u in replicas]
    assert reports[0] == reports[1] == reports[2] and reports[0]["result"]["upserted"] == 300
    assert httpx.get(f"{b}/jobs/nope").status_code == 404
    # created, listed, deleted: every replica agrees at once
    assert httpx.put(f"{c}/collections/other", json={"lexical": None}).status_code == 201
    assert [x["name"] for x in httpx.get(f"{a}/collections").json()["collections"]] == ["notes", "other"]
    assert httpx.delete(f"{b}/collections/notes").status_code == 204
    assert httpx.post(f"{a}/collections/notes/search", json=body).status_code == 404
    assert httpx.put(f"{a}/collections/notes", json={}).status_code == 201  # re-created: new, empty
    assert httpx.get(f"{c}/collections/notes").json()["documents"] == 0


def wait_for(check, timeout: float = 10.0) -> float:
    """Seconds until ``check()`` holds (the bound is generous; the benchmark measures the real time)."""
    start = time.perf_counter()
    while not check():
        assert time.perf_counter() - start < timeout, "did not propagate in time"
        time.sleep(0.05)
    return time.perf_counter() - start


def tar_of(directory) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(directory, arcname=".")
    return buf.getvalue()


def test_adapters_registered_activated_and_deleted_through_one_replica_are_served_by_all(replicas, hashing, tmp_path):
    from tests.helpers import make_adapter

    a, b, c = replicas
    upload = tar_of(make_adapter(hashing, tmp_path / "upload" / "tuned"))
    r = httpx.post(f"{a}/adapters", content=upload, headers={"Content-Type": "application/x-tar"}, params={"name": "tuned"})
    assert r.status_code == 201, r.text
    for u in replicas:  # registered once, stored in the database, loaded by every replica
        wait_for(lambda u=u: [x["name"] for x in httpx.get(f"{u}/adapters").json()["adapters"]] == ["tuned"])
    assert httpx.post(f"{b}/adapters/tuned/activate").json()["active"] == "tuned@1"
    for u in replicas:
        wait_for(lambda u=u: httpx.get(f"{u}/adapters").json()["active"] == "tuned@1")
    vectors = [httpx.post(f"{u}/embed", json={"input": ["which adapter serves me?"]}).json() for u in replicas]
    assert vectors[0]["adapter"] == "tuned@1" and vectors[0] == vectors[1] == vectors[2]
    # a new version of the same name through another replica
    again = tar_of(make_adapter(hashing, tmp_path / "upload2" / "tuned", seed=1))
    assert httpx.post(f"{c}/adapters", content=again, headers={"Content-Type": "application/x-tar"}, params={"name": "tuned"}).status_code == 201
    for u in replicas:
        wait_for(lambda u=u: httpx.get(f"{u}/adapters").json()["active"] == "tuned@2")
    # two activations at once from two replicas: one winner, served by every replica
    upload_other = tar_of(make_adapter(hashing, tmp_path / "upload3" / "other", seed=2))
    assert httpx.post(f"{a}/adapters", content=upload_other, headers={"Content-Type": "application/x-tar"}, params={"name": "other"}).status_code == 201
    results = {}
    threads = [threading.Thread(target=lambda u=u, n=n: results.setdefault(u, httpx.post(f"{u}/adapters/{n}/activate").status_code))
               for u, n in ((a, "other"), (b, "base"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results.values()) == {200}
    wait_for(lambda: len({httpx.get(f"{u}/adapters").json()["active"] for u in replicas}) == 1)
    winner = httpx.get(f"{a}/adapters").json()["active"]
    assert winner in ("other@1", None)
    # rollback and delete, through yet another replica
    httpx.post(f"{c}/adapters/tuned/activate")
    assert httpx.delete(f"{a}/adapters/tuned").status_code == 409  # active: refused on every replica alike
    assert httpx.post(f"{a}/adapters/rollback").status_code == 200
    for u in replicas:
        wait_for(lambda u=u: httpx.get(f"{u}/adapters").json()["active"] != "tuned@2")
    assert httpx.post(f"{b}/adapters/base/activate").status_code == 200
    assert httpx.delete(f"{b}/adapters/tuned").status_code == 204
    for u in replicas:
        wait_for(lambda u=u: "tuned" not in [x["name"] for x in httpx.get(f"{u}/adapters").json()["adapters"]])
    assert not (tmp_path / "adapters0" / "tuned").exists()  # its files are gone too (or the watcher would bring it back)
    # a checkpoint dropped into one replica's adapters directory is registered into the database
    make_adapter(hashing, tmp_path / "adapters2" / "dropped", seed=3)
    for u in replicas:
        wait_for(lambda u=u: "dropped" in [x["name"] for x in httpx.get(f"{u}/adapters").json()["adapters"]])


def test_an_outage_is_503_with_retry_after_and_recovers_without_a_restart(tmp_path):
    """The database stopped and started again under load: writes and searches get 503 + Retry-After naming
    the store (never a 500, never the password), /ready is 503, /embed keeps serving; when it returns, the
    service recovers by itself and every acknowledged write is there."""
    from tests.pgserver import LocalPostgres

    pg = LocalPostgres().start()  # its own server: this test stops it
    proc = None
    try:
        url = with_password(pg.create_database("outage"))
        proc, base = start_server(tmp_path / "data", tmp_path / "adapters", "--base", HASHING, "--watch-interval", "0",
                                  env={"EMBEDLIFT_STORE": url, "EMBEDLIFT_STORE_TIMEOUT": "2"})
        assert httpx.put(f"{base}/collections/c", json={}).status_code == 201
        acked, statuses, stop = [], [], threading.Event()

        def writer() -> None:
            i = 0
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    r = client.post(f"{base}/collections/c/documents", json={"documents": [{"id": f"w{i}", "text": f"write number {i}"}]})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        acked.append(f"w{i}")
                    else:
                        assert r.status_code == 503 and "Retry-After" in r.headers, r.text
                    i += 1
                    time.sleep(0.02)

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(1.0)
        pg.stop()
        time.sleep(1.0)
        down = httpx.post(f"{base}/collections/c/search", json={"query": "write", "k": 3}, timeout=30)
        assert down.status_code == 503 and int(down.headers["Retry-After"]) >= 1
        message = down.json()["detail"]
        assert "postgresql://postgres@127.0.0.1" in message and PASSWORD not in message
        assert httpx.get(f"{base}/ready", timeout=30).status_code == 503
        assert httpx.post(f"{base}/embed", json={"input": ["still here"]}, timeout=30).status_code == 200
        metrics = httpx.get(f"{base}/metrics", timeout=30)
        assert metrics.status_code == 200 and PASSWORD not in metrics.text
        pg.start()
        deadline = time.time() + 30
        while httpx.get(f"{base}/ready", timeout=30).status_code != 200 and time.time() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{base}/ready").status_code == 200
        time.sleep(1.0)
        stop.set()
        thread.join()
        assert 503 in statuses and statuses[-1] == 200 and 500 not in statuses
        for doc_id in acked:
            assert httpx.get(f"{base}/collections/c/documents/{doc_id}").status_code == 200, doc_id
        assert httpx.get(f"{base}/collections/c").json()["documents"] >= len(acked)  # a write cut off after its commit may be there unacknowledged
    finally:
        if proc is not None:
            stop_server(proc)
            assert PASSWORD not in (proc.stdout.read() if proc.stdout else "")
        pg.close()


def test_a_bad_store_url_is_one_line_without_the_password():
    out = run_cli("serve", "--store", f"mysql://root:{PASSWORD}@127.0.0.1/x", "--base", HASHING)
    assert out.returncode == 2 and "postgresql://USER[:PASSWORD]@HOST:PORT/DB" in out.stderr and PASSWORD not in out.stderr
    assert "Traceback" not in out.stderr


def test_the_shared_cache_embeds_each_text_once_for_the_fleet(postgres, minilm):
    """Two processes' encoders over one database (``--cache-store store``): what one embedded, the other reads."""
    from embedlift.models.cache import CachedEncoder
    from embedlift.service.database import Database
    from embedlift.service.shared_cache import DatabaseCache

    url = postgres.create_database(f"c_{uuid.uuid4().hex[:10]}")
    first_db, second_db = Database(url).open(), Database(url).open()
    try:
        texts = [f"Lyft's revenue in quarter {i} grew." for i in range(20)]
        first = CachedEncoder(minilm, DatabaseCache(first_db), progress=False)
        vectors = first.encode(texts, "document")
        assert first.stats.computed == 20
        second = CachedEncoder(minilm, DatabaseCache(second_db), progress=False)
        again = second.encode(texts, "document")
        assert second.stats.cached == 20 and second.stats.computed == 0
        assert (again == vectors).all() and DatabaseCache(second_db).count(minilm.fingerprint) == 20
        assert DatabaseCache(second_db).dim_of(minilm.fingerprint) == minilm.dim
    finally:
        first_db.close()
        second_db.close()


def test_cache_store_needs_a_store():
    out = run_cli("serve", "--cache-store", "store", "--base", HASHING)
    assert out.returncode == 2 and "needs a PostgreSQL store" in out.stderr


def test_store_copy_moves_an_embedded_deployment_without_re_embedding(postgres, hashing, tmp_path):
    """`embedlift store copy`: collections, checkpoints with their versions and the active adapter; a server on
    the store (fresh data and adapters directories) then answers exactly as the embedded one did."""
    from tests.helpers import app_client, make_adapter

    data, adapters = tmp_path / "data", tmp_path / "adapters"
    make_adapter(hashing, adapters / "tuned")
    make_adapter(hashing, adapters / "other", seed=1)
    queries = [{"query": "insurance reserves region", "k": 5, "mode": m} for m in ("dense", "lexical", "hybrid")]
    with app_client(data, adapters) as client:
        assert client.put("/collections/notes", json={}).status_code == 201
        assert client.put("/collections/plain", json={"lexical": None}).status_code == 201
        assert client.post("/collections/notes/documents", json={"documents": docs(60)}).status_code == 200
        assert client.post("/collections/plain/documents", json={"documents": docs(7, "p")}).status_code == 200
        assert client.post("/adapters", json={"name": "tuned"}).status_code == 201  # version 2 of tuned
        client.post("/adapters/other/activate")
        client.post("/adapters/tuned/activate")
        before = [client.post("/collections/notes/search", json=q).json() for q in queries]
        listing = client.get("/adapters").json()
    assert listing["active"] == "tuned@2"
    url = with_password(postgres.create_database(f"m_{uuid.uuid4().hex[:10]}"))
    out = run_cli("store", "copy", "--from", str(data), "--to", url, "--adapters-dir", str(adapters))
    assert out.returncode == 0, out.stderr
    assert "collection notes: 60 documents" in out.stderr and "adapter tuned@2 (active)" in out.stderr and PASSWORD not in out.stderr
    with app_client(tmp_path / "fresh-data", tmp_path / "fresh-adapters", store=url) as client:
        assert client.get("/adapters").json()["active"] == "tuned@2"
        assert client.post("/adapters/rollback").json()["active"] == "other@1"  # the history came along
        client.post("/adapters/tuned/activate")
        after = [client.post("/collections/notes/search", json=q).json() for q in queries]
        assert client.get("/collections/plain").json()["documents"] == 7
    for b, a in zip(before, after, strict=True):
        assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]]
        assert [h["score"] for h in a["hits"]] == pytest.approx([h["score"] for h in b["hits"]], rel=1e-5)
    again = run_cli("store", "copy", "--from", str(data), "--to", url, "--adapters-dir", str(adapters))
    assert again.returncode == 2 and "already has adapters" in again.stderr  # never merges into live data


def test_the_password_stays_out_of_reprs_and_messages(postgres):
    from embedlift.service.database import Database, redact
    from embedlift.service.settings import Settings

    url = with_password(postgres.url())
    assert PASSWORD not in repr(Settings(store=url)) and PASSWORD not in repr(Database(url))
    assert redact(url) == f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    from embedlift.service.database import StoreUnavailableError

    down = Database(url.replace(str(postgres.port), "1"), timeout=1)  # nothing listens on port 1: refused
    with pytest.raises(StoreUnavailableError) as err:
        down.open(wait=0)
    message = err.value.message
    assert err.value.status_code == 503 and PASSWORD not in message and "postgresql://postgres@127.0.0.1:1/postgres cannot be reached" in message


def test_a_replica_killed_mid_upsert_loses_nothing_and_its_job_finishes_elsewhere(postgres, tmp_path):
    """SIGKILL the replica running a bulk upsert: every acknowledged document is there, and another replica
    takes the job over once its lease runs out and finishes it, with no document twice."""
    import os
    import signal

    url = postgres.create_database(f"k_{uuid.uuid4().hex[:10]}")
    env = {"EMBEDLIFT_STORE": url, "EMBEDLIFT_JOB_LEASE": "2", "EMBEDLIFT_UPSERT_BATCH": "25"}
    a_proc, a = start_server(tmp_path / "a", tmp_path / "aa", "--base", HASHING, "--watch-interval", "0", env=env)
    b_proc, b = start_server(tmp_path / "b", tmp_path / "ba", "--base", HASHING, "--watch-interval", "0", env=env)
    try:
        assert httpx.put(f"{a}/collections/c", json={}).status_code == 201
        assert httpx.post(f"{a}/collections/c/documents", json={"documents": docs(10, "ack")}).status_code == 200
        bulk = httpx.post(f"{a}/collections/c/documents", json={"documents": docs(6000, "bulk")}, timeout=60)
        assert bulk.status_code == 202
        job = bulk.json()["job"]["id"]
        wait_for(lambda: httpx.get(f"{b}/jobs/{job}").json()["done"] > 0, timeout=30)
        os.kill(a_proc.pid, signal.SIGKILL)
        a_proc.wait()
        assert httpx.get(f"{b}/jobs/{job}").json()["done"] < 6000  # killed part-way
        wait_for(lambda: httpx.get(f"{b}/jobs/{job}").json()["status"] == "succeeded", timeout=60)
        info = httpx.get(f"{b}/collections/c").json()
        assert info["documents"] == 6010 and info["windows"] == 6010  # nothing lost, nothing twice
        for doc_id in ("ack0", "ack9", "bulk0", "bulk5999"):
            assert httpx.get(f"{b}/collections/c/documents/{doc_id}").status_code == 200
    finally:
        if a_proc.poll() is None:
            a_proc.kill()
        stop_server(b_proc)


def test_an_evaluation_and_a_re_index_queued_on_a_killed_replica_finish_on_another(postgres, tmp_path):
    """A replica dies with an evaluation and a re-index queued behind bulk upserts: once their lease runs out
    another replica claims them all from the database and finishes them; the evaluation's result is the one
    the survivor computes itself, and the re-indexed collection is served on the survivor's base."""
    import os
    import signal

    import psycopg

    url = postgres.create_database(f"j_{uuid.uuid4().hex[:10]}")
    env = {"EMBEDLIFT_STORE": url, "EMBEDLIFT_JOB_LEASE": "2", "EMBEDLIFT_UPSERT_BATCH": "10"}
    old_proc, old = start_server(tmp_path / "o", tmp_path / "oa", "--base", "hashing:32", "--watch-interval", "0", env=env)
    try:  # a collection built with another base: what a re-index is for
        assert httpx.put(f"{old}/collections/old", json={}).status_code == 201
        assert httpx.post(f"{old}/collections/old/documents", json={"documents": docs(40, "o")}).status_code == 200
    finally:
        stop_server(old_proc)
    a_proc, a = start_server(tmp_path / "a", tmp_path / "aa", "--base", HASHING, "--watch-interval", "0", env=env)
    b_proc, b = start_server(tmp_path / "b", tmp_path / "ba", "--base", HASHING, "--watch-interval", "0", env=env)
    try:
        corpus = {d["id"]: d["text"] for d in docs(60)}
        dataset = {"queries": {f"q{i}": f"what about {corpus[f'd{i}']}" for i in range(0, 60, 3)},
                   "corpus": corpus, "relevant_docs": {f"q{i}": [f"d{i}"] for i in range(0, 60, 3)}}
        assert httpx.put(f"{a}/collections/c", json={}).status_code == 201
        # two bulk upserts first (A runs its jobs one at a time), so that the others are still queued when A dies
        bulks = [httpx.post(f"{a}/collections/c/documents", json={"documents": docs(10_000, f"bulk{i}-")}, timeout=60) for i in range(2)]
        evaluation = httpx.post(f"{a}/eval", json={"dataset": dataset, "background": True})
        reindex = httpx.post(f"{a}/collections/old/reindex")
        assert [r.status_code for r in (*bulks, evaluation, reindex)] == [202] * 4
        jobs = {kind: r.json()["job"]["id"] for kind, r in (("upsert", bulks[0]), ("upsert2", bulks[1]), ("eval", evaluation), ("reindex", reindex))}
        wait_for(lambda: httpx.get(f"{b}/jobs/{jobs['upsert']}").json()["done"] > 0, timeout=30)
        time.sleep(3)  # past the lease: a live replica's queued jobs stay its own (its heartbeat covers them)
        with psycopg.connect(url) as conn:
            owners = dict(conn.execute("SELECT id, owner FROM embedlift.jobs").fetchall())
        assert len({owners[j] for j in jobs.values()}) == 1
        assert httpx.get(f"{b}/jobs/{jobs['eval']}").json()["status"] == "queued"  # behind the bulk upserts
        os.kill(a_proc.pid, signal.SIGKILL)
        a_proc.wait()
        assert httpx.get(f"{b}/jobs/{jobs['eval']}").json()["status"] in ("queued", "running")  # not failed: it will be taken over
        assert httpx.get(f"{b}/collections/old").json()["status"] == "base_mismatch"  # not yet re-indexed
        for job in jobs.values():
            wait_for(lambda job=job: httpx.get(f"{b}/jobs/{job}").json()["status"] in ("succeeded", "failed"), timeout=90)
        finished = {kind: httpx.get(f"{b}/jobs/{job}").json() for kind, job in jobs.items()}
        assert {kind: j["status"] for kind, j in finished.items()} == dict.fromkeys(jobs, "succeeded"), finished
        here = httpx.post(f"{b}/eval", json={"dataset": dataset}).json()
        assert finished["eval"]["result"]["metrics"] == here["metrics"] and here["queries"] == 20
        result = finished["reindex"]["result"]
        assert result["documents"] == 40 and result["base"] != result["previous_base"]
        info = httpx.get(f"{b}/collections/old").json()
        assert (info["status"], info["documents"], info["base_fingerprint"]) == ("ready", 40, result["base"])
        hits = httpx.post(f"{b}/collections/old/search", json={"query": "driver pay", "k": 3}).json()["hits"]
        assert len(hits) == 3
        assert httpx.get(f"{b}/collections/c").json()["documents"] == 20_000
    finally:
        if a_proc.poll() is None:
            a_proc.kill()
        stop_server(b_proc)


def test_an_apply_to_both_adapters_view_is_a_table_built_by_one_job_and_dropped_with_the_adapter(postgres, hashing, tmp_path):
    """Registering an ``apply_to: both`` adapter on replicas sharing a collection of 6,000 windows: one replica
    builds its document view into the database as a job (searches through it answer 503 naming the job until
    then), every replica searches that one table, writes through any replica reach it, and deleting the adapter
    drops it."""
    import psycopg

    from tests.helpers import make_adapter

    url = postgres.create_database(f"v_{uuid.uuid4().hex[:10]}")
    env = {"EMBEDLIFT_STORE": url}
    servers = [start_server(tmp_path / f"d{i}", tmp_path / f"a{i}", "--base", HASHING, "--watch-interval", "0", env=env) for i in range(2)]
    (_, a), (_, b) = servers

    def rows(sql):
        with psycopg.connect(url) as conn:
            return conn.execute(sql).fetchall()

    try:
        assert httpx.put(f"{a}/collections/c", json={}).status_code == 201
        bulk = httpx.post(f"{a}/collections/c/documents", json={"documents": docs(6000)}, timeout=60).json()["job"]["id"]
        wait_for(lambda: httpx.get(f"{a}/jobs/{bulk}").json()["status"] == "succeeded", timeout=120)
        upload = tar_of(make_adapter(hashing, tmp_path / "upload" / "both", apply_to="both"))
        assert httpx.post(f"{a}/adapters", content=upload, headers={"Content-Type": "application/x-tar"}, params={"name": "both"}).status_code == 201
        search = {"query": "driver pay in region 2", "k": 5, "adapter": "both", "mode": "dense"}
        first = httpx.post(f"{b}/collections/c/search", json=search)
        if first.status_code == 503:  # still building: says so, and where to look
            assert first.headers["Retry-After"] and "GET /jobs/" in first.json()["detail"]
        for u in (a, b):
            wait_for(lambda u=u: httpx.post(f"{u}/collections/c/search", json=search).status_code == 200, timeout=60)
        [(view, ready, job)] = rows("SELECT id, ready, job FROM embedlift.views")
        assert ready and job
        for u in (a, b):  # one job built it, and every replica reports on it
            done = httpx.get(f"{u}/jobs/{job}").json()
            assert (done["kind"], done["status"], done["result"]["windows"], done["result"]["adapter"]) == ("view", "succeeded", 6000, "both@1")
        table = f"embedlift.c1_v{view}"
        assert rows(f"SELECT count(*) FROM {table}") == [(6000,)]
        hits = [httpx.post(f"{u}/collections/c/search", json=search).json()["hits"] for u in (a, b)]
        assert len(hits[0]) == 5 and hits[0] == hits[1]
        # a write through either replica reaches the view before it is acknowledged
        assert httpx.post(f"{b}/collections/c/documents", json={"documents": docs(1, "fresh")}).status_code == 200
        assert rows(f"SELECT count(*) FROM {table}") == [(6001,)]
        assert httpx.post(f"{a}/collections/c/documents/delete", json={"ids": ["fresh0", "d1"]}).json()["deleted"] == 2
        assert rows(f"SELECT count(*) FROM {table} WHERE seq IN (SELECT seq FROM embedlift.c1_docs)") == [(5999,)]
        assert rows(f"SELECT count(*) FROM {table}") == [(5999,)]
        assert httpx.delete(f"{b}/adapters/both").status_code == 204
        assert rows("SELECT count(*) FROM embedlift.views") == [(0,)] and rows(f"SELECT to_regclass('{table}')") == [(None,)]
    finally:
        for proc, _ in servers:
            stop_server(proc)


@pytest.mark.parametrize("store", ["embedded", "postgres"])
def test_u0000_is_refused_in_documents_and_answered_exactly_everywhere_else(store, request, tmp_path):
    """U+0000: PostgreSQL's text and JSONB cannot hold it and SQLite's JSON functions cut strings at it, so both
    stores are refused it in a document (id, text or metadata) with a 400 before any work, in a request and in a
    background upsert alike (benchmarks/fuzz.py found a 500 there, and on every read below). Elsewhere it is
    answered exactly: a read by an id with it finds nothing, a filter naming it matches as over the stored data
    (no stored key or string holds it), and an evaluation of texts with it runs as a background job whose input and
    result the store keeps."""
    env = {"EMBEDLIFT_SYNC_UPSERT_DOCUMENTS": "2", "EMBEDLIFT_SYNC_EVAL_TEXTS": "2"}
    if store == "postgres":
        env |= {"EMBEDLIFT_STORE": request.getfixturevalue("postgres").create_database(f"n_{uuid.uuid4().hex[:10]}"), "EMBEDLIFT_CACHE_STORE": "store"}
    proc, base = start_server(tmp_path / "data", tmp_path / "adapters", "--base", HASHING, "--watch-interval", "0", env=env)
    try:
        c = httpx.Client(base_url=base, timeout=60)
        c.put("/collections/kb").raise_for_status()
        bad = [{"id": "a\x00", "text": "fine"}, {"id": "b", "text": "a\x00b"}, {"id": "c", "text": "t", "metadata": {"k": ["x", {"y": "\x00"}]}},
               {"id": "d", "text": "t", "metadata": {"k\x00": 1}}]
        for doc, part in zip(bad, ["id", "text", "metadata", "metadata"], strict=True):
            for documents in ([doc], docs(3) + [doc]):  # in a request, and past sync_upsert_documents (a job)
                r = c.post("/collections/kb/documents", json={"documents": documents})
                assert r.status_code == 400 and "U+0000" in r.json()["detail"] and r.json()["field"].endswith(part), r.text
        assert c.get("/collections/kb").json()["documents"] == 0  # nothing of a refused upsert was stored
        stored = docs(8)
        stored[0]["metadata"]["path"] = "C:\\u0000dir"  # a backslash, then "u0000": six characters, not U+0000
        r = c.post("/collections/kb/documents", json={"documents": stored})
        job = r.json()["job"]["id"]
        wait_for(lambda: c.get(f"/jobs/{job}").json()["status"] == "succeeded", timeout=60)
        assert c.get("/collections/kb/documents/d0").json()["metadata"]["path"] == "C:\\u0000dir"
        assert c.get("/collections/kb/documents/d0%00").status_code == 404
        assert c.get("/jobs/job%00").status_code == 404
        assert c.post("/collections/kb/documents/delete", json={"ids": ["d1\x00", "d1"]}).json() == {"deleted": 1, "missing": ["d1\x00"]}
        topics = {d["id"]: d["metadata"]["topic"] for d in stored if d["id"] != "d1"}
        for where, expected in [
            ({"topic": "driver pay\x00"}, set()),
            ({"topic": {"$ne": "driver pay\x00"}}, set(topics)),
            ({"topic": {"$in": ["x\x00", "driver pay"]}}, {d for d, t in topics.items() if t == "driver pay"}),
            ({"topic": {"$nin": ["x\x00", "driver pay"]}}, {d for d, t in topics.items() if t != "driver pay"}),
            ({"top\x00ic": None}, set(topics)),  # null matches an absent key
            ({"top\x00ic": {"$exists": True}}, set()),
            ({"$or": [{"top\x00ic": 1}, {"topic": "scooter fleet"}]}, {d for d, t in topics.items() if t == "scooter fleet"}),
        ]:
            for mode in ("dense", "lexical", "hybrid"):
                r = c.post("/collections/kb/search", json={"query": "note region\x00", "k": 20, "mode": mode, "filter": where})
                assert r.status_code == 200 and {h["id"] for h in r.json()["hits"]} == expected, (where, mode, r.text)
        dataset = {"queries": {"q\x001": "driver\x00 pay", "q2": "scooter fleet"}, "corpus": {"d\x001": "Driver pay rose.", "d2": "The scooter fleet grew."},
                   "relevant_docs": {"q\x001": ["d\x001"], "q2": ["d2"]}}
        r = c.post("/eval", json={"dataset": dataset, "per_query": True})
        assert r.status_code == 202, r.text
        job = r.json()["job"]["id"]
        wait_for(lambda: c.get(f"/jobs/{job}").json()["status"] == "succeeded", timeout=60)
        result = c.get(f"/jobs/{job}").json()["result"]
        assert result["queries"] == 2 and set(result["ranks"]["base"]) == {"q\x001", "q2"}
    finally:
        assert stop_server(proc) == 0


def test_a_store_at_schema_5_migrates_its_jobs_and_resumes_them(postgres):
    """Schema 6 keeps a job's input and result as JSON text (JSONB cannot hold U+0000): a store migrated from 5
    keeps the jobs it had, readable and resumable."""
    import psycopg
    from embedlift.service.database import MIGRATIONS, SCHEMA, Database
    from embedlift.service.shared_jobs import DatabaseJobStore

    url = postgres.create_database(f"m_{uuid.uuid4().hex[:10]}")
    with psycopg.connect(url, autocommit=True) as conn:  # as embedlift with schema 5 left it
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"CREATE TABLE {SCHEMA}.schema_version (version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())")
        for version, step in enumerate(MIGRATIONS[:5], start=1):
            conn.execute(step)
            conn.execute(f"INSERT INTO {SCHEMA}.schema_version (version) VALUES (%s)", (version,))
        conn.execute(f"INSERT INTO {SCHEMA}.jobs (id, kind, status, done, total, result, spec, owner, heartbeat) VALUES "
                     "('old-done', 'eval', 'succeeded', 2, 2, '{\"queries\": 2}'::jsonb, NULL, 'gone', now()), "
                     "('old-open', 'upsert', 'running', 0, 1, NULL, '{\"collection\": \"kb\", \"documents\": []}'::jsonb, 'gone', now() - interval '1 hour')")
    db = Database(url).open()
    try:
        assert db.migrate() == len(MIGRATIONS) == 6
        jobs = DatabaseJobStore(db, lease=30)
        assert jobs.get("old-done").result == {"queries": 2}
        claimed = jobs.claim()
        assert claimed is not None and claimed.id == "old-open" and claimed.spec == {"collection": "kb", "documents": []}
        jobs.close()
    finally:
        db.close()


def test_a_statement_past_the_databases_limits_is_413_not_unavailable(postgres):
    """PostgreSQL's "program limit exceeded" errors (an index row too large, too many arguments) are psycopg
    OperationalErrors like a lost connection, but retrying cannot help: 413 naming the limit, not 503."""
    from embedlift.models.errors import TooLargeError
    from embedlift.service.database import Database

    db = Database(postgres.create_database(f"l_{uuid.uuid4().hex[:10]}")).open()
    try:
        with pytest.raises(TooLargeError, match=r"beyond its limits \(index row") as err:
            with db.transaction() as conn:
                conn.execute("CREATE TEMP TABLE t (x text PRIMARY KEY)")
                conn.execute("INSERT INTO t SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i")  # 12,800 hex digits
        assert err.value.status_code == 413
        with db.transaction() as conn:  # the connection went back to the pool in working order
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        db.close()
