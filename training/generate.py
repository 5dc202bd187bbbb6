"""Synthetic (question, passage) pairs: chunk documents, ask an LLM for questions each chunk answers.

As in the LlamaIndex tutorials, but resumable and strict about what it keeps:

- Inputs: ``.txt``/``.md`` files, PDFs (pypdf, one chunk never spans pages so each keeps its page), a
  directory of them, or an existing corpus JSON (``{"corpus": {id: text}}``, used as it is, unchunked).
- Chunks: whole sentences packed up to ``chunk_words`` words, the last ``overlap_words`` words of sentences
  repeated at the start of the next chunk. Each chunk keeps its source file and page.
- The LLM: chat completions through the ``openai`` SDK at any ``base_url`` (OpenAI, vLLM, Ollama, llama.cpp
  server). The SDK retries 408/409/429/5xx and timeouts with backoff honouring ``Retry-After``; a wrong key,
  an unknown model or an unreachable server stops the run at once (every later call would fail too).
- Answers are parsed line by line (numbered, bulleted or plain), preambles dropped, empty and duplicate
  questions dropped. A chunk whose answer holds no question counts as failed, and is retried next run.
- Resumable: each chunk's questions are committed to a SQLite progress file next to the output as they
  arrive, so an interrupted run continues where it stopped without paying twice. The dataset JSON is written
  atomically at the end of every run, with whatever is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from embedlift.models.errors import DatasetError, InvalidInputError, RemoteError

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = """\
Context information is below.

---------------------
{context}
---------------------

Given the context information and not prior knowledge, generate only questions based on the query below.

You are a Teacher/Professor. Your task is to set up {num_questions} questions for an upcoming quiz/examination.
The questions should be diverse in nature across the document, answerable from the context alone, and must not
mention "the context" or "the passage". Restrict the questions to the context information provided.
Write one question per line, numbered, and nothing else."""

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_LIST_MARK = re.compile(r"^\s*(?:(?:Q(?:uestion)?\s*)?\d+\s*[.):\-]|[-*•–]|\(\w\))\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Chunk:
    id: str
    text: str
    source: str
    page: int | None = None


@dataclass
class GenerateReport:
    """What a run did; ``problems`` name the file or chunk of each failure."""

    chunks: int = 0
    done: int = 0
    reused: int = 0
    failed: int = 0
    questions: int = 0
    problems: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ input
def read_documents(paths: Sequence[Path]) -> tuple[list[tuple[str, int | None, str]], list[str]]:
    """``(source, page, text)`` for every readable page or file, and a message per unreadable or empty one."""
    out: list[tuple[str, int | None, str]] = []
    problems: list[str] = []
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | {".pdf"})
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or directory")
    for f in files:
        suffix = f.suffix.lower()
        try:
            if suffix == ".pdf":
                from pypdf import PdfReader

                pages: list[tuple[int | None, str]] = [(i + 1, page.extract_text() or "") for i, page in enumerate(PdfReader(f).pages)]
            elif suffix in TEXT_SUFFIXES:
                pages = [(None, f.read_text(encoding="utf-8"))]
            else:
                problems.append(f"{f}: unsupported file type {suffix!r} (use .txt, .md, .pdf or a corpus .json)")
                continue
        except Exception as exc:  # pypdf and decoding raise many types
            problems.append(f"{f}: unreadable ({type(exc).__name__}: {exc})")
            continue
        kept = [(str(f), page, text) for page, text in pages if text.strip()]
        if not kept:
            problems.append(f"{f}: no text found (empty, or a scanned PDF without a text layer)")
        out += kept
    return out, problems


def split_sentences(text: str) -> list[str]:
    """Sentences (and paragraph breaks as boundaries), whitespace collapsed."""
    parts = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if para:
            parts += [s for s in _SENTENCE.split(para) if s.strip()]
    return parts


def chunk_text(text: str, chunk_words: int = 200, overlap_words: int = 30) -> list[str]:
    """Pack whole sentences up to ``chunk_words`` words; the next chunk starts with the last sentences
    covering up to ``overlap_words`` words. A sentence longer than a chunk is cut by words."""
    sentences: list[list[str]] = []
    for s in split_sentences(text):
        words = s.split()
        sentences += [words[i : i + chunk_words] for i in range(0, len(words), chunk_words)]
    chunks: list[str] = []
    current: list[list[str]] = []
    for sentence in sentences:
        if current and sum(map(len, current)) + len(sentence) > chunk_words:
            chunks.append(" ".join(w for s in current for w in s))
            keep: list[list[str]] = []
            for earlier in reversed(current):
                if sum(map(len, keep)) + len(earlier) > overlap_words:
                    break
                keep.insert(0, earlier)
            current = keep
        current.append(sentence)
    if current:
        chunks.append(" ".join(w for s in current for w in s))
    return chunks


def make_chunks(documents: Iterable[tuple[str, int | None, str]], chunk_words: int, overlap_words: int) -> list[Chunk]:
    if overlap_words >= chunk_words:
        raise InvalidInputError(f"--overlap-words ({overlap_words}) must be smaller than --chunk-words ({chunk_words})")
    chunks, seen = [], set()
    for source, page, text in documents:
        for piece in chunk_text(text, chunk_words, overlap_words):
            cid = "chunk-" + hashlib.blake2b(f"{source}|{page}|{piece}".encode(), digest_size=8).hexdigest()
            if cid not in seen:
                seen.add(cid)
                chunks.append(Chunk(cid, piece, source, page))
    return chunks


def corpus_chunks(path: Path) -> list[Chunk]:
    """An existing corpus JSON (``{"corpus": {id: text}}``, e.g. a LlamaIndex dataset): used as it is."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read corpus JSON ({exc})") from exc
    corpus = data.get("corpus") if isinstance(data, dict) else None
    if not isinstance(corpus, dict) or not all(isinstance(v, str) for v in corpus.values()):
        raise DatasetError(f'{path}: expected {{"corpus": {{id: text, ...}}}}')
    return [Chunk(str(k), v, str(path)) for k, v in corpus.items() if v.strip()]


