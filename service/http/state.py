"""What the app holds while it serves, typed, and the dependencies controllers declare (``engine``, ``settings``).

The engine loads in a thread at start-up, so ``/health`` answers (and ``/ready`` says 503) while the model,
adapters and collections load; until then a route that needs the engine answers 503 through its dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar.di import NamedDependency, Provide

from embedlift.models.errors import UnavailableError
from embedlift.service.engine import Engine
from embedlift.service.settings import Settings

STATE_KEY = "service"


@dataclass
class ServiceState:
    """The settings, and the engine once loaded (or why loading failed)."""

    settings: Settings
    engine: Engine | None = None
    load_error: str | None = None

    @classmethod
    def of(cls, app: Litestar) -> ServiceState:
        state: ServiceState = app.state[STATE_KEY]
        return state

    def require_engine(self) -> Engine:
        """The loaded engine, or a 503 while the model is still loading (or failed to)."""
        if self.engine is None:
            if self.load_error:
                raise UnavailableError(f"the service failed to load: {self.load_error}")
            raise UnavailableError("the model is still loading; retry when /ready answers 200", retry_after=1)
        return self.engine


def dependencies(service: ServiceState) -> dict[str, Any]:
    """``engine``, ``settings`` and ``service``, for any handler that names them."""

    def provide_engine() -> Engine:
        return service.require_engine()

    def provide_settings() -> Settings:
        return service.settings

    def provide_service() -> ServiceState:
        return service

    return {
        "engine": Provide(provide_engine, sync_to_thread=False),
        "settings": Provide(provide_settings, sync_to_thread=False),
        "service": Provide(provide_service, sync_to_thread=False),
    }


# What handlers declare (explicitly: Litestar 3 drops inferred dependencies).
EngineDep = NamedDependency[Engine]
SettingsDep = NamedDependency[Settings]
ServiceDep = NamedDependency[ServiceState]
