"""One frozen settings object for the service, filled from `embedlift serve` flags and `EMBEDLIFT_*` env.

A flag wins over the environment, which wins over the default (as infinity's ``EngineArgs``). Every value is
converted to its field's type and checked against its bounds when it is read (``models/options.py``): a bad one
is one line naming the flag or variable, the value and what is allowed, never a traceback. The base model's
settings are a ``BaseSpec`` (``models/spec.py``), read by the same option group as every other command's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta

from embedlift.models.errors import InvalidInputError
from embedlift.models.options import SettingError, env_name, read_fields
from embedlift.models.spec import BaseSpec

Positive = Annotated[int, Meta(ge=1)]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Service settings; each field ``x_y`` is also read from ``EMBEDLIFT_X_Y``.

    Attributes:
        base: The base model and how it runs (``--base``, ``--query-prompt``, ...; see ``BaseSpec``). Identity
            fields left unset are taken from the adapter the server activates.
        openai_api_key: A remote base's key (else ``$OPENAI_API_KEY``).
        host: Interface to bind.
        port: Port to bind.
        data_dir: Where the service keeps its state (base-embedding cache, collections, registry).
        store: Where collections live: ``postgresql://USER[:PASSWORD]@HOST:PORT/DB`` (PostgreSQL 14+ with
            pgvector 0.8+, shared by every replica pointed at it), or ``None`` for the embedded store under
            ``data_dir``. Never shown with its password.
        store_pool: Connections to the store at most.
        store_timeout: Seconds a request waits for the store before it answers 503 (with Retry-After).
        job_lease: Seconds a replica's background job goes without its heartbeat (every 5 s) before another
            replica takes it over (PostgreSQL store).
        cache_store: Where background work's base-embedding cache lives: ``local`` (a SQLite file under
            ``data_dir``) or ``store`` (the PostgreSQL store, shared by the fleet: each text embedded once).
        adapters_dir: Directory of adapter checkpoints (one sub-directory each).
        datasets_dir: Stored evaluation datasets (``NAME.json``) that ``POST /eval`` may name as
            ``dataset_name`` (default ``data_dir/datasets``); nothing outside it is read.
        adapter: Adapter to activate at start (overrides the remembered one).
        api_key: Bearer key for read routes (embed, search, eval); ``None`` = open.
        admin_key: Bearer key for mutating routes (collections, adapters); ``None`` = open.
        max_inputs: Inputs per request (OpenAI's limit: 2048).
        max_request_tokens: Tokens per embedding request, all inputs together as the base tokenises them: the
            real bound on a request's size (LangChain sends up to 1000 texts a request).
        max_input_chars: Characters per input.
        max_body_bytes: Request body size (JSON routes).
        max_upload_bytes: Size of a checkpoint tar uploaded to ``POST /adapters``.
        max_batch_inputs: Inputs the dynamic batcher hands the model per call, from all waiting requests. Large
            enough that the token budget binds first for short questions (256 of about 16 tokens fill 4096): the
            inputs of one call are sorted by length together, so a wider call pads less (64 questions a request
            from 4 clients measured 1.15x the queries/s of a cap of 64).
        max_batch_tokens: Tokens the dynamic batcher hands the model per call (default: the base's own
            forward-pass budget, ``--batch-tokens``), as TEI's ``max-batch-tokens``.
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
        keep_alive_timeout: Seconds an idle keep-alive connection stays open. Longer than what sits in front
            keeps: uvicorn's own 5 s equals httpx's (and so the openai SDK's) pool expiry, and nginx and AWS load
            balancers hold idle upstream connections 60 s, so a request sent on a connection the server is just
            closing fails (nginx answers 502 and does not retry a POST). 75 s, as nginx's own default.
        cors_origins: Comma-separated origins that browsers may call the API from (``*`` = any); ``None`` =
            CORS off (no CORS headers, so browsers keep other sites' pages out).
    """

    base: BaseSpec = field(default_factory=BaseSpec)
    openai_api_key: str | None = field(default=None, repr=False)  # secrets stay out of reprs and logs
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 8080
    data_dir: Path = Path("data")
    store: str | None = field(default=None, repr=False)  # may hold a password
    store_pool: Positive = 10
    store_timeout: Annotated[float, Meta(gt=0)] = 5.0
    cache_store: Literal["local", "store"] = "local"
    job_lease: Annotated[float, Meta(ge=1)] = 30.0
    adapters_dir: Path = Path("adapters")
    datasets_dir: Path | None = None
    adapter: str | None = None
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)
    max_inputs: Positive = 2048
    max_request_tokens: Positive = 300_000
    max_input_chars: Positive = 65_536
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024 * 1024
    max_upload_bytes: Annotated[int, Meta(ge=1024)] = 1 << 30
    max_batch_inputs: Positive = 256
    max_batch_tokens: Positive | None = None
    max_queued_inputs: Positive = 2048
    cache_mb: Annotated[int, Meta(ge=0)] = 256
    max_k: Positive = 1000
    max_documents: Positive = 10_000
    max_concurrent: Positive = 256
    sync_upsert_documents: Annotated[int, Meta(ge=0)] = 256
    sync_eval_texts: Annotated[int, Meta(ge=0)] = 4096
    upsert_batch: Positive = 256
    watch_interval: Annotated[float, Meta(ge=0)] = 2.0
    metrics_public: bool = True
    access_log: bool = False
    keep_alive_timeout: Annotated[int, Meta(ge=1)] = 75
    cors_origins: str | None = None

    def __post_init__(self) -> None:
        if self.cache_store == "store" and self.store is None:
            raise SettingError(f"{env_name('cache_store')}=store needs a PostgreSQL store: set {env_name('store')} (or --store)")
        if self.store is not None:
            try:
                from embedlift.service.database import check_url

                check_url(self.store)
            except ImportError:
                raise SettingError(f"{env_name('store')}: a PostgreSQL store needs the driver: pip install 'embedlift[postgres]'") from None
            except InvalidInputError as exc:
                raise SettingError(f"{env_name('store')} / --store: {exc.message}") from None
        if self.max_queued_inputs < self.max_batch_inputs:
            raise SettingError(
                f"{env_name('max_queued_inputs')}={self.max_queued_inputs} is less than {env_name('max_batch_inputs')}="
                f"{self.max_batch_inputs}: the queue must hold at least one batch"
            )

    @property
    def datasets_path(self) -> Path:
        return self.datasets_dir if self.datasets_dir is not None else self.data_dir / "datasets"

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Flags (keyed by field name; ``None`` = not given) over ``EMBEDLIFT_*`` environment variables over defaults.

        Raises:
            SettingError: A value that does not fit, naming the flag or variable, the value and what is allowed.
        """
        values = read_fields(cls, flags, env, skip=("base",))
        return cls(base=BaseSpec.from_sources(flags, env), **values)
