"""schemathesis against the app's own OpenAPI spec (what `/schema/openapi.json` serves), driving a real
`embedlift serve` on loopback (on the model-free base: the HTTP layer is what is tested), once on its data
directory and once on a PostgreSQL database: every operation, seeded and bounded.

Every response must be a documented status with the documented content type and schema, never a 5xx; inputs
the spec allows must be accepted and inputs it forbids refused. `benchmarks/fuzz.py` runs the same checks
longer (more examples, a random seed).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest
import schemathesis
from embedlift.service.cli import spec_bytes
from embedlift.service.collections.postgres import PGVECTOR_EF_CONSTRUCTION, PGVECTOR_M, PGVECTOR_MAX_EF_SEARCH
from hypothesis import HealthCheck, seed, settings
from schemathesis.checks import (
    allow_header_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    unsupported_method,
)

from tests.conftest import STORES
from tests.helpers import HASHING, make_adapter, start_server, stop_server

READ_KEY, ADMIN_KEY = "fuzz-read", "fuzz-admin"
EXAMPLES = int(os.environ.get("EMBEDLIFT_FUZZ_EXAMPLES", "25"))
DIM = int(HASHING.split(":")[1])  # the served base's dimension
SEED = int(os.environ["EMBEDLIFT_FUZZ_SEED"]) if os.environ.get("EMBEDLIFT_FUZZ_SEED") else None  # None: derandomized
EXCLUDED = [
    # Litestar answers OPTIONS on every path (RFC 9110; CORS preflights): not an API operation. Its `Allow`
    # lists the methods of one route handler of the path (PUT, not GET/DELETE beside it on /collections/{name}).
    unsupported_method,
    allow_header_conformance,
    # Litestar converts bodies the lax way (msgspec strict=False): 0/1 for a boolean, "10" for an integer.
    # Every other invalid input must still get a documented 4xx, which the response checks hold it to.
    negative_data_rejection,
]
# /eval's dataset must be consistent (relevant ids that exist in the corpus, and so on): a rule JSON Schema
# cannot state, so a spec-valid but inconsistent dataset is a documented 400 there.
REFERENTIAL = {("POST", "/eval")}
# The fuzz server runs the model-free hashing base, which has no tokenizer to show: /tei/tokenize answers it
# with a 400 saying so (tests/test_tei.py tokenizes on the real model).
REFERENTIAL |= {("POST", "/tei/tokenize"), ("POST", "/tei/query/tokenize")}


FIXTURE_ADAPTER = "fuzz-linear"


@pytest.fixture(scope="module", params=STORES)
def fuzz_home(request, hashing, tmp_path_factory):
    """The adapters directory (with the fixture's adapter) and the address of a server on each store: its data
    directory, or a PostgreSQL database shared as replicas share it (collections, cache, jobs and registry)."""
    adapters = tmp_path_factory.mktemp("fuzz-adapters")
    make_adapter(hashing, adapters / FIXTURE_ADAPTER)
    env = {"EMBEDLIFT_MAX_INPUTS": "16", "EMBEDLIFT_MAX_DOCUMENTS": "16"}
    if request.param == "postgres":
        pg = request.getfixturevalue("postgres")
        env |= {"EMBEDLIFT_STORE": pg.create_database(f"fuzz_{uuid.uuid4().hex[:10]}"), "EMBEDLIFT_CACHE_STORE": "store"}
    proc, url = start_server(
        tmp_path_factory.mktemp("fuzz-data"), adapters, "--base", HASHING, "--api-key", READ_KEY, "--admin-key", ADMIN_KEY,
        "--watch-interval", "0", env=env,
    )
    yield adapters, url, request.param
    assert stop_server(proc) == 0


def reset(url: str, adapters: Path, hashing) -> None:
    """The server back to how it started, through its API: no collections, the fixture's adapter registered and
    active. The stateful test starts every scenario here, so a scenario replayed while hypothesis shrinks meets the
    same server (a collection left by an earlier one turns a 201 into a 200 and changes what can follow)."""
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    with admin:
        for c in admin.get("/collections").raise_for_status().json()["collections"]:
            admin.delete(f"/collections/{c['name']}").raise_for_status()
        listed = admin.get("/adapters").raise_for_status().json()["adapters"]
        if FIXTURE_ADAPTER not in {a["name"] for a in listed}:  # a scenario deleted it (and its directory)
            make_adapter(hashing, adapters / FIXTURE_ADAPTER)
            admin.post("/adapters", json={"name": FIXTURE_ADAPTER}).raise_for_status()
        admin.post(f"/adapters/{FIXTURE_ADAPTER}/activate").raise_for_status()
        for a in listed:
            if a["name"] != FIXTURE_ADAPTER:
                admin.delete(f"/adapters/{a['name']}").raise_for_status()


# A spec-valid request may still meet a limit the server is configured with (413: inputs per request, k) or
# an overload (429): documented refusals, not a spec that promises too much.
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409", "413", "429"]}}}
)
schema = schemathesis.openapi.from_dict(json.loads(spec_bytes()), config=CONFIG)


def without_nul(value):
    """``value`` with U+0000 taken out of every key and string (no collection stores it: ``filters.nul_in``)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    return value


def fixed_case(case, store: str) -> None:
    """Server rules JSON Schema cannot state, applied to the generated request instead of excluding the
    operations: OpenAI's and TEI's ``dimensions`` must be the model's own, ids are unique within one upsert, a
    document's metadata holds no U+0000 anywhere (its id and text say so in the spec), and on PostgreSQL a
    collection's HNSW settings are within pgvector's bounds (the spec is one for both stores)."""
    body = case.body if isinstance(case.body, dict) else {}
    if store == "postgres" and case.method.upper() == "PUT" and case.operation.path == "/collections/{name}":
        def number(key: str) -> bool:  # an integer, or a float the server converts (28.0)
            return isinstance(body.get(key), int | float) and not isinstance(body.get(key), bool)

        if number("hnsw_m"):
            body["hnsw_m"] = min(body["hnsw_m"], PGVECTOR_M[1])  # 2 x 100 is the default ef_construction
        m = body["hnsw_m"] if number("hnsw_m") else 32
        if number("ef_construction"):
            body["ef_construction"] = min(max(body["ef_construction"], 2 * m), PGVECTOR_EF_CONSTRUCTION[1])
        if number("ef_search"):
            body["ef_search"] = min(body["ef_search"], PGVECTOR_MAX_EF_SEARCH)
    if (case.operation.path == "/v1/embeddings" or case.operation.path.startswith("/tei")) and body.get("dimensions") is not None:
        body["dimensions"] = DIM
    if case.operation.path.endswith("/documents") and isinstance(body.get("documents"), list):
        for i, doc in enumerate(body["documents"]):
            if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                doc["id"] = f"{i}-{doc['id']}"[:512]
            if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
                doc["metadata"] = without_nul(doc["metadata"])


def excluded_for(case) -> list:
    return EXCLUDED + ([positive_data_acceptance] if (case.method.upper(), case.operation.path) in REFERENTIAL else [])


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, suppress_health_check=list(HealthCheck))
@seed(SEED or 0)
def test_every_operation_answers_as_its_spec_says(case, fuzz_home):
    _, fuzz_server, store = fuzz_home
    fixed_case(case, store)
    case.call_and_validate(
        base_url=fuzz_server, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, excluded_checks=excluded_for(case), timeout=60
    )


def test_sequences_of_calls_follow_the_spec(fuzz_home, hashing):
    """Stateful: schemathesis chains operations over the links it infers from the spec (a created collection
    is then upserted into, searched, read and deleted; a registered adapter activated or deleted), holding
    every response in each sequence to the same checks. Each sequence starts from the server as it started."""
    adapters, fuzz_server, store = fuzz_home
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    calls: list[str] = []

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self):
            reset(fuzz_server, adapters, hashing)

        def get_call_kwargs(self, case):
            fixed_case(case, store)
            calls.append(f"{case.method} {case.operation.path}")
            return {"base_url": fuzz_server, "headers": headers, "timeout": 60}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, excluded_checks=excluded_for(case), headers=headers)

    Workflow.run(settings=settings(max_examples=max(5, EXAMPLES // 2), stateful_step_count=6, deadline=None,
                                   derandomize=SEED is None, suppress_health_check=list(HealthCheck)))
    assert len(calls) >= 20 and len(set(calls)) >= 8, calls  # sequences ran, across many operations
