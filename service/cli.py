"""The ``embedlift`` command line: one entry point for training, evaluation and serving.

Each sub-command is a small function over the library; errors embedlift raises on purpose
(``EmbedliftError``) print as one line on stderr with exit code 2, never a traceback. Results go to stdout
(``eval --json`` prints exactly the JSON and nothing else); progress and counts go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedlift.models.errors import EmbedliftError, InvalidInputError


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- options
def _add_base_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--base", help="local model directory or hub id (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--query-prompt", help="instruction prefixed to queries (bge-style); default: the model's own")
    g.add_argument("--document-prompt", help="instruction prefixed to documents; default: the model's own")
    g.add_argument("--max-seq-length", type=int, help="override the model's token limit")
    g.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    g.add_argument("--window-tokens", type=int, help="tokens per window of a long text (default: the model's limit)")
    g.add_argument("--window-stride", type=int, help="tokens between window starts (default: 3/4 of the window)")
    g.add_argument("--backend", choices=["torch", "int8"], default="torch",
                   help="torch: float32 (default); int8: dynamic int8 quantization, faster on CPU, vectors differ a little")
    g.add_argument("--threads", type=int, help="torch threads (default: the cores this process may use)")
    g.add_argument("--cache", type=Path, help="base-embedding cache file (default: $EMBEDLIFT_CACHE or ~/.cache/embedlift/)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the base-embedding cache")
    r = p.add_argument_group("remote base (--base openai:<model>)")
    r.add_argument("--base-url", help="OpenAI-protocol API root, e.g. http://127.0.0.1:8080/v1 (default: $OPENAI_BASE_URL or OpenAI)")
    r.add_argument("--openai-api-key", help="API key of the remote (default: $OPENAI_API_KEY)")
    r.add_argument("--dimensions", type=int, help="ask the remote for shorter vectors (text-embedding-3-*)")
    r.add_argument("--remote-max-input-tokens", type=int, help="the remote's per-input token limit (default 8191)")
    r.add_argument("--tokenizer", help="local Hugging Face tokenizer to cut windows with (default: a character budget)")


def _encoder(args: argparse.Namespace, recorded: dict[str, Any] | None = None, *, backend: str | None = None):
    """The cached base encoder the options name; ``recorded`` (a checkpoint's base details) fills gaps;
    ``backend`` overrides ``--backend``."""
    from embedlift.models.cache import CachedEncoder, EmbeddingCache, default_cache_path
    from embedlift.models.encoders import load_encoder

    rec = recorded or {}

    def pick(option: str, key: str) -> Any:
        value = getattr(args, option)
        return value if value is not None else rec.get(key)

    base = args.base if args.base is not None else rec.get("source")
    encoder = load_encoder(
        base,
        query_prompt=pick("query_prompt", "query_prompt"),
        document_prompt=pick("document_prompt", "document_prompt"),
        max_seq_length=pick("max_seq_length", "max_seq_length"),
        batch_size=args.batch_size,
        window_tokens=pick("window_tokens", "window_tokens"),
        window_stride=pick("window_stride", "window_stride"),
        base_url=pick("base_url", "base_url"),
        api_key=args.openai_api_key,
        dimensions=pick("dimensions", "dimensions"),
        max_input_tokens=pick("remote_max_input_tokens", "max_input_tokens"),
        tokenizer=pick("tokenizer", "tokenizer"),
        backend=backend or args.backend,
        threads=args.threads,
    )
    cache = None if args.no_cache else EmbeddingCache(args.cache or default_cache_path())
    return CachedEncoder(encoder, cache)


def _embed(encoder, ds, label: str, *, windows: bool = True):
    from embedlift.training.retrieval import embed_dataset

    before = (encoder.stats.cached, encoder.stats.computed)
    data = embed_dataset(encoder, ds, windows=windows)
    cached, computed = encoder.stats.cached - before[0], encoder.stats.computed - before[1]
    how = (
        f"{data.docs.n_windowed} of {data.docs.n_docs} documents longer than the model's window were split "
        f"into windows ({len(data.docs.spans)} windows)"
        if windows
        else "documents embedded whole: the model TRUNCATES those longer than its window (--truncate)"
    )
    _err(f"{label}: {ds.summary()}; base embeddings: {cached} cached, {computed} computed; {how}")
    return data


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise InvalidInputError(f"--k must be a comma-separated list of positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise InvalidInputError(f"--k must be a comma-separated list of positive integers, got {text!r}")
    return ks


# --------------------------------------------------------------------------------------------- commands
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


def _train_val(args: argparse.Namespace):
    """(train, validation, how validation was chosen) from the dataset options; labelled data is split by
    label and validated as the retrieval task its held-out texts define."""
    from embedlift.training.dataset import split
    from embedlift.training.formats import LabelledDataset, read_dataset

    ds = read_dataset(args.dataset, args.format)
    if args.val is not None:
        val_ds, val_how = read_dataset(args.val, args.format), f"file {args.val}"
        if type(val_ds) is not type(ds):
            raise InvalidInputError(f"{args.val} and {args.dataset} must both be labelled data, or both queries and passages")
        train_ds = ds
    elif isinstance(ds, LabelledDataset):
        train_ds, val_ds = ds.split(args.val_fraction, seed=args.seed)
        val_how = f"{args.val_fraction:.0%} of each label of {args.dataset} held out"
    else:
        train_ds, val_ds = split(ds, args.val_fraction, by=args.val_split, seed=args.seed)
        val_how = f"{args.val_fraction:.0%} of {args.dataset} held out by {args.val_split}"
        if not train_ds.queries or not val_ds.queries:
            raise InvalidInputError(
                f"{args.dataset} is too small to hold out {args.val_fraction:.0%} by {args.val_split} "
                "for validation; pass --val FILE or a larger --val-fraction"
            )
    if isinstance(val_ds, LabelledDataset):
        val_ds = val_ds.to_retrieval(seed=args.seed)
        if not val_ds.queries:
            raise InvalidInputError(f"the validation texts ({val_how}) have no label with two texts; pass --val FILE or a larger --val-fraction")
    return train_ds, val_ds, val_how


def cmd_train(args: argparse.Namespace) -> int:
    from embedlift.models.checkpoint import BaseInfo, save_checkpoint
    from embedlift.training.fit import FitSettings, fit_adapter
    from embedlift.training.formats import LabelledDataset
    from embedlift.training.retrieval import embed_labelled

    from embedlift.models.adapters import ENTRY_POINT_GROUP, adapter_kinds

    if args.kind not in (kinds := adapter_kinds()):  # before minutes of embedding, not after
        raise InvalidInputError(f"--kind must be one of {sorted(kinds)} (custom kinds: an installed package's {ENTRY_POINT_GROUP!r} entry point), got {args.kind!r}")
    train_ds, val_ds, val_how = _train_val(args)
    labelled = isinstance(train_ds, LabelledDataset)
    # labelled texts are both what is searched for and what is searched: the adapter must move both sides
    apply_to = args.apply_to or ("both" if labelled else "query")
    settings = FitSettings(
        kind=args.kind, apply_to=apply_to, bias=args.bias, hidden_dim=args.hidden_dim, options=_options(args.option),
        loss=args.loss, margin=args.margin, epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr,
        temperature=args.temperature, anchor=args.anchor, patience=args.patience, seed=args.seed,
    )
    encoder = _encoder(args)
    if labelled:
        train = embed_labelled(encoder, train_ds)
        _err(f"train: {train_ds.summary()} (labelled: batch semi-hard triplet loss, margin {settings.margin})")
    else:
        train = _embed(encoder, train_ds, "train")
        if settings.loss == "triplet" and not train_ds.hard_negatives:
            _err("train: the dataset has no hard negatives; the triplet loss uses each query's hardest candidate "
                 "(embedlift data mine-negatives writes them into the dataset)")
    val = _embed(encoder, val_ds, f"validation ({val_how})")
    result = fit_adapter(train, val, settings)
    _err(f"trained in {result.seconds:.1f}s: {result.summary()}")
    base = BaseInfo(name=encoder.name, fingerprint=encoder.fingerprint, dim=encoder.dim, details=encoder.describe())
    config = save_checkpoint(
        result.adapter,
        args.out,
        base=base,
        name=args.name,
        training={**settings.to_dict(), "dataset": str(args.dataset), "validation": val_how, "labelled": labelled,
                  "train_size": len(train_ds.texts) if labelled else len(train_ds.queries), "val_queries": len(val_ds.queries)},
        metrics={"improved": result.improved, "best_epoch": result.best_epoch, "seconds": result.seconds,
                 "base_val": result.base_val, "val": result.val, "history": result.history},
    )
    _err(f"saved adapter {config.name!r} to {args.out}")
    return 0


def _eval_dataset(args: argparse.Namespace):
    """The dataset to evaluate on, any format; labelled data as the retrieval task it defines."""
    from embedlift.training.formats import LabelledDataset, read_dataset

    ds = read_dataset(args.dataset, args.format)
    if isinstance(ds, LabelledDataset):
        qa = ds.to_retrieval()
        _err(f"{args.dataset}: labelled data ({ds.summary()}): each label's held-out half searches for its other half")
        return qa
    return ds


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from embedlift.models.checkpoint import load_checkpoint, read_config
    from embedlift.models.errors import BaseMismatchError
    from embedlift.training.evaluate import compare_runs
    from embedlift.training.report import comparison_table, write_report

    ks = _ks(args.k)
    ds = _eval_dataset(args)
    configs = [read_config(p) for p in args.adapter]
    recorded = None
    if configs and args.base is None:
        fingerprints = {c.base.fingerprint for c in configs}
        if len(fingerprints) > 1:
            listing = ", ".join(f"{p} -> {c.base.name} ({c.base.fingerprint})" for p, c in zip(args.adapter, configs))
            raise BaseMismatchError(f"the adapters were trained on different bases ({listing}); compare adapters of one base, or pass --base")
        recorded = configs[0].base.details
    encoder = _encoder(args, recorded)
    # Another backend than torch: the float32 run comes first, so each row's delta shows what the backend
    # costs; adapters trained on float32 are evaluated on the other backend too (that is the question asked).
    runs = [("", _encoder(args, recorded, backend="torch")), (args.backend, encoder)] if args.backend != "torch" else [("", encoder)]
    checkpoints = [
        load_checkpoint(p, expected_fingerprint=encoder.fingerprint, allow_backend_mismatch=args.backend != "torch")
        for p in args.adapter
    ]
    embedded = [(label, _embed(enc, ds, f"eval [{label or 'torch'}]", windows=not args.truncate)) for label, enc in runs]
    models = []
    for path in args.finetuned:  # a fine-tuned base: its own encoder, every other option as for the base
        name = path.resolve().name
        tuned = _encoder(argparse.Namespace(**{**vars(args), "base": str(path)}), recorded)
        models.append((name, _embed(tuned, ds, f"eval [{name}]", windows=not args.truncate)))
    comparison = compare_runs(embedded, checkpoints, ks, models=models)
    if args.json:
        sys.stdout.write(json.dumps(comparison.to_json(), indent=2) + "\n")
    else:
        Console().print(comparison_table(comparison, title=f"{args.dataset} ({ds.summary()}, base {encoder.name})"))
        if checkpoints or models:
            print("cells: value, delta vs base, [paired bootstrap 95% interval of the delta]")
    if args.report:
        _err(f"report written to {write_report(comparison, args.report)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import signal

    import uvicorn

    from embedlift.service.app import create_app
    from embedlift.service.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    settings = Settings.from_sources(flags)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn drains in-flight requests on SIGTERM, then restores the previous handler and re-raises the
    # signal; this handler makes that drained stop exit 0 (what container runtimes read as clean).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level="info",
        access_log=settings.access_log, timeout_graceful_shutdown=30,
        # loop/http "auto" (uvicorn's default) pick uvloop and httptools, which the project depends on: the C
        # event loop and HTTP parser take a third off the per-request cost.
    )
    return 0


def cmd_import_llamaindex(args: argparse.Namespace) -> int:
    from embedlift.models.checkpoint import BaseInfo, save_checkpoint
    from embedlift.models.llamaindex import read_llamaindex_adapter

    adapter = read_llamaindex_adapter(args.source, apply_to=args.apply_to)  # refused before the base loads
    encoder = _encoder(args)
    if encoder.dim != adapter.config.dim:
        raise InvalidInputError(f"the adapter maps {adapter.config.dim} dimensions but the base {encoder.name} has {encoder.dim}; pass the --base it was trained on")
    base = BaseInfo(name=encoder.name, fingerprint=encoder.fingerprint, dim=encoder.dim, details=encoder.describe())
    config = save_checkpoint(adapter, args.out, base=base, name=args.name, training={"imported_from": "llamaindex", "source": str(args.source)})
    _err(f"imported {args.source} as {config.kind} adapter {config.name!r} for {base.fingerprint} -> {args.out}")
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from embedlift.models.errors import NotFoundError
    from embedlift.service.collections import STORE_FILE, DocumentStore, check_name, reindex_store

    check_name(args.collection)
    path = args.data_dir / "collections" / args.collection / STORE_FILE
    if not path.is_file():
        raise NotFoundError(f"no collection {args.collection!r} under {args.data_dir / 'collections'}")
    encoder = _encoder(args)
    store = DocumentStore(path)
    try:
        before = store.read_config().base_fingerprint
        docs, _ = store.count()
        _err(f"re-embedding {docs} documents of {args.collection!r} with {encoder.inner.name}")
        config, windows = reindex_store(store, encoder)
    finally:
        store.close()
    _err(f"{args.collection}: {docs} documents, {windows} windows; base {before} -> {config.base_fingerprint}")
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
    from embedlift.training.formats import read_qa_dataset, write_dataset
    from embedlift.training.negatives import MiningSettings, mine

    settings = MiningSettings(
        num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max, max_score=args.max_score,
        absolute_margin=args.absolute_margin, relative_margin=args.relative_margin, near_duplicate=args.near_duplicate,
    )
    ds = read_qa_dataset(args.dataset, args.format)
    data = _embed(_encoder(args), ds, "mining")
    mined, report = mine(ds, data, settings)
    fmt = write_dataset(mined, args.out, args.to)
    _err(f"{report.summary()}; written to {args.out} ({fmt})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from embedlift.training.finetune import FinetuneSettings, finetune

    train_ds, val_ds, val_how = _train_val(args)
    settings = FinetuneSettings(
        epochs=args.epochs, lr=args.lr, batch_size=args.train_batch_size, warmup_ratio=args.warmup_ratio,
        eval_steps=args.eval_steps, max_negatives=args.max_negatives, margin=args.margin,
        max_seq_length=args.max_seq_length, seed=args.seed,
    )
    _err(f"validation: {val_how} ({val_ds.summary()})")
    result = finetune(args.base, train_ds, val_ds, args.out, settings)
    _err(f"fine-tuned in {result.seconds:.1f}s: {result.summary()}; model written to {args.out} (use it as --base)")
    return 0


def spec_bytes() -> bytes:
    """The app's OpenAPI spec, formatted as it is committed in openapi/openapi.json."""
    import msgspec

    from embedlift.service.app import create_app
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
    p.add_argument("--format", choices=["llamaindex", "pairs", "cohere", "labelled", "csv"],
                   help="the dataset's format (default: from the extension and, for .jsonl, the first line's keys)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedlift", description="Adapters over frozen embedding models: train, evaluate, serve."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    t.add_argument("--hidden-dim", type=int, help="hidden width of mlp (default: the base dimension)")
    t.add_argument("--loss", choices=["ranking", "triplet"], default="ranking",
                   help="ranking: softmax over the candidates (default); triplet: margin against hard negatives")
    t.add_argument("--margin", type=float, default=0.2, help="cosine margin of the triplet losses (default 0.2)")
    v = t.add_mutually_exclusive_group()
    v.add_argument("--val", type=Path, help="validation dataset file (default: hold out part of DATASET)")
    v.add_argument("--val-fraction", type=float, default=0.1, help="fraction held out for validation (default 0.1)")
    t.add_argument("--val-split", choices=["query", "document"], default="document",
                   help="hold out by document (unseen documents, default) or by query")
    t.add_argument("--epochs", type=int, default=30, help="maximum epochs; early stopping picks the best (default 30)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--train-batch-size", type=int, default=32, help="pairs per step (default 32)")
    t.add_argument("--temperature", type=float, default=0.05)
    t.add_argument("--anchor", type=float, default=0.1, help="pull of the weights towards the identity (default 0.1)")
    t.add_argument("--patience", type=int, default=5)
    t.add_argument("--seed", type=int, default=0)
    _add_base_options(t)
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
    _add_base_options(e)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("serve", help="serve /embed, /v1/embeddings and the adapters over HTTP",
                       description="Every option is also read from EMBEDLIFT_<OPTION> (e.g. EMBEDLIFT_PORT).")
    s.add_argument("--base", help="local model directory or hub id (default: the packaged all-MiniLM-L6-v2)")
    s.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8080)")
    s.add_argument("--data-dir", type=Path, help="service state: base-embedding cache, collections (default ./data)")
    s.add_argument("--adapters-dir", type=Path, help="adapter checkpoints, one sub-directory each (default ./adapters)")
    s.add_argument("--datasets-dir", type=Path, help="stored evaluation datasets for POST /eval dataset_name (default DATA_DIR/datasets)")
    s.add_argument("--base-url", help="with --base openai:<model>: the OpenAI-protocol API root (default: $OPENAI_BASE_URL)")
    s.add_argument("--dimensions", type=int, help="with --base openai:<model>: ask for shorter vectors")
    s.add_argument("--adapter", help="adapter to activate at start")
    s.add_argument("--api-key", help="Bearer key for read routes (prefer EMBEDLIFT_API_KEY: flags show in `ps`)")
    s.add_argument("--admin-key", help="Bearer key for mutating routes (prefer EMBEDLIFT_ADMIN_KEY)")
    s.add_argument("--backend", choices=["torch", "int8"], help="torch: float32 (default); int8: faster on CPU, vectors differ a little")
    s.add_argument("--allow-backend-mismatch", action="store_true", default=None,
                   help="serve adapters trained on another backend of the same model (a warning each)")
    s.add_argument("--threads", type=int, help="torch threads (default: the cores this process may use)")
    s.add_argument("--max-concurrent", type=int, help="requests doing model work at once; more get 429 (default 256)")
    s.add_argument("--max-batch-inputs", type=int, help="inputs per model call, from all waiting requests (default 64)")
    s.add_argument("--max-queued-inputs", type=int, help="inputs waiting for the model; more get 429 (default 2048)")
    s.add_argument("--cache-mb", type=int, help="in-memory cache of base vectors for requests, MB; 0 = off (default 256)")
    s.add_argument("--access-log", action="store_true", default=None, help="log every request (off by default: it costs throughput)")
    s.add_argument("--cors-origins", help="comma-separated origins browsers may call from (* = any); default: CORS off")
    s.add_argument("--watch-interval", type=float,
                   help="seconds between scans of the adapters directory for new checkpoints; 0 = off (default 2)")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("reindex", help="re-embed a collection's stored texts with another base (e.g. after changing --base)",
                       description="Run while the server is stopped (a running server does the same with POST "
                       "/collections/NAME/reindex). Reads the texts from the collection's store, embeds every window with "
                       "--base, and replaces the stored vectors and the recorded base in one transaction.")
    r.add_argument("collection", help="collection name")
    r.add_argument("--data-dir", type=Path, default=Path("data"), help="the server's data directory (default ./data)")
    _add_base_options(r)
    r.set_defaults(func=cmd_reindex)

    a = sub.add_parser("adapters", help="adapter checkpoints: import from LlamaIndex")
    asub = a.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    li = asub.add_parser("import-llamaindex", help="convert a LlamaIndex adapter (config.json + pytorch_model.bin) to an embedlift checkpoint",
                         description="Reads a LinearLayer or a residual relu TwoLayerNN saved by LlamaIndex's adapter.save() "
                         "(weights read tensors-only, never arbitrary pickle) and writes an embedlift checkpoint computing the "
                         "same function, for the base it was trained on (--base; default the packaged MiniLM).")
    li.add_argument("source", type=Path, help="the LlamaIndex adapter directory")
    li.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (e.g. adapters/NAME)")
    li.add_argument("--name", help="adapter name (default: the --out directory's name)")
    li.add_argument("--apply-to", choices=["query", "both"], default="query",
                    help="query (what LlamaIndex's AdapterEmbeddingModel does) or both")
    _add_base_options(li)
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
    g.add_argument("--questions-per-chunk", type=int, default=2)
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
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dc = dsub.add_parser("convert", help="convert a dataset between formats",
                         description="Formats: llamaindex (.json: queries, corpus, relevant_docs[, hard_negatives]); pairs (.jsonl: "
                         "{query, positive, negative?, negatives?} per line); cohere (.jsonl: {query, relevant_passages, "
                         "hard_negatives?} per line); labelled (.jsonl: {text, label} per line); csv (query,positive[,negative] or "
                         "text,label). Text formats give each distinct text an id (q1, d1, ...).")
    dc.add_argument("source", type=Path, help="the dataset to read")
    dc.add_argument("--out", type=Path, required=True, help="the file to write")
    dc.add_argument("--from", dest="format", choices=["llamaindex", "pairs", "cohere", "labelled", "csv"],
                    help="the source's format (default: detected)")
    dc.add_argument("--to", choices=["llamaindex", "pairs", "cohere", "labelled", "csv"],
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
    dm.add_argument("--num-negatives", type=int, default=5, help="negatives per query (default 5)")
    dm.add_argument("--range-min", type=int, default=0, help="ranks skipped at the top of the base ranking, positives removed (default 0)")
    dm.add_argument("--range-max", type=int, default=50, help="only the first RANGE_MAX ranks are candidates (default 50)")
    dm.add_argument("--max-score", type=float, help="skip candidates scoring above this cosine")
    dm.add_argument("--absolute-margin", type=float,
                    help="a negative scores at least this much below the weakest positive (default: no such limit)")
    dm.add_argument("--relative-margin", type=float,
                    help="a negative scores at most (1 - this) times the weakest positive's score (default: no such limit)")
    dm.add_argument("--near-duplicate", type=float, default=0.95,
                    help="skip candidates with a window this similar (cosine) to a positive's window (default 0.95)")
    _add_base_options(dm)
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
    f.add_argument("--base", help="local model directory or hub id (default: the packaged all-MiniLM-L6-v2)")
    f.add_argument("--out", type=Path, required=True, help="model directory to write")
    fv = f.add_mutually_exclusive_group()
    fv.add_argument("--val", type=Path, help="validation dataset file (default: hold out part of DATASET)")
    fv.add_argument("--val-fraction", type=float, default=0.1, help="fraction held out for validation (default 0.1)")
    f.add_argument("--val-split", choices=["query", "document"], default="document", help="hold out by document (default) or query")
    f.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs (default 1)")
    f.add_argument("--lr", type=float, default=2e-5, help="learning rate (default 2e-5)")
    f.add_argument("--train-batch-size", type=int, default=32, help="pairs per batch: each is every other pair's negative (default 32)")
    f.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps of linear learning-rate warmup (default 0.1)")
    f.add_argument("--eval-steps", type=int, help="evaluate (and maybe keep) every N steps (default: once per epoch)")
    f.add_argument("--max-negatives", type=int, default=1, help="hard negatives per pair from the dataset, as extra columns (default 1; 0 = none)")
    f.add_argument("--margin", type=float, default=0.2, help="cosine margin of the labelled-data triplet loss (default 0.2)")
    f.add_argument("--max-seq-length", type=int, help="token limit while training (default: the model's)")
    f.add_argument("--seed", type=int, default=0)
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
        return args.func(args)
    except EmbedliftError as exc:
        _err(f"embedlift: error: {exc.message}")
        return 2
    except KeyboardInterrupt:
        _err("embedlift: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