# ------------------------------------------------------------------------------------------------ parse
def parse_questions(answer: str, limit: int) -> list[str]:
    """Questions from an LLM answer: one per line, list markers stripped, preambles ("Here are...:") and
    empty or duplicate lines dropped; at most ``limit``."""
    out, seen = [], set()
    for line in answer.splitlines():
        line = _LIST_MARK.sub("", line.strip()).strip().strip("*_").strip().strip('"').strip()
        if len(line) < 8 or line.endswith(":") or not any(c.isalpha() for c in line):
            continue
        if not line.endswith("?") and not re.match(r"(?i)^(what|how|why|when|where|which|who|whom|whose|is|are|does|do|did|can|could|should|would|will|describe|explain|list|name)\b", line):
            continue
        key = re.sub(r"\W+", " ", line.lower()).strip()
        if key in seen:
            continue
        seen.add(key)
        out.append(line)
        if len(out) == limit:
            break
    return out


# ---------------------------------------------------------------------------------------------- progress
class Progress:
    """The SQLite progress file: the run's settings, and each finished chunk's questions."""

    def __init__(self, path: Path, settings: dict[str, Any], restart: bool) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS done (chunk TEXT PRIMARY KEY, questions TEXT NOT NULL)")
        wanted = json.dumps(settings, sort_keys=True)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        if row is not None and row[0] != wanted:
            if not restart:
                raise InvalidInputError(
                    f"{path} holds a run with other settings ({row[0]}); re-run with the same options to resume, "
                    "or pass --restart to start over"
                )
            self._db.execute("DELETE FROM done")
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)", (wanted,))

    def finished(self) -> dict[str, list[str]]:
        with self._lock:
            return {c: json.loads(q) for c, q in self._db.execute("SELECT chunk, questions FROM done")}

    def record(self, chunk: str, questions: list[str]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO done VALUES (?, ?)", (chunk, json.dumps(questions)))

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ------------------------------------------------------------------------------------------------- run
class QuestionWriter:
    """Asks an OpenAI-compatible chat model for questions about one chunk."""

    def __init__(
        self, model: str, *, base_url: str | None = None, api_key: str | None = None, template: str = DEFAULT_PROMPT,
        num_questions: int = 2, temperature: float = 0.2, max_retries: int = 4, timeout: float = 120.0,
    ) -> None:
        import openai

        if "{context}" not in template:
            raise InvalidInputError("the prompt template must contain {context} (and may use {num_questions})")
        try:
            self.client = openai.OpenAI(base_url=base_url, api_key=api_key or None, max_retries=max_retries, timeout=timeout)
        except openai.OpenAIError as exc:
            raise InvalidInputError(f"{exc} (for a server without auth, set OPENAI_API_KEY=unused)") from exc
        self.model, self.template, self.num_questions, self.temperature = model, template, num_questions, temperature
        self.url = str(self.client.base_url)

    def ask(self, chunk: Chunk) -> str:
        """The LLM's raw answer. Raises ``RemoteError`` (fatal: stop the run) for a key, model or connection
        problem, ``ValueError`` (this chunk failed) for other refusals."""
        import openai

        prompt = self.template.replace("{context}", chunk.text).replace("{num_questions}", str(self.num_questions))
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], temperature=self.temperature
            )
        except openai.AuthenticationError as exc:
            raise RemoteError(f"{self.url} refused the API key (401): set OPENAI_API_KEY or --llm-api-key") from exc
        except openai.NotFoundError as exc:
            raise RemoteError(f"{self.url} has no model {self.model!r} (404)") from exc
        except openai.APIConnectionError as exc:
            raise RemoteError(f"cannot reach the LLM at {self.url} after retries: {exc}") from exc
        except openai.APIStatusError as exc:
            raise ValueError(f"the LLM answered {exc.status_code} after retries") from exc
        content = response.choices[0].message.content if response.choices else None
        return content or ""

    def settings(self) -> dict[str, Any]:
        return {"model": self.model, "url": self.url, "template": self.template, "num_questions": self.num_questions}


