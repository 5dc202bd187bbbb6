"""The service's wire types: those of ``embedlift.client.schemas`` (the client distribution holds them, so client
and server share one definition), and what only the server needs about them: the enumerations a 400 lists,
which bodies refuse unknown fields, and the JSON Schema rules the handlers enforce across fields.

The engine and the collections return these types too (``SearchHit``, ``StoredDocument``, ``CollectionInfo``):
what a search finds is what the response carries, with no mirrored copy to keep in step.
"""

from __future__ import annotations

from typing import Any

import msgspec

from embedlift.client import schemas as wire
from embedlift.client.schemas import *  # noqa: F403  (the wire types, under the names the service has always used)


def enum_fields(body: type) -> dict[str, tuple[Any, ...]]:
    """A request body's enumerated fields by their path in the body (``mode``, ``lexical.language``), with their
    allowed values: a 400 for a value outside them names them (msgspec says only "Invalid enum value")."""
    found: dict[str, tuple[Any, ...]] = {}

    def walk(info: msgspec.inspect.Type, path: str) -> None:
        t = msgspec.inspect
        if isinstance(info, t.LiteralType):
            found[path] = tuple(info.values)
        elif isinstance(info, t.UnionType):
            for member in info.types:
                walk(member, path)
        elif isinstance(info, t.StructType) and path.count(".") < 3:
            for f in info.fields:
                walk(f.type, f"{path}.{f.encode_name}" if path else f.encode_name)

    walk(msgspec.inspect.type_info(body), "")
    return found


def closed_bodies() -> list[str]:
    """Request Structs that refuse unknown fields (a typo is a 400, never silently ignored)."""
    return [
        name for name, t in vars(wire).items()
        if isinstance(t, type) and issubclass(t, msgspec.Struct) and t.__struct_config__.forbid_unknown_fields
    ]


# Rules across fields that the handlers enforce, declared on the bodies' schemas (see app.declare_body_rules).
BODY_RULES: dict[str, dict[str, Any]] = {
    "SearchRequest": {"oneOf": [{"required": ["query"]}, {"required": ["queries"]}]},
}

# A metadata filter (service/collections/filters.py), in JSON Schema: recursive through $and/$or, so it is one
# component of its own (declared by app.declare_body_rules) that the search body refers to.
_SCALAR = [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
_SCALAR_LIST: dict[str, Any] = {"type": "array", "minItems": 1, "maxItems": 1024, "items": {"oneOf": _SCALAR}}
FILTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Metadata filter: {key: value} (equality) or {key: {operator: value}} with $eq $ne $gt $gte $lt $lte $in "
    "$nin $exists, combined with $and/$or lists (nested at most 32 deep). Range operators take numbers and match stored "
    "numbers only.",
    "propertyNames": {"pattern": '^([$](and|or)|[^$"][^"]*)$'},
    "properties": {
        "$and": {"type": "array", "minItems": 1, "maxItems": 1024, "items": {"$ref": "#/components/schemas/Filter"}},
        "$or": {"type": "array", "minItems": 1, "maxItems": 1024, "items": {"$ref": "#/components/schemas/Filter"}},
    },
    "additionalProperties": {
        "oneOf": [
            *_SCALAR,
            {
                "type": "object", "minProperties": 1, "additionalProperties": False,
                "properties": {
                    "$eq": {"oneOf": _SCALAR}, "$ne": {"oneOf": _SCALAR},
                    "$gt": {"type": "number"}, "$gte": {"type": "number"}, "$lt": {"type": "number"}, "$lte": {"type": "number"},
                    "$in": _SCALAR_LIST, "$nin": _SCALAR_LIST, "$exists": {"type": "boolean"},
                },
            },
        ]
    },
}


