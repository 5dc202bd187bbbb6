"""The ``embedlift`` command line: one entry point for training, evaluation and serving.

Each sub-command parses its options, calls the library (``embedlift.training``'s pipeline, the service's
engine) and prints. Every command that runs a base model takes the same option group (``--base``, the prompts,
``--max-seq-length``, the window and remote settings, ``--device``, ``--precision``, ``--runtime``, ...), filled from
``EMBEDLIFT_*`` variables too, into one ``BaseSpec``. Errors embedlift raises on purpose (``EmbedliftError``, a
bad flag or variable included) print as one line on stderr with exit code 2, never a traceback. Results go to
stdout (``eval --json`` prints exactly the JSON and nothing else); progress and counts go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from embedlift.models.errors import EmbedliftError, InvalidInputError
from embedlift.models.lexical import LANGUAGES
from embedlift.models.spec import BaseSpec

FORMATS = ["llamaindex", "pairs", "cohere", "labelled", "csv"]


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``embedlift train: error: argument --epochs: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _typed(convert: Any, what: str) -> Any:
    """An argparse type whose error says what is allowed."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


positive_int = _typed(lambda t: int(t) if int(t) >= 1 else None, "an integer >= 1")
non_negative_int = _typed(lambda t: int(t) if int(t) >= 0 else None, "an integer >= 0")
positive_float = _typed(lambda t: float(t) if float(t) > 0 else None, "a number > 0")
non_negative_float = _typed(lambda t: float(t) if float(t) >= 0 else None, "a number >= 0")
unit_float = _typed(lambda t: float(t) if 0 <= float(t) <= 1 else None, "a number from 0 to 1")


# ---------------------------------------------------------------------------------------------- options
def add_base_options(p: argparse.ArgumentParser) -> None:
    """The base specification's option group: every command that runs a base model takes it. Each option is
    also an ``EMBEDLIFT_*`` variable; values are checked when the spec is built (``base_spec``)."""
    g = p.add_argument_group("base model (each also EMBEDLIFT_<OPTION>, e.g. EMBEDLIFT_QUERY_PROMPT)")
    g.add_argument("--base", dest="model", help="local model directory, hub id, openai:<model> (remote) or hashing:<dim> "
                   "(model-free, for tests); default: the packaged all-MiniLM-L6-v2, or the adapter's own base")
    g.add_argument("--query-prompt", help="instruction prefixed to queries (bge-style); default: the model's own")
    g.add_argument("--document-prompt", help="instruction prefixed to documents; default: the model's own")
    g.add_argument("--max-seq-length", help="override the model's token limit")
    g.add_argument("--device", help="auto (default: a CUDA device when torch sees one, else the CPU), cpu, cuda, cuda:N")
    g.add_argument("--precision", help="auto (default: bf16 on CPUs with AMX/AVX-512 BF16 where it times faster than fp32 at load, and on CUDA; "
                   "fp16 on older CUDA; else fp32), "
                   "fp32, bf16, fp16; checked against fp32 at load (cosine >= 0.9999) or it falls back to fp32")
    g.add_argument("--threads", help="torch threads (default: the cores this process may use)")
    g.add_argument("--runtime", help="auto (default: on a CPU where openvino is installed, torch and openvino timed at load and the faster run; "
                   "else torch), torch, or openvino "
                   "(pip install 'embedlift[openvino]'; the transformer compiled for the CPU, checked against torch fp32 at load)")
    g.add_argument("--batch-size", help="inputs per forward pass at most (default 32)")
    g.add_argument("--batch-tokens", help="padded tokens per forward pass at most (default 4096 on a CPU, 32768 on a GPU)")
    g.add_argument("--window-tokens", help="tokens per window of a long text (default: the model's limit)")
    g.add_argument("--window-stride", help="tokens between window starts (default: 3/4 of the window)")
    r = p.add_argument_group("remote base (--base openai:<model>)")
    r.add_argument("--base-url", help="OpenAI-protocol API root, e.g. http://127.0.0.1:8080/v1 (default: $OPENAI_BASE_URL or OpenAI)")
    r.add_argument("--openai-api-key", help="API key of the remote (default: $OPENAI_API_KEY)")
    r.add_argument("--dimensions", help="ask the remote for shorter vectors (text-embedding-3-*)")
    r.add_argument("--remote-max-input-tokens", dest="max_input_tokens", help="the remote's per-input token limit (default 8191)")
    r.add_argument("--tokenizer", help="local Hugging Face tokenizer to cut windows with (default: a character budget)")


