"""The playground page in a real browser: Debian's chromium driven by Playwright (headless, pointed at the
installed binary; nothing downloaded), against a real `embedlift serve` on 127.0.0.1 with API keys on.

Skipped when /usr/bin/chromium is missing, unless ``EMBEDLIFT_UI_TEST=1`` (CI installs chromium and sets it).
``EMBEDLIFT_UI_SCREENSHOTS=DIR`` keeps the screenshots (the README's come from `docs/screenshots`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import LYFT
from tests.helpers import make_adapter, start_server, stop_server

CHROMIUM = os.environ.get("EMBEDLIFT_CHROMIUM", "/usr/bin/chromium")
READ_KEY, ADMIN_KEY = "ui-read", "ui-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SHOTS: list[Path] = []  # where this run's screenshots go
# What a headless chromium needs on a machine with no network beyond loopback (and as root, no sandbox).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).exists() and os.environ.get("EMBEDLIFT_UI_TEST") != "1":
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; EMBEDLIFT_UI_TEST=1 makes this a failure)", allow_module_level=True)

pytestmark = pytest.mark.slow  # a real server and chromium


def small_dataset(path: Path) -> Path:
    """Without the Lyft data beside the repository: 20 short passages, two questions each."""
    topics = ["revenue", "drivers", "riders", "insurance", "bikes", "scooters", "autonomous vehicles", "safety",
              "regulation", "competition", "pricing", "advertising", "rentals", "airports", "payments",
              "data privacy", "climate", "taxes", "employees", "litigation"]
    corpus = {f"d{i}": f"This section of the annual report discusses {t} and how {t} affected results this year." for i, t in enumerate(topics)}
    queries = {f"q{i}-{j}": q for i, t in enumerate(topics) for j, q in enumerate([f"What does the report say about {t}?", f"How did {t} affect results?"])}
    relevant = {q: [f"d{q.split('-')[0][1:]}"] for q in queries}
    path.write_text(json.dumps({"queries": queries, "corpus": corpus, "relevant_docs": relevant}))
    return path


@pytest.fixture(scope="module")
def site(minilm, request, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    lyft_slice = request.getfixturevalue("lyft_slice") if LYFT.is_file() else small_dataset(root / "small.json")
    make_adapter(minilm, root / "adapters" / "alpha", seed=1)
    make_adapter(minilm, root / "adapters" / "beta", seed=2)
    (root / "data" / "datasets").mkdir(parents=True)
    shutil.copy(lyft_slice, root / "data" / "datasets" / "eval-set.json")  # a stored dataset for /eval
    proc, url = start_server(root / "data", root / "adapters", "--adapter", "alpha", "--watch-interval", "0",
                             env={"EMBEDLIFT_API_KEY": READ_KEY, "EMBEDLIFT_ADMIN_KEY": ADMIN_KEY})
    data = json.loads(lyft_slice.read_text())
    httpx.put(f"{url}/collections/lyft", headers=ADMIN).raise_for_status()
    docs = [{"id": d, "text": t} for d, t in data["corpus"].items()]
    httpx.post(f"{url}/collections/lyft/documents", json={"documents": docs}, headers=ADMIN, timeout=120).raise_for_status()
    yield {"url": url, "dataset": lyft_slice, "question": next(iter(data["queries"].values()))}
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(site, browser, tmp_path_factory):
    """One tab through the three views, keys typed into the page as a user does."""
    shots = Path(os.environ.get("EMBEDLIFT_UI_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    shots.mkdir(parents=True, exist_ok=True)
    SHOTS.append(shots)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(site["url"] + "/")
    page.click("#keys summary")
    for field, key in (("#read-key", READ_KEY), ("#admin-key", ADMIN_KEY)):
        page.fill(field, key)
        page.dispatch_event(field, "change")
    yield page
    page.close()
    assert errors == [], errors


def test_search_shows_base_and_adapters_side_by_side(page, site):
    assert page.url.endswith("/ui/")
    page.wait_for_selector("#collection option[value=lyft]", state="attached")
    page.fill("#query", site["question"])
    page.select_option("#compare-b", "beta")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#columns .column:nth-child(3) .hit")
    labels = page.locator("#columns .column h2").all_inner_texts()
    assert labels == ["base · hybrid", "active (alpha@1) · hybrid", "beta@1 · hybrid"]  # hybrid: the collection's default
    for i in (1, 2, 3):
        assert page.locator(f"#columns .column:nth-child({i}) .hit").count() == 5
    # every adapter hit says how it moved against the base: an arrow, "=" or "new"
    changes = page.locator("#columns .column:nth-child(2) .rank-change").all_inner_texts()
    assert len(changes) == 5 and all(c == "=" or c == "new" or c[0] in "▲▼" for c in changes)
    page.screenshot(path=str(SHOTS[-1] / "search.png"), full_page=True)
    # the mode selector: dense only, then BM25 only
    for mode in ("dense", "lexical"):
        page.select_option("#mode", mode)
        page.click("#search-form button[type=submit]")
        page.wait_for_function(f"document.querySelector('#columns .column h2').textContent.endsWith('· {mode}')")
    page.select_option("#mode", "")


def test_eval_draws_hit_rate_curves_and_lists_fixed_and_broken_queries(page, site):
    page.click("button[data-view=eval]")
    page.set_input_files("#eval-file", str(site["dataset"]))
    page.select_option("#eval-adapters", ["alpha", "beta"])
    page.click("#eval-form button[type=submit]")
    page.wait_for_selector("#eval-table tr:nth-child(4)", timeout=120_000)
    rows = page.locator("#eval-table tr").all_inner_texts()
    assert rows[1].startswith("base") and "alpha@1" in rows[2] and "beta@1" in rows[3]
    # the chart has one line per model, ten points each (hit_rate@1..10), drawn by Chart.js
    lines = page.evaluate("() => Chart.getChart('hit-chart').data.datasets.map(d => [d.label, d.data.length])")
    assert lines == [["base", 10], ["alpha@1", 10], ["beta@1", 10]]
    assert page.locator("#changes .changes").count() == 2
    assert page.locator("#changes .changes h2").first.inner_text().startswith("alpha@1: fixed")
    # hybrid rows: BM25 alone and each model fused with it, drawn dashed beside the dense curves
    page.check("#eval-hybrid")
    page.click("#eval-form button[type=submit]")
    page.wait_for_selector("#eval-table tr:nth-child(8)", timeout=120_000)
    lines = page.evaluate("() => Chart.getChart('hit-chart').data.datasets.map(d => [d.label, d.borderDash.length > 0])")
    assert lines == [["base", False], ["alpha@1", False], ["beta@1", False], ["lexical", True], ["base+hybrid", True],
                     ["alpha@1+hybrid", True], ["beta@1+hybrid", True]]
    page.screenshot(path=str(SHOTS[-1] / "eval.png"), full_page=True)
    page.uncheck("#eval-hybrid")


def test_a_stored_dataset_evaluates_like_the_same_file_sent_inline(page, site):
    read = {"Authorization": f"Bearer {READ_KEY}"}
    listing = httpx.get(f"{site['url']}/datasets", headers=read).json()["datasets"]
    assert [d["name"] for d in listing] == ["eval-set"]
    inline = httpx.post(f"{site['url']}/eval", headers=read, timeout=120,
                        json={"dataset": json.loads(site["dataset"].read_text()), "adapters": ["beta"]}).json()
    stored = httpx.post(f"{site['url']}/eval", headers=read, timeout=120, json={"dataset_name": "eval-set", "adapters": ["beta"]}).json()
    assert stored["metrics"] == inline["metrics"]
    r = httpx.post(f"{site['url']}/eval", headers=read, json={"dataset_name": "missing"})
    assert r.status_code == 404 and "GET /datasets" in r.json()["detail"]
    assert httpx.post(f"{site['url']}/eval", headers=read, json={"dataset_name": "../registry"}).status_code == 400
    # and in the page: pick it instead of uploading
    page.click("button[data-view=eval]")
    page.set_input_files("#eval-file", [])
    page.select_option("#eval-stored", "eval-set")
    page.select_option("#eval-adapters", ["beta"])
    page.click("#eval-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#eval-table tr').length === 3", timeout=120_000)
    assert "beta@1" in page.locator("#eval-table tr").nth(2).inner_text()


def test_adapters_activate_and_swaps_from_elsewhere_show_without_reload(page, site):
    page.click("button[data-view=adapters]")
    page.wait_for_selector("#adapter-table tr[data-name=beta]")
    assert page.inner_text("#active-badge") == "active: alpha@1"
    page.click("#adapter-table tr[data-name=beta] button")
    page.wait_for_function("document.querySelector('#active-badge').textContent === 'active: beta@1'")
    assert httpx.get(f"{site['url']}/adapters", headers=ADMIN).json()["active"] == "beta@1"
    # a swap made with curl (here: httpx) appears in the page without a reload
    httpx.post(f"{site['url']}/adapters/rollback", headers=ADMIN).raise_for_status()
    page.wait_for_function("document.querySelector('#active-badge').textContent === 'active: alpha@1'", timeout=10_000)
    assert page.locator("#adapter-table tr.active").get_attribute("data-name") == "alpha"
    page.screenshot(path=str(SHOTS[-1] / "adapters.png"), full_page=True)


def test_without_keys_the_page_says_what_is_missing(site, browser):
    page = browser.new_page()  # a fresh context: no keys in its sessionStorage
    page.goto(site["url"] + "/ui/")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('401')")
    assert page.locator("#keys").get_attribute("open") is not None  # the key box opens by itself
    page.close()
