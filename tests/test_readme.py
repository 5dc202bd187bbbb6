"""The README's "Use it from ..." snippets, run as they stand (only the address changed) against a real server on the
real model, in the README's order: the openai SDK, the client, LangChain (its own OpenAIEmbeddings with its
defaults too), LlamaIndex, TEI clients and curl."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess

import numpy as np
import pytest

from tests.helpers import REPO, make_adapter, start_server, stop_server

pytestmark = pytest.mark.slow
SECTION = "## Use it from "
ADDRESSES = ("http://127.0.0.1:8080", "localhost:8080")


def snippets() -> list[tuple[str, str]]:
    """The section's fenced blocks as (language, code)."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```(python|sh)\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    make_adapter(minilm, root / "adapters" / "tuned")
    proc, url = start_server(root / "data", root / "adapters", "--watch-interval", "0", env={"EMBEDLIFT_ADAPTER": "tuned"})
    yield url
    assert stop_server(proc) == 0


@pytest.fixture
def offline_clients(tmp_path, monkeypatch):
    """What the snippets' clients cannot download here: tiktoken's cl100k file (embedlift's copy, named as tiktoken
    names a cached download) and huggingface_hub's offline switch (the suite's HF_HUB_OFFLINE; the URL is ours)."""
    from huggingface_hub import constants

    from embedlift.models.bpe import DATA

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(DATA, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_every_snippet_runs_and_finds_what_it_says(server, offline_clients, capsys):
    blocks = snippets()
    assert [lang for lang, _ in blocks] == ["python"] * 6 + ["sh"], "the section's snippets changed: update this test"
    found: list[dict] = []
    for lang, code in blocks:
        for address in ADDRESSES:
            code = code.replace(address, server if address.startswith("http") else server.removeprefix("http://"))
        if lang == "sh":
            ran = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, timeout=60)
            assert ran.returncode == 0, ran.stderr
            found.append({"stdout": ran.stdout})
        else:
            namespace: dict = {}
            exec(compile(code, "README.md", "exec"), namespace)
            found.append(namespace)
    openai_sdk, client, langchain, langchain_openai, llamaindex, tei, curl = found
    assert len(openai_sdk["question"]) == 384 and len(openai_sdk["passages"]) == 1
    assert client["hits"][0].id == "revenue" and client["report"].metrics["base"]["hit_rate@1"] == 1.0
    printed = capsys.readouterr().out
    assert "404 no document 'nope' in collection 'filings'" in printed and "revenue " in printed  # the client's prints
    assert langchain["nearest"][0].page_content.startswith("Revenue") and langchain["documents"][0].id == "revenue"
    assert langchain["documents"][0].metadata["year"] == 2021 and "score" in langchain["documents"][0].metadata["embedlift"]
    assert all(len(v) == 384 for v in langchain_openai["pair"])
    assert llamaindex["best"][0].node.get_content().startswith("Revenue") and llamaindex["nodes"][0].node.node_id == "revenue"
    assert len(tei["tei_vector"]) == 384 and np.asarray(tei["hub_vector"]).size == 384
    assert '"id":"revenue"' in curl["stdout"] and '"field":"k"' in curl["stdout"]
