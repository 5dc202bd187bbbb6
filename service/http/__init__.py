"""The HTTP layer: a Litestar app whose controllers, one module per resource, parse a request, call one engine
method and shape the response. ``create_app`` (``app.py``) builds it."""

from embedlift.service.http.app import create_app

__all__ = ["create_app"]
