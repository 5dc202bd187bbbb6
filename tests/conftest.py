"""Shared fixtures: the real packaged MiniLM loaded once per session, real files under tmp_path.

As in sentence-transformers' own tests, the model is loaded once and shared; tests that need isolation get
their own cache file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests that compare vectors exactly (batch == single, the server's == the library's) pin fp32: bf16 results
# depend on padding. Subprocess servers and CLI runs inherit this; tests/test_precision.py tests the others.
os.environ.setdefault("EMBEDLIFT_PRECISION", "fp32")
os.environ.setdefault("EMBEDLIFT_RUNTIME", "torch")  # likewise: OpenVINO's fp32 is within 1e-7 of torch's, not equal

REPO = Path(__file__).resolve().parents[1]
LYFT = Path(os.environ.get("EMBEDLIFT_LYFT_DATA", REPO.parent / "shared" / "data" / "lyft_2021_10k" / "train_dataset.json"))


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 as a LocalEncoder (no cache), in fp32."""
    from embedlift.models.encoders import LocalEncoder

    return LocalEncoder(precision="fp32", runtime="torch")


@pytest.fixture(scope="session")
def hashing():
    """The model-free base (``hashing:64``): a real, deterministic encoder for tests where the model is not the
    subject (stores, indexes, registry, auth, limits, the HTTP layer)."""
    from embedlift.models.spec import BaseSpec, load_base

    from tests.helpers import HASHING

    return load_base(BaseSpec(model=HASHING))


@pytest.fixture(scope="session")
def lyft() -> dict:
    if not LYFT.is_file():
        pytest.skip(f"the Lyft dataset is not at {LYFT} (set EMBEDLIFT_LYFT_DATA)")
    return json.loads(LYFT.read_text())


@pytest.fixture(scope="session")
def lyft_slice(lyft, tmp_path_factory) -> Path:
    """The first 30 documents of the Lyft data with both of their questions, as a dataset file."""
    docs = list(lyft["corpus"])[:30]
    keep = set(docs)
    queries = {q: t for q, t in lyft["queries"].items() if lyft["relevant_docs"][q][0] in keep}
    data = {
        "queries": queries,
        "corpus": {d: lyft["corpus"][d] for d in docs},
        "relevant_docs": {q: lyft["relevant_docs"][q] for q in queries},
    }
    path = tmp_path_factory.mktemp("data") / "lyft_slice.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One base-embedding cache file for the session, so each text is embedded once across tests."""
    return tmp_path_factory.mktemp("cache") / "base.sqlite3"


@pytest.fixture(scope="session")
def remote(tmp_path_factory):
    """A remote base for `--base openai:base`: embedlift serving the packaged MiniLM with no adapter on a
    loopback port (a real server speaking the OpenAI embeddings protocol, the real model behind it)."""
    from tests.helpers import start_server, stop_server

    root = tmp_path_factory.mktemp("remote")
    proc, url = start_server(root / "data", root / "adapters", "--watch-interval", "0")
    yield url
    assert stop_server(proc) == 0


# ----------------------------------------------------------------------------------- collection stores
#: The collection-store contract suite runs on each of these (tests that take ``homes`` are parametrized).
STORES = ["embedded", "postgres"]


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 18 with pgvector on 127.0.0.1 for the session (``tests/pgserver.py``)."""
    from tests.pgserver import LocalPostgres

    pg = LocalPostgres().start()
    yield pg
    pg.close()


class Homes:
    """Collection managers over one home of a kind (a directory, or a fresh PostgreSQL database); each call is
    a new process's view of the same home (what a restart, or another replica, sees)."""

    def __init__(self, kind: str, path: Path, pg=None) -> None:
        import uuid

        self.kind, self.path, self._dbs = kind, path, []
        self.url = pg.create_database(f"t_{uuid.uuid4().hex[:12]}") if kind == "postgres" else None

    def home(self):
        if self.kind == "embedded":
            return self.path
        from embedlift.service.collections.postgres import PostgresHome
        from embedlift.service.database import Database

        db = Database(self.url).open()
        self._dbs.append(db)
        return PostgresHome(db)

    def __call__(self, fingerprint: str, dim: int, spec=None):
        from embedlift.service.collections import CollectionManager

        manager = CollectionManager(self.home(), fingerprint, dim, spec)
        manager.load_all()
        return manager

    def close(self) -> None:
        for db in self._dbs:
            db.close()


def _homes(request, path: Path) -> Homes:
    return Homes(request.param, path, request.getfixturevalue("postgres") if request.param == "postgres" else None)


@pytest.fixture(params=STORES)
def homes(request, tmp_path):
    """``homes(fingerprint, dim, spec)``: a loaded ``CollectionManager`` over this test's store, once per kind."""
    h = _homes(request, tmp_path)
    yield h
    h.close()


@pytest.fixture(params=STORES, scope="module")
def module_homes(request, tmp_path_factory):
    h = _homes(request, tmp_path_factory.mktemp("homes"))
    yield h
    h.close()
