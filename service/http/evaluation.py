"""Retrieval evaluation over HTTP (``POST /eval``) and the stored datasets it can name (``GET /datasets``)."""

from __future__ import annotations

from litestar import Controller, Response, get, post
from litestar.params import JSONBody

from embedlift.service.engine import stored_datasets
from embedlift.service.http.jobs import accepted
from embedlift.service.http.state import EngineDep, SettingsDep
from embedlift.service.http.openapi import READ, SECURITY, documented, errors
from embedlift.service.schemas import DatasetList, EvalRequest, EvalResponse, JobAccepted


class EvalController(Controller):
    """Retrieval evaluation over HTTP, and the background jobs that run the large ones."""

    tags = ["eval"]
    opt = READ
    security = SECURITY

    @post("/eval", status_code=200, responses={202: documented(JobAccepted, "a background job (large evaluations)"), **errors(400, 401, 403, 404, 409, 413, 429, 502, 503)})
    async def evaluate(self, data: JSONBody[EvalRequest], engine: EngineDep) -> Response[EvalResponse]:
        """Base vs adapters on a dataset (inline) or on a collection with queries and relevant ids: the same
        metrics and names as ``embedlift eval --json``; ``per_query`` adds each query's rank per model."""
        result = await engine.evaluate(data)
        if isinstance(result, EvalResponse):
            return Response(result)
        return accepted(result)  # type: ignore[return-value]

    @get("/datasets", responses=errors(401, 403))
    async def datasets(self, settings: SettingsDep) -> DatasetList:
        """Stored evaluation datasets (``NAME.json`` in the server's datasets directory), for ``dataset_name``;
        answers while the model loads (it needs only the settings)."""
        return stored_datasets(settings)
