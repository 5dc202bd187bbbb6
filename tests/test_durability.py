"""Crashes lose nothing: `embedlift serve` killed with SIGKILL at random moments while a writer upserts and
adapters are registered and activated; after each restart every acknowledged write is there, whole.
Damaged files on disk are found at start, named, and the service recovers from the source of truth.

``EMBEDLIFT_CRASH_ROUNDS`` sets how many kills (default 5; the README's figure comes from a longer run).
"""

from __future__ import annotations

import io
import logging
import os
import random
import signal
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import app_client, make_adapter, start_server

ADMIN_KEY = "crash-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROUNDS = int(os.environ.get("EMBEDLIFT_CRASH_ROUNDS", "5"))
LONG = " ".join(["Ride-sharing demand recovered unevenly across markets after the pandemic."] * 45)  # several windows
BATCH = 4


def tar_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=".")
    return buf.getvalue()


def document(round_: int, i: int, j: int) -> dict:
    key = f"r{round_}-{i}-{j}"
    text = LONG if j == 0 else f"Note {key}: quarterly rides in market {i * 7 + j} grew {j} percent."
    return {"id": key, "text": text, "metadata": {"key": key, "round": round_, "long": j == 0}}


class Load:
    """A writer (batches of documents) and an adapter registrar running against the server until it dies;
    what got a 2xx is recorded as acknowledged, what was in flight as maybe."""

    def __init__(self, url: str, round_: int, adapter_tar: bytes) -> None:
        self.url, self.round, self.tar = url, round_, adapter_tar
        self.acked: dict[str, dict] = {}
        self.in_flight: list[dict] = []
        self.registered: list[str] = []
        self.activated: list[str] = []
        self.maybe_active: str | None = None
        self.threads = [threading.Thread(target=self.write), threading.Thread(target=self.swap)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=30)

    def write(self) -> None:
        with httpx.Client(base_url=self.url, headers=ADMIN, timeout=30) as client:
            for i in range(100_000):
                batch = [document(self.round, i, j) for j in range(BATCH)]
                self.in_flight = batch
                try:
                    r = client.post("/collections/docs/documents", json={"documents": batch})
                except httpx.TransportError:
                    return
                assert r.status_code == 200, r.text
                self.acked.update({d["id"]: d for d in batch})
                self.in_flight = []

    def swap(self) -> None:
        with httpx.Client(base_url=self.url, headers=ADMIN, timeout=30) as client:
            for k in range(100_000):
                name = f"v{self.round}-{k}"
                try:
                    r = client.post("/adapters", content=self.tar, params={"name": name}, headers={"Content-Type": "application/x-tar"})
                    assert r.status_code == 201, r.text
                    self.registered.append(name)
                    self.maybe_active = name
                    r = client.post(f"/adapters/{name}/activate")
                    assert r.status_code == 200, r.text
                    self.activated.append(name)
                    time.sleep(0.1)
                except httpx.TransportError:
                    return