def add_cache_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base-embedding cache")
    g.add_argument("--cache", type=Path, help="base-embedding cache file (default: $EMBEDLIFT_CACHE or ~/.cache/embedlift/)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the base-embedding cache")


def base_spec(args: argparse.Namespace) -> BaseSpec:
    """The base specification the options (over ``EMBEDLIFT_*`` variables) describe."""
    return BaseSpec.from_sources(vars(args))


def _cache(args: argparse.Namespace) -> Any:
    from embedlift.training.pipeline import DEFAULT_CACHE

    return None if args.no_cache else (args.cache or DEFAULT_CACHE)


def _api_key(args: argparse.Namespace) -> str | None:
    return args.openai_api_key or os.environ.get("EMBEDLIFT_OPENAI_API_KEY") or None


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise InvalidInputError(f"--k must be a comma-separated list of positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise InvalidInputError(f"--k must be a comma-separated list of positive integers, got {text!r}")
    return ks


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    """``--option key=value`` pairs of a custom adapter kind; a value is read as JSON when it parses (numbers,
    booleans, lists), else kept as a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"--option must be KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _validation(args: argparse.Namespace) -> Any:
    from embedlift.training.pipeline import Validation

    return Validation(dataset=args.val, fraction=args.val_fraction, by=args.val_split, seed=args.seed)


def _open(args: argparse.Namespace, spec: BaseSpec | None = None) -> Any:
    """The cached base encoder the options name (for commands that embed through it directly)."""
    from embedlift.training.pipeline import open_base

    return open_base(spec or base_spec(args), _cache(args), api_key=_api_key(args))


# --------------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from embedlift.models.adapters import ENTRY_POINT_GROUP, ApplyTo, adapter_kinds
    from embedlift.models.lexical import LexicalSettings
    from embedlift.training.fit import FitSettings
    from embedlift.training.formats import LabelledDataset, read_dataset
    from embedlift.training.pipeline import train_adapter

    if args.kind not in (kinds := adapter_kinds()):  # before minutes of embedding, not after
        raise InvalidInputError(f"--kind must be one of {sorted(kinds)} (custom kinds: an installed package's {ENTRY_POINT_GROUP!r} entry point), got {args.kind!r}")
    spec = base_spec(args)
    ds = read_dataset(args.dataset, args.format)
    # labelled texts are both what is searched for and what is searched: the adapter must move both sides
    apply_to: ApplyTo = args.apply_to or ("both" if isinstance(ds, LabelledDataset) else "query")
    settings = FitSettings(
        kind=args.kind, apply_to=apply_to, bias=args.bias, hidden_dim=args.hidden_dim, options=_options(args.option),
        loss=args.loss, margin=args.margin, epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr,
        temperature=args.temperature, anchor=args.anchor, patience=args.patience, seed=args.seed,
    )
    lexical = None if args.lexical_language == "none" else LexicalSettings(language=args.lexical_language)
    trained = train_adapter(args.dataset, _open(args, spec), settings, _validation(args), fmt=args.format, lexical=lexical, log=_err)
    config = trained.save(args.out, name=args.name)
    _err(f"saved adapter {config.name!r} to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from embedlift.models.lexical import LexicalSettings
    from embedlift.training.pipeline import evaluate
    from embedlift.training.report import comparison_table, write_report

    ks = _ks(args.k)
    comparison = evaluate(
        args.dataset, base_spec(args), args.adapter, finetuned=args.finetuned, ks=ks, truncate=args.truncate,
        mode=args.mode, fusion=args.fusion, lexical=LexicalSettings(language=args.lexical_language),
        fmt=args.format, cache=_cache(args), log=_err,
    )
    if args.json:
        sys.stdout.write(json.dumps(comparison.to_json(), indent=2) + "\n")
    else:
        Console().print(comparison_table(comparison, title=f"{args.dataset} ({len(comparison.query_ids)} queries, {comparison.n_docs} documents)"))
        if args.adapter or args.finetuned:
            print("cells: value, delta vs base, [paired bootstrap 95% interval of the delta]")
    if args.report:
        _err(f"report written to {write_report(comparison, args.report)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import signal

    import uvicorn

    from embedlift.service.http import create_app
    from embedlift.service.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    settings = Settings.from_sources(flags)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # uvicorn drains in-flight requests on SIGTERM, then restores the previous handler and re-raises the
    # signal; this handler makes that drained stop exit 0 (what container runtimes read as clean).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level="info",
        access_log=settings.access_log, timeout_graceful_shutdown=30, timeout_keep_alive=settings.keep_alive_timeout,
        # loop/http "auto" (uvicorn's default) pick uvloop and httptools, which the project depends on: the C
        # event loop and HTTP parser take a third off the per-request cost.
    )
    return 0


def cmd_import_llamaindex(args: argparse.Namespace) -> int:
    from embedlift.models.checkpoint import base_info, save_checkpoint
    from embedlift.models.llamaindex import read_llamaindex_adapter
    from embedlift.models.spec import load_base

    adapter = read_llamaindex_adapter(args.source, apply_to=args.apply_to)  # refused before the base loads
    encoder = load_base(base_spec(args), api_key=_api_key(args))
    if encoder.dim != adapter.config.dim:
        raise InvalidInputError(f"the adapter maps {adapter.config.dim} dimensions but the base {encoder.name} has {encoder.dim}; pass the --base it was trained on")
    base = base_info(encoder)
    config = save_checkpoint(adapter, args.out, base=base, name=args.name, training={"imported_from": "llamaindex", "source": str(args.source)})
    _err(f"imported {args.source} as {config.kind} adapter {config.name!r} for {base.fingerprint} -> {args.out}")
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from embedlift.models.errors import NotFoundError
    from embedlift.service.collections import STORE_FILE, SQLiteStore, check_name, reindex

    check_name(args.collection)
    path = args.data_dir / "collections" / args.collection / STORE_FILE
    if not path.is_file():
        raise NotFoundError(f"no collection {args.collection!r} under {args.data_dir / 'collections'}")
    encoder = _open(args)
    store = SQLiteStore(path)
    try:
        before = store.read_config().base_fingerprint
        docs, _ = store.count()
        _err(f"re-embedding {docs} documents of {args.collection!r} with {encoder.inner.name}")
        config, windows = reindex(store, encoder)
    finally:
        store.close()
    _err(f"{args.collection}: {docs} documents, {windows} windows; base {before} -> {config.base_fingerprint}")
    return 0


def cmd_store_copy(args: argparse.Namespace) -> int:
    from embedlift.service.database import check_url, redact
    from embedlift.service.store_copy import copy_store

    check_url(args.to)
    report = copy_store(args.source, args.adapters_dir, args.to)
    for name, (docs, windows) in report.collections.items():
        _err(f"collection {name}: {docs} documents, {windows} windows (verified)")
    for name, version in report.adapters.items():
        _err(f"adapter {name}@{version}" + (" (active)" if name == report.active else ""))
    _err(f"copied {len(report.collections)} collections and {len(report.adapters)} adapters to {redact(args.to)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from embedlift.models.checkpoint import atomic_write
    from embedlift.training.generate import (
        DEFAULT_PROMPT,
        GenerationStopped,
        QuestionWriter,
        corpus_chunks,
        generate,
        make_chunks,
        read_documents,
    )

    json_inputs = [p for p in args.inputs if p.suffix.lower() == ".json"]
    other = [p for p in args.inputs if p.suffix.lower() != ".json"]
    documents, problems = read_documents(other)
    chunks = make_chunks(documents, args.chunk_words, args.overlap_words)
    for p in json_inputs:
        chunks += corpus_chunks(p)
    for problem in problems:
        _err(f"embedlift: warning: {problem}")
    if not chunks:
        raise InvalidInputError("no text to generate questions from" + (f" ({len(problems)} inputs unusable, see above)" if problems else ""))
    template = args.prompt_template.read_text(encoding="utf-8") if args.prompt_template else DEFAULT_PROMPT
    writer = QuestionWriter(
        args.llm_model, base_url=args.llm_base_url, api_key=args.llm_api_key, template=template,
        num_questions=args.questions_per_chunk, temperature=args.temperature,
    )
    _err(f"{len(chunks)} chunks from {len(args.inputs)} inputs; progress in {_progress_path(args.out)}")
    try:
        dataset, report = generate(
            chunks, writer, _progress_path(args.out), concurrency=args.concurrency, restart=args.restart
        )
        stopped = None
    except GenerationStopped as exc:
        dataset, report, stopped = exc.dataset, exc.report, exc
    _write_generated(dataset, args, atomic_write)
    _err(
        f"{report.done} chunks done now, {report.reused} from earlier runs, {report.failed} failed; "
        f"{report.questions} questions on {len(dataset['corpus'])} chunks written to {args.out}"
    )
    for problem in report.problems[:10]:
        _err(f"  failed: {problem}")
    if stopped is not None:
        _err(f"embedlift: error: stopped: {stopped.message}; re-run the same command to continue")
        return 2
    if report.failed or problems:
        _err("embedlift: some inputs or chunks failed (listed above); re-run the same command to retry the chunks")
        return 1
    return 0


def _progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.sqlite3")


def _write_generated(dataset: dict[str, Any], args: argparse.Namespace, atomic_write: Any) -> None:
    """The dataset, or with ``--val-fraction`` a train file and a ``.val.json`` split by document."""
    from embedlift.training.dataset import QADataset, split

    if not args.val_fraction or not dataset["corpus"]:
        atomic_write(args.out, json.dumps(dataset, indent=1, ensure_ascii=False).encode())
        return
    ds = QADataset(queries=dataset["queries"], corpus=dataset["corpus"], relevant_docs=dataset["relevant_docs"])
    train, val = split(ds, args.val_fraction, by="document", seed=args.seed)
    for part, path in ((train, args.out), (val, args.out.with_suffix(".val.json"))):
        body = {**json.loads(part.to_json()), "corpus_metadata": {d: dataset["corpus_metadata"][d] for d in part.corpus}}
        atomic_write(path, json.dumps(body, indent=1, ensure_ascii=False).encode())


def cmd_data_convert(args: argparse.Namespace) -> int:
    from embedlift.training.dataset import QADataset
    from embedlift.training.formats import read_dataset, unreferenced, write_dataset

    ds = read_dataset(args.source, args.format)
    dropped = len(unreferenced(ds)) if args.drop_unreferenced and isinstance(ds, QADataset) else 0
    fmt = write_dataset(ds, args.out, args.to, drop_unreferenced=args.drop_unreferenced)
    _err(f"{args.source} ({ds.summary()}) -> {args.out} ({fmt})" + (f"; {dropped} documents no query names left out" if dropped else ""))
    return 0


def cmd_data_mine(args: argparse.Namespace) -> int:
    from embedlift.training.formats import write_dataset
    from embedlift.training.negatives import MiningSettings
    from embedlift.training.pipeline import mine_negatives

    settings = MiningSettings(
        num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max, max_score=args.max_score,
        absolute_margin=args.absolute_margin, relative_margin=args.relative_margin, near_duplicate=args.near_duplicate,
    )
    mined, report = mine_negatives(args.dataset, _open(args), settings, fmt=args.format, log=_err)
    fmt = write_dataset(mined, args.out, args.to)
    _err(f"{report.summary()}; written to {args.out} ({fmt})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from embedlift.models.lexical import LexicalSettings
    from embedlift.training.finetuning import FinetuneSettings
    from embedlift.training.pipeline import finetune

    settings = FinetuneSettings(
        epochs=args.epochs, lr=args.lr, batch_size=args.train_batch_size, warmup_ratio=args.warmup_ratio,
        eval_steps=args.eval_steps, max_negatives=args.max_negatives, margin=args.margin, seed=args.seed,
    )
    lexical = None if args.lexical_language == "none" else LexicalSettings(language=args.lexical_language)
    result = finetune(args.dataset, base_spec(args), args.out, settings, _validation(args), fmt=args.format, lexical=lexical, log=_err)
    _err(f"fine-tuned in {result.seconds:.1f}s: {result.summary()}; model written to {args.out} (use it as --base)")
    return 0


def spec_bytes() -> bytes:
    """The app's OpenAPI spec, formatted as it is committed in openapi/openapi.json."""
    import msgspec

    from embedlift.service.http import create_app
    from embedlift.service.settings import Settings

    app = create_app(Settings())
    return msgspec.json.format(msgspec.json.encode(app.openapi_schema.to_schema()), indent=2) + b"\n"


def cmd_openapi(args: argparse.Namespace) -> int:
    data = spec_bytes()
    if args.out is None:
        sys.stdout.buffer.write(data)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(data)
        _err(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
DATASET_HELP = "dataset file: LlamaIndex JSON, JSONL (pairs/triplets, Cohere-style, labelled {text,label}) or CSV"


def _add_format_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS,
                   help="the dataset's format (default: from the extension and, for .jsonl, the first line's keys)")


def _add_validation_options(p: argparse.ArgumentParser) -> None:
    v = p.add_mutually_exclusive_group()
    v.add_argument("--val", type=Path, help="validation dataset file (default: hold out part of DATASET)")
    v.add_argument("--val-fraction", type=_typed(lambda t: float(t) if 0 < float(t) < 1 else None, "a number between 0 and 1"),
                   default=0.1, help="fraction held out for validation (default 0.1)")
    p.add_argument("--val-split", choices=["query", "document"], default="document",
                   help="hold out by document (unseen documents, default) or by query")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="embedlift", description="Adapters over frozen embedding models: train, evaluate, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    t = sub.add_parser("train", help="train an adapter on a (question, passage) or labelled dataset")
    t.add_argument("dataset", type=Path, help=DATASET_HELP)
    _add_format_option(t)
    t.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    t.add_argument("--name", help="adapter name (default: the --out directory's name)")
    t.add_argument("--kind", default="linear",
                   help="linear (default), mlp, or a custom kind registered under the 'embedlift.adapters' entry point group")
    t.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of a custom adapter kind (repeatable; VALUE read as JSON when it parses)")
    t.add_argument("--apply-to", choices=["query", "both"],
                   help="query: documents stay in base space, indexes never need rebuilding (default; both for labelled data)")
    t.add_argument("--bias", action="store_true", help="learn a bias (linear)")
    t.add_argument("--hidden-dim", type=positive_int, help="hidden width of mlp (default: the base dimension)")
    t.add_argument("--loss", choices=["ranking", "triplet"], default="ranking",
                   help="ranking: softmax over the candidates (default); triplet: margin against hard negatives")
    t.add_argument("--margin", type=non_negative_float, default=0.2, help="cosine margin of the triplet losses (default 0.2)")
    _add_validation_options(t)
    t.add_argument("--epochs", type=positive_int, default=30, help="maximum epochs; early stopping picks the best (default 30)")
    t.add_argument("--lr", type=positive_float, default=2e-3)
    t.add_argument("--train-batch-size", type=positive_int, default=32, help="pairs per step (default 32)")
    t.add_argument("--temperature", type=positive_float, default=0.05)
    t.add_argument("--anchor", type=non_negative_float, default=0.1, help="pull of the weights towards the identity (default 0.1)")
    t.add_argument("--patience", type=positive_int, default=5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lexical-language", choices=[*LANGUAGES, "none"], default="english",
                   help="fit the hybrid fusion weight (alpha) on validation against BM25 in this language (default english; "
                   "none: no fit); served where a collection's lexical language matches")
    add_base_options(t)
    add_cache_options(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="compare the base, adapters and fine-tuned models on a dataset")
    e.add_argument("dataset", type=Path, help=DATASET_HELP)
    _add_format_option(e)
    e.add_argument("--adapter", type=Path, action="append", default=[], help="adapter checkpoint (repeatable)")
    e.add_argument("--finetuned", type=Path, action="append", default=[],
                   help="a model directory written by embedlift finetune, compared as a column of its own (repeatable)")
    e.add_argument("--k", default="1,3,5,10", help="cut-offs (default 1,3,5,10)")
    e.add_argument("--json", action="store_true", help="print only JSON metrics on stdout")
    e.add_argument("--report", type=Path, help="write a hit_rate@k curve to FILE.html or FILE.png")
    e.add_argument("--truncate", action="store_true",
                   help="embed documents whole, truncated by the model (to measure what windows buy)")
    e.add_argument("--mode", choices=["dense", "hybrid"], default="dense",
                   help="hybrid adds the rows lexical (BM25 alone) and <model>+hybrid, each with its learned alpha (default dense)")
    e.add_argument("--fusion", choices=["weighted", "rrf"], default="weighted", help="how hybrid rows fuse (default weighted)")
    e.add_argument("--lexical-language", choices=list(LANGUAGES), default="english", help="the BM25 side's language (default english)")
    add_base_options(e)
    add_cache_options(e)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("serve", help="serve /embed, /v1/embeddings, collections, eval and the adapters over HTTP",
                       description="Every option is also read from EMBEDLIFT_<OPTION> (e.g. EMBEDLIFT_PORT). Base options left "
                       "unset are taken from the adapter the server activates (--adapter, or the remembered active one).")
    s.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    s.add_argument("--port", help="port (default 8080)")
    s.add_argument("--data-dir", help="service state: base-embedding cache, collections (default ./data)")
    s.add_argument("--adapters-dir", help="adapter checkpoints, one sub-directory each (default ./adapters)")
    s.add_argument("--datasets-dir", help="stored evaluation datasets for POST /eval dataset_name (default DATA_DIR/datasets)")
    s.add_argument("--store", help="collections in PostgreSQL + pgvector, shared by every replica: postgresql://USER[:PASSWORD]@HOST:PORT/DB "
                   "(prefer EMBEDLIFT_STORE: flags show in `ps`); default: the embedded store under --data-dir")
    s.add_argument("--store-pool", help="connections to the store at most (default 10)")
    s.add_argument("--store-timeout", help="seconds a request waits for the store before a 503 (default 5)")
    s.add_argument("--job-lease", help="seconds a background job's replica may stop vouching for it before another replica "
                   "takes it over (PostgreSQL store; default 30)")
    s.add_argument("--cache-store", help="base-embedding cache of background work: local (a file under --data-dir, default) "
                   "or store (the PostgreSQL store, shared by the fleet)")
    s.add_argument("--adapter", help="adapter to activate at start")
    s.add_argument("--api-key", help="Bearer key for read routes (prefer EMBEDLIFT_API_KEY: flags show in `ps`)")
    s.add_argument("--admin-key", help="Bearer key for mutating routes (prefer EMBEDLIFT_ADMIN_KEY)")
    s.add_argument("--max-concurrent", help="requests doing model work at once; more get 429 (default 256)")
    s.add_argument("--max-batch-inputs", help="inputs per model call, from all waiting requests (default 256; the token budget usually binds first)")
    s.add_argument("--max-batch-tokens", help="tokens per model call, from all waiting requests (default: the base's --batch-tokens)")
    s.add_argument("--max-queued-inputs", help="inputs waiting for the model; more get 429 (default 2048)")
    s.add_argument("--cache-mb", help="in-memory cache of base vectors for requests, MB; 0 = off (default 256)")
    s.add_argument("--access-log", action="store_true", default=None, help="log every request (off by default: it costs throughput)")
    s.add_argument("--keep-alive-timeout", help="seconds an idle keep-alive connection stays open; keep it above what a proxy "
                   "or load balancer in front holds idle upstream connections (default 75; nginx and AWS ALB: 60)")
    s.add_argument("--cors-origins", help="comma-separated origins browsers may call from (* = any); default: CORS off")
    s.add_argument("--watch-interval",
                   help="seconds between scans of the adapters directory for new checkpoints; 0 = off (default 2)")
    add_base_options(s)
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("reindex", help="re-embed a collection's stored texts with another base (e.g. after changing --base)",
                       description="Run while the server is stopped (a running server does the same with POST "
                       "/collections/NAME/reindex). Reads the texts from the collection's store, embeds every window with "
                       "--base, and replaces the stored vectors and the recorded base in one transaction.")
    r.add_argument("collection", help="collection name")
    r.add_argument("--data-dir", type=Path, default=Path("data"), help="the server's data directory (default ./data)")
    add_base_options(r)
    add_cache_options(r)
    r.set_defaults(func=cmd_reindex)

    st = sub.add_parser("store", help="the shared store: copy an embedded deployment into PostgreSQL")
    stsub = st.add_subparsers(dest="store_command", required=True, metavar="ACTION", parser_class=Parser)
    sc = stsub.add_parser("copy", help="copy collections (no re-embedding), adapter checkpoints and the active adapter into a PostgreSQL store",
                          description="Reads DATA_DIR (the server's --data-dir; stop the server first) and ADAPTERS_DIR, writes them to "
                          "the store, and verifies every collection's counts. Refuses a store that already has those collections "
                          "or any adapters. Then serve with --store (or EMBEDLIFT_STORE).")
    sc.add_argument("--from", dest="source", type=Path, required=True, help="the embedded data directory (e.g. ./data)")
    sc.add_argument("--to", required=True, help="postgresql://USER[:PASSWORD]@HOST:PORT/DB")
    sc.add_argument("--adapters-dir", type=Path, default=Path("adapters"), help="the checkpoints to copy (default ./adapters)")
    sc.set_defaults(func=cmd_store_copy)

    a = sub.add_parser("adapters", help="adapter checkpoints: import from LlamaIndex")
    asub = a.add_subparsers(dest="adapters_command", required=True, metavar="ACTION", parser_class=Parser)
    li = asub.add_parser("import-llamaindex", help="convert a LlamaIndex adapter (config.json + pytorch_model.bin) to an embedlift checkpoint",
                         description="Reads a LinearLayer or a residual relu TwoLayerNN saved by LlamaIndex's adapter.save() "
                         "(weights read tensors-only, never arbitrary pickle) and writes an embedlift checkpoint computing the "
                         "same function, for the base it was trained on (--base; default the packaged MiniLM).")
    li.add_argument("source", type=Path, help="the LlamaIndex adapter directory")
    li.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (e.g. adapters/NAME)")
    li.add_argument("--name", help="adapter name (default: the --out directory's name)")
    li.add_argument("--apply-to", choices=["query", "both"], default="query",
                    help="query (what LlamaIndex's AdapterEmbeddingModel does) or both")
    add_base_options(li)
    li.set_defaults(func=cmd_import_llamaindex)

    g = sub.add_parser("generate", help="make (question, passage) pairs from documents with an OpenAI-compatible LLM",
                       description="Chunk documents (.txt, .md, .pdf, directories, or a corpus JSON) and ask a chat model "
                       "for questions each chunk answers. Resumable: re-run the same command to continue. Exit 0: all done; "
                       "1: written, but some inputs or chunks failed; 2: stopped (the LLM is unusable), progress kept.")
    g.add_argument("inputs", type=Path, nargs="+", help="files, directories, or corpus JSON")
    g.add_argument("--out", type=Path, required=True, help="dataset JSON to write (EmbeddingQAFinetuneDataset)")
    g.add_argument("--llm-model", required=True, help="chat model name at the server")
    g.add_argument("--llm-base-url", help="OpenAI-compatible API root (default: $OPENAI_BASE_URL or OpenAI)")
    g.add_argument("--llm-api-key", help="API key (default: $OPENAI_API_KEY)")
    g.add_argument("--questions-per-chunk", type=positive_int, default=2)
    g.add_argument("--chunk-words", type=int, default=200, help="target words per chunk (default 200)")
    g.add_argument("--overlap-words", type=int, default=30, help="words of sentences repeated between chunks (default 30)")
    g.add_argument("--prompt-template", type=Path, help="file with the prompt; {context} and {num_questions} are filled in")
    g.add_argument("--temperature", type=float, default=0.2)
    g.add_argument("--concurrency", type=int, default=4, help="LLM requests in flight (default 4)")
    g.add_argument("--val-fraction", type=float, help="also write OUT's .val.json with this fraction of the chunks")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--restart", action="store_true", help="discard the progress of a run with other settings")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("data", help="datasets: convert between formats, mine hard negatives")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION", parser_class=Parser)
    dc = dsub.add_parser("convert", help="convert a dataset between formats",
                         description="Formats: llamaindex (.json: queries, corpus, relevant_docs[, hard_negatives]); pairs (.jsonl: "
                         "{query, positive, negative?, negatives?} per line); cohere (.jsonl: {query, relevant_passages, "
                         "hard_negatives?} per line); labelled (.jsonl: {text, label} per line); csv (query,positive[,negative] or "
                         "text,label). Text formats give each distinct text an id (q1, d1, ...).")
    dc.add_argument("source", type=Path, help="the dataset to read")
    dc.add_argument("--out", type=Path, required=True, help="the file to write")
    dc.add_argument("--from", dest="format", choices=FORMATS, help="the source's format (default: detected)")
    dc.add_argument("--to", choices=FORMATS,
                    help="the format to write (default: from --out's extension; .jsonl: pairs, or labelled for labelled data)")
    dc.add_argument("--drop-unreferenced", action="store_true",
                    help="leave out corpus documents no query names (text formats have no line for them)")
    dc.set_defaults(func=cmd_data_convert)
    dm = dsub.add_parser("mine-negatives", help="add hard negatives mined from the base ranking to a dataset",
                         description="For each query, the best-ranked documents of the base that are not its positives, skipping "
                         "near-duplicates of a positive and documents too close in score to the weakest positive. Written into "
                         "the output dataset (hard_negatives), so training on it can be repeated.")
    dm.add_argument("dataset", type=Path, help=DATASET_HELP)
    _add_format_option(dm)
    dm.add_argument("--out", type=Path, required=True, help="dataset to write (format from the extension, or --to)")
    dm.add_argument("--to", choices=["llamaindex", "pairs", "cohere", "csv"], help="the format to write")
    dm.add_argument("--num-negatives", type=positive_int, default=5, help="negatives per query (default 5)")
    dm.add_argument("--range-min", type=non_negative_int, default=0, help="ranks skipped at the top of the base ranking, positives removed (default 0)")
    dm.add_argument("--range-max", type=positive_int, default=50, help="only the first RANGE_MAX ranks are candidates (default 50)")
    dm.add_argument("--max-score", type=float, help="skip candidates scoring above this cosine")
    dm.add_argument("--absolute-margin", type=non_negative_float,
                    help="a negative scores at least this much below the weakest positive (default: no such limit)")
    dm.add_argument("--relative-margin", type=unit_float,
                    help="a negative scores at most (1 - this) times the weakest positive's score (default: no such limit)")
    dm.add_argument("--near-duplicate", type=float, default=0.95,
                    help="skip candidates with a window this similar (cosine) to a positive's window (default 0.95)")
    add_base_options(dm)
    add_cache_options(dm)
    dm.set_defaults(func=cmd_data_mine)

    f = sub.add_parser("finetune", help="fine-tune the whole base model (sentence-transformers) on a dataset",
                       description="SentenceTransformerTrainer with MultipleNegativesRankingLoss (in-batch negatives, batches "
                       "without duplicate texts; the dataset's hard negatives as extra columns) or, for labelled data, "
                       "BatchSemiHardTripletLoss; warmup; evaluated during training with embedlift eval's metrics on a "
                       "held-out split, best checkpoint kept. The result is a sentence-transformers model directory: pass it "
                       "as --base to serve, train adapters on it, or compare it with embedlift eval --finetuned. "
                       "Needs the finetune extra: pip install 'embedlift[finetune]'.")
    f.add_argument("dataset", type=Path, help=DATASET_HELP)
    _add_format_option(f)
    f.add_argument("--out", type=Path, required=True, help="model directory to write")
    _add_validation_options(f)
    f.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the training pairs (default 1)")
    f.add_argument("--lr", type=positive_float, default=2e-5, help="learning rate (default 2e-5)")
    f.add_argument("--train-batch-size", type=positive_int, default=32, help="pairs per batch: each is every other pair's negative (default 32)")
    f.add_argument("--warmup-ratio", type=unit_float, default=0.1, help="fraction of steps of linear learning-rate warmup (default 0.1)")
    f.add_argument("--eval-steps", type=positive_int, help="evaluate (and maybe keep) every N steps (default: once per epoch)")
    f.add_argument("--max-negatives", type=non_negative_int, default=1, help="hard negatives per pair from the dataset, as extra columns (default 1; 0 = none)")
    f.add_argument("--margin", type=non_negative_float, default=0.2, help="cosine margin of the labelled-data triplet loss (default 0.2)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--lexical-language", choices=[*LANGUAGES, "none"], default="english",
                   help="fit the hybrid fusion weight for the fine-tuned model against BM25 in this language (default english; none: no fit)")
    add_base_options(f)
    f.set_defaults(func=cmd_finetune)

    o = sub.add_parser("openapi", help="print (or write) the service's OpenAPI spec")
    o.add_argument("--out", type=Path, help="file to write (default: stdout)")
    o.set_defaults(func=cmd_openapi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 an error the user can fix)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except EmbedliftError as exc:
        _err(f"embedlift: error: {exc.message}")
        return 2
    except KeyboardInterrupt:
        _err("embedlift: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
