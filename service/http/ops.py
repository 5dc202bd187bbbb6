"""Liveness, readiness, metrics and the playground's entry: public routes (metrics may need the read key)."""

from __future__ import annotations

import asyncio

from litestar import Controller, Response, get
from litestar.response import Redirect
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from embedlift.service.http.state import EngineDep, ServiceDep
from embedlift.service.http.openapi import SECURITY, errors
from embedlift.service.schemas import Health


class OpsController(Controller):
    """Liveness and readiness; public."""

    tags = ["ops"]

    @get("/", include_in_schema=False)
    async def home(self) -> Redirect:
        """The playground page (the API reference is at /schema)."""
        return Redirect(path="/ui/")

    @get("/health")
    async def health(self, service: ServiceDep) -> Health:
        """Alive; answers while the model is still loading."""
        return Health(status="ok" if service.engine is not None else "loading")

    @get("/ready", responses=errors(503))
    async def ready(self, engine: EngineDep) -> Health:
        """200 once the model, adapters and collections are loaded and the store (when it is PostgreSQL)
        answers; 503 otherwise, so a load balancer sends traffic elsewhere while the database is down."""
        if engine.database is not None:
            await asyncio.to_thread(engine.database.ping)
        return Health(status="ok")


class MetricsController(Controller):
    """Prometheus metrics: requests and latency per route, request sizes, cache hit ratio, active adapter.
    Public unless ``metrics_public`` is off (then the read key)."""

    tags = ["ops"]

    @get("/metrics", opt={"auth": "metrics"}, media_type=CONTENT_TYPE_LATEST, security=[{}, *SECURITY], responses=errors(401, 403))
    async def metrics(self) -> Response[bytes]:
        """Prometheus' text exposition format."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
