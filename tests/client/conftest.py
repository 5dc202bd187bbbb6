"""The client's tests run twice: here, in the development environment (this conftest starts a real server on
the real model), and in a virtual environment holding only ``embedlift-client`` and its extras, no torch
(``tests/test_client_light.py`` starts the server and points these tests at it through ``EMBEDLIFT_TEST_SERVER``).
So this directory imports nothing of the server, and only ``embedlift.client``, httpx, msgspec, pytest and the
integrations' frameworks at module level.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from embedlift.client import Client

ADMIN_KEY = "client-admin-key"
READ_KEY = "client-read-key"
#: Upserts past this many documents become background jobs on the test server (so `wait` is exercised).
SYNC_UPSERT = 8


@dataclass(frozen=True)
class Server:
    url: str
    adapters_dir: Path  # the server's adapters directory (a checkpoint copied in can be registered by name)
    spare: Path  # a checkpoint for the server's base, not registered

    def to_env(self) -> str:
        return json.dumps({"url": self.url, "adapters_dir": str(self.adapters_dir), "spare": str(self.spare)})


@pytest.fixture(scope="session")
def embedlift_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A real ``embedlift serve`` on loopback (MiniLM, the adapter ``tuned`` active, keys on): the one named by
    ``EMBEDLIFT_TEST_SERVER``, else one started here."""
    if given := os.environ.get("EMBEDLIFT_TEST_SERVER"):
        found = json.loads(given)
        yield Server(found["url"], Path(found["adapters_dir"]), Path(found["spare"]))
        return
    from tests.helpers import start_server, stop_server  # the development environment only

    server, proc = start_client_test_server(request.getfixturevalue("minilm"), tmp_path_factory.mktemp("client"), start_server)
    yield server
    assert stop_server(proc) == 0


def start_client_test_server(encoder, root: Path, start_server):
    """The server these tests expect (used here and by tests/test_client_light.py)."""
    from tests.helpers import make_adapter

    make_adapter(encoder, root / "adapters" / "tuned")
    make_adapter(encoder, root / "spare", seed=1)
    env = {"EMBEDLIFT_ADAPTER": "tuned", "EMBEDLIFT_API_KEY": READ_KEY, "EMBEDLIFT_ADMIN_KEY": ADMIN_KEY,
           "EMBEDLIFT_SYNC_UPSERT_DOCUMENTS": str(SYNC_UPSERT), "EMBEDLIFT_SYNC_EVAL_TEXTS": "8"}
    proc, url = start_server(root / "data", root / "adapters", "--watch-interval", "0", env=env)
    return Server(url, root / "adapters", root / "spare"), proc


@pytest.fixture
def client(embedlift_server: Server):
    with Client(embedlift_server.url, api_key=ADMIN_KEY) as c:
        yield c


#: A small filing-like corpus: one document longer than MiniLM's 256-token window (stored as several windows).
CORPUS = {
    "revenue": "Revenue was $3.2 billion in 2021, an increase of 36% compared to the prior year, as ridership recovered.",
    "drivers": "Drivers on the platform are classified as independent contractors, not employees, under current law.",
    "insurance": "Insurance reserves cover auto liability claims; the estimates depend on actuarial assumptions.",
    "bikes": "The bikes and scooters business operates docked bike-share systems in several metropolitan areas.",
    "covid": "The COVID-19 pandemic reduced rides sharply in 2020 and its effects continued into early 2021.",
    "regulation": "Regulatory changes such as California's Proposition 22 affect how drivers are classified and paid.",
    "long": " ".join(f"Paragraph {i}: the company's autonomous vehicle division was sold to Woven Planet." for i in range(60)),
}
METADATA = {"revenue": {"year": 2021, "topic": "finance"}, "covid": {"year": 2020, "topic": "risk"}}


@pytest.fixture
def docs() -> list[dict]:
    """``CORPUS`` as upsert documents, two with metadata."""
    return [{"id": k, "text": v, "metadata": METADATA.get(k, {})} for k, v in CORPUS.items()]


@pytest.fixture
def collection(client: Client, docs: list[dict], request: pytest.FixtureRequest):
    """A fresh collection (named after the test) holding ``docs``; deleted afterwards."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:100]
    client.create_collection(name)
    client.upsert(name, docs[:SYNC_UPSERT])
    yield name
    client.delete_collection(name)