def check_recovered(url: str, load: Load, previously_active: str | None) -> None:
    with httpx.Client(base_url=url, headers=ADMIN, timeout=30) as client:
        # every acknowledged document, exactly as written, with all of its windows
        windows_of_long = None
        for key, doc in load.acked.items():
            r = client.get(f"/collections/docs/documents/{key}")
            assert r.status_code == 200, f"acknowledged {key} lost after SIGKILL"
            got = r.json()
            assert got["text"] == doc["text"] and got["metadata"] == doc["metadata"]
            if doc["metadata"]["long"]:
                windows_of_long = windows_of_long or got["windows"]
                assert got["windows"] == windows_of_long > 1
            else:
                assert got["windows"] == 1
        # the batch in flight at the kill: all of it or none of it
        seen = [client.get(f"/collections/docs/documents/{d['id']}").status_code == 200 for d in load.in_flight]
        assert all(seen) or not any(seen), f"half of a batch is visible: {seen}"
        # searchable: the FAISS index was rebuilt from the store on start
        sample = random.Random(0).sample(sorted(load.acked), min(12, len(load.acked)))
        for key in sample:
            doc = load.acked[key]
            for mode in ("dense", "lexical"):  # both indexes were rebuilt from the store, the lexical one from its postings
                body = client.post("/collections/docs/search", json={"query": doc["text"], "k": 1, "filter": {"key": key}, "mode": mode}).json()
                assert [h["id"] for h in body["hits"]] == [key] and body["mode_used"] == mode, body
        # the batch in flight is all or nothing in the lexical index too
        found = [bool(client.post("/collections/docs/search", json={"query": d["text"], "k": 1, "filter": {"key": d["id"]}, "mode": "lexical"}).json()["hits"])
                 for d in load.in_flight]
        assert all(found) or not any(found), f"half of a batch is in the lexical index: {found}"
        # the registry: every acknowledged registration, an active adapter that was acknowledged or in flight
        listing = client.get("/adapters").json()
        names = {a["name"] for a in listing["adapters"]}
        assert set(load.registered) <= names
        candidates = {f"{n}@1" for n in [*load.activated[-1:], load.maybe_active] if n} | ({previously_active} if not load.activated else set())
        assert listing["active"] in candidates, (listing["active"], candidates)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_write(minilm, tmp_path):
    data, adapters = tmp_path / "data", tmp_path / "adapters"
    adapter_tar = tar_of(make_adapter(minilm, tmp_path / "src" / "a"))
    rng = random.Random(7)
    active = None
    totals = {"documents": 0, "registrations": 0}
    for round_ in range(ROUNDS):
        proc, url = start_server(data, adapters, "--watch-interval", "0", env={"EMBEDLIFT_ADMIN_KEY": ADMIN_KEY})
        if round_ == 0:
            assert httpx.put(f"{url}/collections/docs", headers=ADMIN).status_code == 201
        load = Load(url, round_, adapter_tar)
        load.start()
        time.sleep(rng.uniform(1.0, 4.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        load.join()
        proc, url = start_server(data, adapters, "--watch-interval", "0", env={"EMBEDLIFT_ADMIN_KEY": ADMIN_KEY})
        try:
            check_recovered(url, load, active)
            active = httpx.get(f"{url}/adapters").json()["active"]
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        totals["documents"] += len(load.acked)
        totals["registrations"] += len(load.registered)
        # no half-written checkpoint is left where the registry would read it
        assert all((p / "config.json").is_file() and (p / "model.safetensors").is_file() for p in adapters.iterdir() if not p.name.startswith("."))
    assert totals["documents"] > 0 and totals["registrations"] > 0
    print(f"\n{ROUNDS} SIGKILLs: {totals['documents']} acknowledged documents and {totals['registrations']} registrations, all recovered")


def damage(path: Path, offset: int = 4096) -> None:
    """Overwrite everything past ``offset`` with noise, as a bad disk or a stray write would."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(1).randbytes(max(size - offset, 4096)))


@pytest.mark.parametrize("what", ["collection store", "active checkpoint", "registry state", "embedding cache"])
def test_damaged_files_are_named_at_start_and_the_rest_recovers(hashing, tmp_path, what, caplog):
    """The app started (in process, on the model-free base) over a data directory with one damaged file: the
    damage is named at start, what it concerns is set aside or refused, and everything else serves."""
    data, adapters = tmp_path / "data", tmp_path / "adapters"
    make_adapter(hashing, adapters / "good")
    make_adapter(hashing, adapters / "other", seed=2)
    with app_client(data, adapters, adapter="good", admin_key=ADMIN_KEY, headers=ADMIN) as client:
        for name in ("hurt", "fine"):
            client.put(f"/collections/{name}")
            docs = [{"id": f"{name}-{i}", "text": f"{name} passage number {i} about rides and drivers"} for i in range(50)]
            assert client.post(f"/collections/{name}/documents", json={"documents": docs}).status_code == 200
    target = {
        "collection store": data / "collections" / "hurt" / "collection.sqlite3",
        "active checkpoint": adapters / "good" / "model.safetensors",
        "registry state": data / "registry.json",
        "embedding cache": data / "base-embeddings.sqlite3",
    }[what]
    damage(target, offset=4096 if target.suffix == ".sqlite3" else 8)

    with caplog.at_level(logging.WARNING), app_client(data, adapters, admin_key=ADMIN_KEY) as client:
        fine = client.post("/collections/fine/search", json={"query": "rides", "k": 3})
        assert fine.status_code == 200 and len(fine.json()["hits"]) == 3  # the rest serves
        listing = client.get("/adapters").json()
        if what == "collection store":
            info = client.get("/collections/hurt").json()
            assert info["status"] == "damaged" and str(target) in info["problem"]
            r = client.post("/collections/hurt/search", json={"query": "rides"})
            assert r.status_code == 503 and str(target) in r.json()["detail"]
            assert client.delete("/collections/hurt", headers=ADMIN).status_code == 204  # and it can be removed
        elif what == "active checkpoint":
            assert [a["name"] for a in listing["adapters"]] == ["other"] and listing["active"] is None
        elif what == "registry state":
            assert {a["name"] for a in listing["adapters"]} == {"good", "other"}
            assert (data / "registry.json.damaged").is_file()
        else:
            assert list(data.glob("base-embeddings.sqlite3.damaged-*"))
    assert str(target) in caplog.text  # the log names the file
