"""The Litestar app factory: controllers by resource, one guard, one error handler, the typed state and the
engine as a dependency.

Where a request goes: a controller module of this package (``embeddings``, ``collections``, ``adapters``,
``evaluation``, ``jobs``, ``ops``) parses the body into a msgspec Struct, calls one ``Engine`` method
(``service/engine.py``) and shapes the response; errors from anywhere are rendered by ``errors.handle_error``;
``auth.auth_guard`` checks the key each route's ``opt["auth"]`` asks for.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.plugins.prometheus import PrometheusConfig
from litestar.static_files import create_static_files_router

from embedlift.service.engine import Engine
from embedlift.service.http.adapters import AdaptersController
from embedlift.service.http.auth import auth_guard
from embedlift.service.http.collections import CollectionsController
from embedlift.service.http.embeddings import ADAPTER_HEADER, WINDOWS_HEADER, EmbedController
from embedlift.service.http.errors import handle_error
from embedlift.service.http.evaluation import EvalController
from embedlift.service.http.jobs import JobsController
from embedlift.service.http.openapi import declare_body_rules, openapi_config
from embedlift.service.http.ops import MetricsController, OpsController
from embedlift.service.http.state import STATE_KEY, ServiceState, dependencies
from embedlift.service.http.tei import TEIController
from embedlift.service.settings import Settings

logger = logging.getLogger(__name__)

UI_DIR = Path(__file__).resolve().parent.parent / "static" / "ui"

# Seconds a thread may hold the GIL while another waits for it (Python's default: 0.005). The batch worker
# needs the GIL for a few lines between the model's native calls, which release it; with the event loop busy in
# Python it waited up to 5 ms each time. At 0.1 ms, 32 clients x 1 query measured 1.15x the queries/s of the
# default (alternated server starts, one session; 64 queries a request and upserts unchanged).
SWITCH_INTERVAL = 0.0001


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> Litestar:
    """Build the app. With ``engine`` given it is ready at once; otherwise the engine loads in a thread at
    start-up, so ``/health`` answers (and ``/ready`` says 503) while the model, adapters and collections load."""
    settings = settings or Settings.from_sources()
    service = ServiceState(settings=settings, engine=engine)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Blocking work runs on this pool: searches, store reads and writes, the tokenising of a large request,
        # and synchronous upserts, which wait on the batcher from their thread (``Engine._offload``). An embed
        # request awaits the batcher on the loop and holds no thread. The pool is sized for every admitted request
        # at once, plus a few for the routes outside admission: asyncio's default pool (cpu + 4 threads) would
        # leave requests queued for a thread on a small machine.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=settings.max_concurrent + 8, thread_name_prefix="embedlift")
        )
        task = asyncio.create_task(load(service)) if service.engine is None else None
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            yield
        finally:
            sys.setswitchinterval(switch_interval)
            if task is not None and not task.done():
                task.cancel()
            if service.engine is not None:
                service.engine.close()
            gc.unfreeze()  # what loading froze (``load``) is the collector's again: it may be garbage now

    prometheus = PrometheusConfig(app_name="embedlift", prefix="embedlift", group_path=True, exclude=["/metrics"])
    app = Litestar(
        route_handlers=[
            OpsController, MetricsController, EmbedController, TEIController, CollectionsController, EvalController, JobsController, AdaptersController,
            # the playground: static files calling the public API with the keys the user types (so no auth here)
            create_static_files_router(path="/ui", directories=[UI_DIR], html_mode=True, include_in_schema=False, name="ui"),
        ],
        state=State({STATE_KEY: service}),
        dependencies=dependencies(service),
        lifespan=[lifespan],
        # With no key configured every route is open: no guard at all (Litestar copies the route handler for
        # each guard call, about 1.5% of the event loop's time per request under 32 clients)
        guards=[auth_guard] if settings.api_key or settings.admin_key else [],
        middleware=[prometheus.middleware],
        exception_handlers={Exception: handle_error},
        request_max_body_size=settings.max_body_bytes,
        cors_config=cors_config(settings),
        openapi_config=openapi_config(),
        # logging is the process's (`embedlift serve` configures it once): Litestar's own config would replace
        # the root handlers with a queue of its own format
        logging_config=None,
    )
    declare_body_rules(app)
    return app


async def load(service: ServiceState) -> None:
    """Load the engine off the event loop; a failure is kept and surfaced by /ready and every route."""
    try:
        service.engine = await asyncio.to_thread(Engine.from_settings, service.settings)
        # What loading made (the model, the tokenizer, torch's and OpenVINO's modules: about 500k objects) lives
        # as long as the engine: kept out of the collector's full passes, each of which otherwise stopped every
        # thread for about 0.3 s (32 clients' p99 was 290 ms with them, 45 ms without; ``benchmarks/serving.py``).
        gc.freeze()
        logger.info("ready: base %s", service.engine.base.fingerprint)
    except Exception as exc:
        logger.exception("failed to load the engine")
        service.load_error = str(exc)


def cors_config(settings: Settings) -> CORSConfig | None:
    """CORS only when origins are configured: by default no CORS headers, so a page on another site cannot
    read responses in a user's browser."""
    if not settings.cors_origins:
        return None
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    return CORSConfig(
        allow_origins=origins, allow_methods=["GET", "POST", "PUT", "DELETE"], allow_headers=["Authorization", "Content-Type"],
        expose_headers=[ADAPTER_HEADER, WINDOWS_HEADER, "Retry-After"],
    )
