"""embedlift's Python client: ``Client`` / ``AsyncClient`` for every route, the wire types
(``embedlift.client.schemas``, shared with the server), and the exceptions (``embedlift.client.errors``).

    from embedlift.client import Client

    with Client("http://127.0.0.1:8080", api_key="...") as client:
        client.create_collection("docs")
        client.upsert("docs", [{"id": "1", "text": "Lyft's revenue grew 36% in 2021."}])
        hits = client.search("docs", "How fast did revenue grow?", k=3).hits

The LangChain and LlamaIndex integrations are ``embedlift.client.langchain`` and ``embedlift.client.llamaindex``
(extras ``[langchain]`` and ``[llamaindex]``).
"""

from embedlift.client.api import AsyncClient, Client
from embedlift.client.errors import (
    APIError,
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    ConflictError,
    EmbedliftClientError,
    InternalServerError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
)
from embedlift.client.schemas import Document

__all__ = [
    "APIError", "AsyncClient", "AuthenticationError", "BadGatewayError", "BadRequestError", "Client", "ConflictError", "Document",
    "EmbedliftClientError", "InternalServerError", "JobFailedError", "JobTimeoutError", "NotFoundError", "PermissionDeniedError",
    "RateLimitError", "RequestTooLargeError", "ServiceUnavailableError",
]
