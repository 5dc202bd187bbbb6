"""What the OpenAPI spec says beyond what Litestar generates: documented error statuses, optional and
two-content-type bodies, rules across fields and closed bodies, so the spec states exactly what the server does
(schemathesis holds the server to it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Litestar
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.params import Parameter

from embedlift.models.errors import status_table
from embedlift.service.schemas import BODY_RULES, FILTER_SCHEMA, NAME_PATTERN, ErrorBody, OpenAIError, TEIError, closed_bodies

# Collection and adapter names in paths: the pattern is in the spec, and a name outside it is a 400 that shows it.
NamePath = Annotated[str, Parameter(pattern=NAME_PATTERN, description="a collection or adapter name")]
READ = {"auth": "read"}
ADMIN = {"auth": "admin"}
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]
#: Every status a route can answer with, described once (derived from the error tree).
STATUS_TABLE = status_table()


def documented(container: type, description: str) -> ResponseSpec:
    """A response in the spec, without Litestar's generated examples (random values: the spec must be
    the same bytes every time it is built, for the drift test and for clients that diff it)."""
    return ResponseSpec(data_container=container, description=description, generate_examples=False)


def errors(*codes: int, openai: bool = False, tei: bool = False) -> dict[int, ResponseSpec]:
    """The error responses of a route, in the native, OpenAI's or TEI's body shape."""
    body: type = OpenAIError if openai else TEIError if tei else ErrorBody
    return {c: documented(body, STATUS_TABLE[c]) for c in codes}


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="embedlift",
        version="0.1.0",
        description="Adapters over frozen embedding models: embed, search and evaluate.\n\nStatus codes, on every route: "
        + "; ".join(f"{c}: {d}" for c, d in STATUS_TABLE.items()),
        path="/schema",
        render_plugins=[SwaggerRenderPlugin(path="/")],
        components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}),
    )


@dataclass
class OptionalBodyOperation(Operation):
    """A route whose JSON body may be left out (Litestar declares every body required)."""

    def __post_init__(self) -> None:
        if isinstance(self.request_body, RequestBody):
            self.request_body.required = False


@dataclass
class RegisterAdapterOperation(Operation):
    """``POST /adapters`` takes JSON ``{"name"}`` or a tar of the checkpoint directory; declare both."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            description="JSON `{\"name\": ...}` (a directory of the adapters directory), or a tar (optionally "
            "gzipped) of a checkpoint directory: `tar -c -C adapters/NAME . | curl --data-binary @- -H 'Content-Type: application/x-tar'`",
            content={
                "application/json": OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        required=["name"],
                        properties={"name": Schema(type=OpenAPIType.STRING, pattern=NAME_PATTERN)},
                        additional_properties=False,
                    )
                ),
                "application/x-tar": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)),
                "application/gzip": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)),
            },
        )


def _schema(rules: dict[str, Any]) -> Schema | Reference:
    """A JSON Schema written as a dict, as Litestar's spec objects (for a schema Litestar cannot generate)."""
    if "$ref" in rules:
        return Reference(ref=rules["$ref"])
    aliases = Schema().field_aliases()  # JSON Schema keyword -> Schema attribute
    fields: dict[str, Any] = {}
    for key, value in rules.items():
        if key == "properties":
            value = {name: _schema(v) for name, v in value.items()}
        elif key in ("items", "additionalProperties", "propertyNames") and isinstance(value, dict):
            value = _schema(value)
        elif key in ("oneOf", "anyOf", "allOf"):
            value = [_schema(v) for v in value]
        elif key == "type":
            value = OpenAPIType(value)
        fields[aliases.get(key, key)] = value
    return Schema(**fields)


def declare_body_rules(app: Litestar) -> None:
    """What Litestar's schema generation leaves out of the request bodies: the recursive ``Filter`` schema of
    searches, ``additionalProperties: false`` on bodies that refuse unknown fields, and the rules across fields
    (``BODY_RULES``)."""
    components = app.openapi_schema.components.schemas or {}
    filter_schema = _schema(FILTER_SCHEMA)
    assert isinstance(filter_schema, Schema)
    components["Filter"] = filter_schema
    search = components["SearchRequest"]
    assert isinstance(search, Schema) and search.properties is not None
    search.properties["filter"] = Schema(one_of=[Reference(ref="#/components/schemas/Filter"), Schema(type=OpenAPIType.NULL)])
    for name in closed_bodies():
        if isinstance(schema := components.get(name), Schema):
            schema.additional_properties = False
    for name, rules in BODY_RULES.items():
        schema = components[name]
        aliases = schema.field_aliases()  # JSON Schema keyword -> Schema attribute
        for key, value in rules.items():
            setattr(schema, aliases.get(key, key), value)