def generate(
    chunks: Sequence[Chunk], writer: QuestionWriter, progress_path: Path, *, concurrency: int = 4,
    restart: bool = False, show_progress: bool = True,
) -> tuple[dict[str, Any], GenerateReport]:
    """Questions for every chunk not finished yet; returns the dataset (LlamaIndex JSON with
    ``corpus_metadata``) of every finished chunk and a report."""
    report = GenerateReport(chunks=len(chunks))
    progress = Progress(progress_path, writer.settings(), restart)
    try:
        finished = progress.finished()
        todo = [c for c in chunks if c.id not in finished]
        report.reused = len(chunks) - len(todo)
        fatal: list[RemoteError] = []
        stop = threading.Event()

        def one(chunk: Chunk) -> None:
            if stop.is_set():
                return
            try:
                questions = parse_questions(writer.ask(chunk), writer.num_questions)
            except RemoteError as exc:
                fatal.append(exc)
                stop.set()
                return
            except ValueError as exc:
                report.failed += 1
                report.problems.append(f"{chunk.id} ({chunk.source}{f' p.{chunk.page}' if chunk.page else ''}): {exc}")
                return
            if not questions:
                report.failed += 1
                report.problems.append(f"{chunk.id} ({chunk.source}): the LLM answered no question")
                return
            progress.record(chunk.id, questions)
            report.done += 1

        bar = tqdm(total=len(todo), desc="generating questions", unit="chunk", file=sys.stderr, disable=not show_progress)
        with bar, ThreadPoolExecutor(max_workers=concurrency) as pool:
            for future in as_completed([pool.submit(one, c) for c in todo]):
                future.result()
                bar.update(1)
                bar.set_postfix(done=report.done, failed=report.failed)
        finished = progress.finished()
    finally:
        progress.close()
    dataset = build_dataset(chunks, finished)
    report.questions = len(dataset["queries"])
    if fatal:
        raise GenerationStopped(fatal[0].message, dataset, report)
    return dataset, report


class GenerationStopped(RemoteError):
    """The LLM became unusable mid-run; what was done is kept (``dataset``, ``report``)."""

    def __init__(self, message: str, dataset: dict[str, Any], report: GenerateReport) -> None:
        super().__init__(message)
        self.dataset, self.report = dataset, report


def build_dataset(chunks: Sequence[Chunk], finished: dict[str, list[str]]) -> dict[str, Any]:
    queries, corpus, relevant, meta = {}, {}, {}, {}
    for chunk in chunks:
        questions = finished.get(chunk.id)
        if not questions:
            continue
        corpus[chunk.id] = chunk.text
        meta[chunk.id] = {"source": chunk.source, "page": chunk.page}
        for i, q in enumerate(questions):
            qid = f"{chunk.id}-q{i}"
            queries[qid] = q
            relevant[qid] = [chunk.id]
    return {"queries": queries, "corpus": corpus, "relevant_docs": relevant, "mode": "text", "corpus_metadata": meta}
