"""One frozen settings object for the service, filled from `embedlift serve` flags and `EMBEDLIFT_*` env.

A flag wins over the environment, which wins over the default (as infinity's ``EngineArgs``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


# Fields whose default is ``None`` but whose value is not a string: how to read them from a flag or the env.
OPTIONAL_TYPES: dict[str, type] = {"dimensions": int, "threads": int, "datasets_dir": Path}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Service settings; each field ``x_y`` is also read from ``EMBEDLIFT_X_Y``.

    Attributes:
        base: Base model (local path or hub id); ``None`` = the packaged all-MiniLM-L6-v2.
        base_url: With ``base = "openai:<model>"``: the OpenAI-protocol API root (else ``$OPENAI_BASE_URL``).
        openai_api_key: The remote's key (else ``$OPENAI_API_KEY``).
        dimensions: With a remote base: ask for shorter vectors.
        backend: How a local base runs: ``torch`` (float32) or ``int8`` (faster on CPU, vectors differ a little).
        allow_backend_mismatch: Serve adapters trained on another backend of the same model (with a warning).
        threads: torch threads for the base (default: the cores this process may run on).
        host: Interface to bind.
        port: Port to bind.
        data_dir: Where the service keeps its state (base-embedding cache, collections, registry).
        adapters_dir: Directory of adapter checkpoints (one sub-directory each).
        datasets_dir: Stored evaluation datasets (``NAME.json``) that ``POST /eval`` may name as
            ``dataset_name`` (default ``data_dir/datasets``); nothing outside it is read.
        adapter: Adapter to activate at start (overrides the remembered one).
        api_key: Bearer key for read routes (embed, search, eval); ``None`` = open.
        admin_key: Bearer key for mutating routes (collections, adapters); ``None`` = open.
        max_inputs: Inputs per request.
        max_input_chars: Characters per input.
        max_body_bytes: Request body size (JSON routes).
        max_upload_bytes: Size of a checkpoint tar uploaded to ``POST /adapters``.
        batch_size: Texts per forward pass of the base (sentence-transformers' mini-batch).
        max_batch_inputs: Inputs the dynamic batcher hands the model per call, from all waiting requests.
        max_queued_inputs: Inputs waiting for the model at most; a request beyond it gets 429 with Retry-After.
        cache_mb: Size of the in-memory cache of base vectors on the request path (0 = off). Background
            work (upserts, evaluations) uses the persistent cache under ``data_dir`` instead.
        max_k: Largest ``k`` a search may ask for.
        max_documents: Documents per upsert request.
        max_concurrent: Requests doing model work at once; one more gets 429 with Retry-After.
        sync_upsert_documents: Upserts with more documents run as a background job (202 + ``/jobs/{id}``).
        sync_eval_texts: Evaluations embedding more texts (queries + documents) run as a background job.
        upsert_batch: Documents embedded and committed per step of an upsert.
        watch_interval: Seconds between scans of the adapters directory for new checkpoints (0 = off).
        metrics_public: ``False`` puts ``/metrics`` behind the read key.
        access_log: Log every request (off: Prometheus counts them, and a log line each costs throughput).
        cors_origins: Comma-separated origins that browsers may call the API from (``*`` = any); ``None`` =
            CORS off (no CORS headers, so browsers keep other sites' pages out).
    """

    base: str | None = None
    base_url: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)  # secrets stay out of reprs and logs
    dimensions: int | None = None
    backend: str = "torch"
    allow_backend_mismatch: bool = False
    threads: int | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data")
    adapters_dir: Path = Path("adapters")
    datasets_dir: Path | None = None
    adapter: str | None = None
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)
    max_inputs: int = 256
    max_input_chars: int = 65_536
    max_body_bytes: int = 16 * 1024 * 1024
    max_upload_bytes: int = 1 << 30
    batch_size: int = 32
    max_batch_inputs: int = 64
    max_queued_inputs: int = 2048
    cache_mb: int = 256
    max_k: int = 1000
    max_documents: int = 10_000
    max_concurrent: int = 256
    sync_upsert_documents: int = 256
    sync_eval_texts: int = 4096
    upsert_batch: int = 256
    watch_interval: float = 2.0
    metrics_public: bool = True
    access_log: bool = False
    cors_origins: str | None = None

    @property
    def datasets_path(self) -> Path:
        return self.datasets_dir if self.datasets_dir is not None else self.data_dir / "datasets"

    @classmethod
    def from_sources(cls, flags: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
        """Flags (``None`` = not given) over ``EMBEDLIFT_*`` environment variables over defaults."""
        env = dict(os.environ) if env is None else env
        flags = flags or {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = flags.get(f.name)
            if raw is None:
                raw = env.get(f"EMBEDLIFT_{f.name.upper()}") or None
            if raw is None:
                continue
            default = f.default
            if f.name in OPTIONAL_TYPES:  # default None: the type cannot be read off the default
                values[f.name] = OPTIONAL_TYPES[f.name](raw)
                continue
            if isinstance(default, bool):
                values[f.name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            elif isinstance(default, Path):
                values[f.name] = Path(raw)
            else:
                values[f.name] = raw
        return cls(**values)
