"""`embedlift generate` against a real HTTP server on 127.0.0.1 speaking the chat completions protocol
(a small scripted one: no LLM runs on this machine), with the real openai SDK."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from embedlift.training.dataset import parse_dataset
from embedlift.training.generate import chunk_text, parse_questions, read_documents

TOPICS = ["ride volumes", "driver pay", "insurance", "scooters", "autonomy", "revenue", "competition", "regulation"]


def essay(n_sentences: int, seed: int = 0) -> str:
    return " ".join(f"Sentence {i} of part {seed} explains {TOPICS[(i + seed) % 8]} in plain words." for i in range(n_sentences))


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page (no PDF writer needed)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 10 Tf 20 700 Td ({safe}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R /Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


class ChatServer(ThreadingHTTPServer):
    """POST /v1/chat/completions: two numbered questions naming the chunk's first words, or scripted trouble."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.requests = 0
        self.delay = 0.0
        self.fail_first = 0  # answer 500 to this many requests first
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with s.lock:
            s.requests += 1
            fail = s.fail_first > 0
            s.fail_first -= 1
        time.sleep(s.delay)
        if self.headers.get("authorization") != "Bearer llm-key":
            return self._send(401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error", "code": "invalid_api_key"}})
        if fail:
            return self._send(500, {"error": {"message": "overloaded", "type": "server_error"}})
        prompt = body["messages"][0]["content"]
        context = prompt.split("---------------------")[1].strip() if "-----" in prompt else prompt
        if "GARBAGE" in context:
            answer = "I cannot help with that."
        else:
            words = " ".join(context.split()[:4])
            answer = f"Here are the questions:\n1. What does the text say about {words}?\n2) Why is {words} important?\n- What does the text say about {words}?\n\n"
        self._send(200, {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def chat():
    server = ChatServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def run_generate(chat, *args: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embedlift.service.cli", "generate", *args, "--llm-base-url", chat.url, "--llm-model", "tiny-llm"],
        capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": "llm-key"}, **popen,
    )


def test_parse_questions_is_robust():
    answer = "Sure! Here are 3 questions:\n\n1. What is Lyft's revenue?\n2) How many riders?\n* **Why did costs rise?**\nQ4: What is Lyft's revenue?\n- \n5. Describe the risks\nThanks"
    assert parse_questions(answer, 10) == ["What is Lyft's revenue?", "How many riders?", "Why did costs rise?", "Describe the risks"]
    assert parse_questions(answer, 2) == ["What is Lyft's revenue?", "How many riders?"]
    assert parse_questions("no questions here.", 3) == []


def test_chunks_keep_whole_sentences_and_overlap():
    chunks = chunk_text(essay(60), chunk_words=60, overlap_words=12)
    assert len(chunks) > 3 and all(len(c.split()) <= 60 for c in chunks)
    assert all(c.endswith(".") for c in chunks)  # whole sentences
    first_sentence_of_second = chunks[1].split(". ")[0]
    assert first_sentence_of_second in chunks[0]  # overlap: the next chunk repeats the last sentence


@pytest.mark.slow
def test_generate_from_text_markdown_and_pdf_then_train_on_a_remote_base(chat, remote, tmp_path):
    """The README's flow: generate with an LLM, then train over a remote base (both local protocol servers)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(essay(40, 1))
    (docs / "b.md").write_text("# Title\n\n" + essay(30, 2))
    (docs / "c.pdf").write_bytes(make_pdf([essay(8, 3), essay(8, 4)]))
    (docs / "empty.txt").write_text("   ")
    out = tmp_path / "data.json"
    r = run_generate(chat, str(docs), "--out", str(out), "--chunk-words", "80", "--overlap-words", "10")
    assert r.returncode == 1, r.stderr  # written, but empty.txt was reported
    assert "empty.txt: no text found" in r.stderr
    data = json.loads(out.read_text())
    ds = parse_dataset(out.read_bytes(), str(out))
    assert len(ds.corpus) >= 4 and len(ds.queries) == 2 * len(ds.corpus)  # duplicates dropped: 2 per chunk
    pages = {(m["source"].rsplit("/", 1)[-1], m["page"]) for m in data["corpus_metadata"].values()}
    assert ("c.pdf", 1) in pages and ("c.pdf", 2) in pages and ("a.txt", None) in pages
    # the generated file trains as it is, over a remote base
    t = subprocess.run(
        [sys.executable, "-m", "embedlift.service.cli", "train", str(out), "--kind", "linear", "--epochs", "2",
         "--base", "openai:base", "--base-url", f"{remote}/v1", "--out", str(tmp_path / "adapter"), "--cache", str(tmp_path / "c.sqlite3")],
        capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": "unused"},
    )
    assert t.returncode == 0, t.stderr
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["base"]["name"] == "openai:base"


@pytest.mark.slow
def test_resume_after_a_kill_pays_each_chunk_once(chat, tmp_path):
    (tmp_path / "a.txt").write_text(essay(200))
    out = tmp_path / "data.json"
    chat.delay = 0.15
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedlift.service.cli", "generate", str(tmp_path / "a.txt"), "--out", str(out),
         "--llm-base-url", chat.url, "--llm-model", "tiny-llm", "--chunk-words", "60", "--overlap-words", "0", "--concurrency", "1"],
        env={**os.environ, "OPENAI_API_KEY": "llm-key"}, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 60
    while chat.requests < 5 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = chat.requests
    assert not out.exists()  # killed before the end: nothing half-written
    chat.delay = 0.0
    r = run_generate(chat, str(tmp_path / "a.txt"), "--out", str(out), "--chunk-words", "60", "--overlap-words", "0", "--concurrency", "1")
    assert r.returncode == 0, r.stderr
    n_chunks = len(json.loads(out.read_text())["corpus"])
    assert re.search(r"from earlier runs", r.stderr)
    assert chat.requests <= n_chunks + 1  # at most the one in flight at the kill is paid twice
    assert first >= 4


def test_retries_then_success_and_garbage_counts_as_failed(chat, tmp_path):
    (tmp_path / "a.txt").write_text(essay(10))
    (tmp_path / "b.txt").write_text("GARBAGE " + essay(5))
    chat.fail_first = 2
    out = tmp_path / "d.json"
    r = run_generate(chat, str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(out), "--concurrency", "1")
    assert r.returncode == 1 and "the LLM answered no question" in r.stderr and "b.txt" in r.stderr
    assert len(json.loads(out.read_text())["corpus"]) == 1  # a.txt, after two 500s were retried


def test_wrong_key_stops_at_once_with_a_clear_error(chat, tmp_path):
    (tmp_path / "a.txt").write_text(essay(100))
    r = subprocess.run(
        [sys.executable, "-m", "embedlift.service.cli", "generate", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d.json"),
         "--llm-base-url", chat.url, "--llm-model", "m", "--llm-api-key", "wrong", "--concurrency", "1", "--chunk-words", "50"],
        capture_output=True, text=True,
    )
    assert r.returncode == 2 and "refused the API key" in r.stderr
    assert chat.requests <= 2


@pytest.mark.slow
def test_unreachable_llm_and_bad_inputs(tmp_path):
    (tmp_path / "a.txt").write_text(essay(5))
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    docs, problems = read_documents([tmp_path / "a.txt", tmp_path / "bad.pdf", tmp_path / "missing.txt"])
    assert len(docs) == 1 and any("bad.pdf" in p for p in problems) and any("missing.txt" in p for p in problems)
    r = subprocess.run(
        [sys.executable, "-m", "embedlift.service.cli", "generate", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d.json"),
         "--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--llm-api-key", "k"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and "cannot reach the LLM" in r.stderr
