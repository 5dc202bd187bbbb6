"""Metadata filters, as users of Qdrant, Chroma or MongoDB write them, in every search mode.

    {"year": 2021}                                 equality ($eq); null matches null or absent
    {"year": {"$gte": 2020, "$lt": 2023}}          operators on one key combine with AND
    {"$or": [{"section": "risk"}, {"tags": {"$in": ["legal", "tax"]}}]}
    {"$and": [...]}, {"draft": {"$exists": false}}

Operators: ``$eq $ne $gt $gte $lt $lte $in $nin $exists``. Range operators take numbers and match only stored
numbers (a stored value of another type simply does not match); ``$eq``/``$ne``/``$in``/``$nin`` compare a JSON
type with the same type (``true`` is not ``1``, ``1`` equals ``1.0``); ``$ne`` and ``$nin`` match a document
without the key; ``$exists: true`` matches a key that is present (its value may be null).

``parse`` checks a filter and turns it into a small tree, refusing bad input with a 400 that names the field
and the allowed values; ``to_sql`` compiles the tree for SQLite's JSON functions, ``to_postgres`` for JSONB; ``matches`` evaluates it in
Python (the reference the store is tested against, and what a store without SQL would use).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from embedlift.models.errors import InvalidInputError

Scalar = str | int | float | bool | None
Op = Literal["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists"]
OPERATORS: tuple[Op, ...] = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists")
RANGE = ("$gt", "$gte", "$lt", "$lte")
LOGICAL = ("$and", "$or")
MAX_DEPTH = 32
MAX_ITEMS = 1024  # values of $in/$nin, filters of $and/$or
NUL = "\x00"


@dataclass(frozen=True)
class Condition:
    """One operator on one key."""

    key: str
    op: Op
    value: Any


@dataclass(frozen=True)
class Group:
    """All (``$and``) or any (``$or``) of its parts."""

    logic: Literal["$and", "$or"]
    parts: tuple[Condition | Group, ...]


Node = Condition | Group


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse(where: Mapping[str, Any], path: str = "filter", depth: int = 0) -> Group:
    """Check a filter and return its tree (the top level is an ``$and`` of its keys).

    Raises:
        InvalidInputError: naming the offending field (``filter.year.$gt``) and what it allows.
    """
    if not isinstance(where, Mapping):
        raise InvalidInputError(f"{path} must be an object of metadata keys (and $and/$or), got {type(where).__name__}", field=path)
    if depth > MAX_DEPTH:
        raise InvalidInputError(f"{path}: filters nest at most {MAX_DEPTH} levels of $and/$or", field=path)
    parts: list[Node] = []
    for key, value in where.items():
        where_key = f"{path}.{key}"
        if key in LOGICAL:
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_ITEMS:
                raise InvalidInputError(f"{where_key} must be a list of 1 to {MAX_ITEMS} filters", field=where_key)
            logic: Literal["$and", "$or"] = "$and" if key == "$and" else "$or"
            parts.append(Group(logic, tuple(parse(v, f"{where_key}[{i}]", depth + 1) for i, v in enumerate(value))))
        elif key.startswith("$"):
            raise InvalidInputError(f"{where_key}: unknown operator {key!r} at this level; use $and or $or, or a metadata key", field=where_key)
        elif isinstance(value, Mapping):
            if not value:
                raise InvalidInputError(f"{where_key} is an empty object; give a value or operators {list(OPERATORS)}", field=where_key)
            parts += [_condition(key, op, v, f"{where_key}.{op}") for op, v in value.items()]
        elif _scalar(value):
            parts.append(Condition(key, "$eq", value))
        else:
            raise InvalidInputError(
                f"{where_key} must be a string, number, boolean, null or an object of operators {list(OPERATORS)}; "
                f"for one of several values use {{\"$in\": [...]}}",
                field=where_key,
            )
    return Group("$and", tuple(parts))


def _condition(key: str, op: Any, value: Any, where: str) -> Condition:
    if op not in OPERATORS:
        raise InvalidInputError(f"{where}: unknown operator {op!r}; allowed: {list(OPERATORS)}", field=where)
    if op in RANGE and not _number(value):
        raise InvalidInputError(f"{where} takes a number, got {value!r}", field=where)
    if op in ("$in", "$nin"):
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_ITEMS or not all(_scalar(v) for v in value):
            raise InvalidInputError(f"{where} takes a list of 1 to {MAX_ITEMS} strings, numbers, booleans or nulls, got {value!r}", field=where)
        value = tuple(value)
    elif op == "$exists" and not isinstance(value, bool):
        raise InvalidInputError(f"{where} takes true or false, got {value!r}", field=where)
    elif op in ("$eq", "$ne") and not _scalar(value):
        raise InvalidInputError(f"{where} takes a string, number, boolean or null, got {value!r}", field=where)
    return Condition(key, op, value)


# ------------------------------------------------------------------------------------------------ python
_MISSING = object()


def _equal(stored: Any, value: Any) -> bool:
    """JSON equality: the same type (bool is not a number), numbers by value; null equals null or absent."""
    if value is None:
        return stored is None or stored is _MISSING
    if isinstance(value, bool) or isinstance(stored, bool):
        return isinstance(value, bool) and isinstance(stored, bool) and stored == value
    if _number(value):
        return _number(stored) and stored == value
    return isinstance(stored, str) and stored == value


def _holds(c: Condition, metadata: Mapping[str, Any]) -> bool:
    stored = metadata.get(c.key, _MISSING)
    if c.op == "$eq":
        return _equal(stored, c.value)
    if c.op == "$ne":
        return not _equal(stored, c.value)
    if c.op == "$in":
        return any(_equal(stored, v) for v in c.value)
    if c.op == "$nin":
        return not any(_equal(stored, v) for v in c.value)
    if c.op == "$exists":
        return (stored is not _MISSING) == c.value
    if not _number(stored):
        return False
    return {"$gt": stored > c.value, "$gte": stored >= c.value, "$lt": stored < c.value, "$lte": stored <= c.value}[c.op]


def matches(node: Node, metadata: Mapping[str, Any]) -> bool:
    """Whether a document's metadata passes the filter."""
    if isinstance(node, Condition):
        return _holds(node, metadata)
    results = (matches(part, metadata) for part in node.parts)
    return all(results) if node.logic == "$and" else any(results)


def nul_in(doc_id: str, text: str, metadata: Mapping[str, Any]) -> str | None:
    """Which part of a document holds U+0000 (``None``: none), which no store keeps: PostgreSQL's text and JSONB
    cannot hold it and SQLite's JSON functions cut a string at it (a filter would see ``"a"`` for ``"a\\x00b"``).
    Every store is refused it, so filters can rely on it: a key with it is absent, a string with it equal to
    nothing stored (``_nul_condition``)."""
    if NUL in doc_id:
        return "id"
    if NUL in text:
        return "text"
    stack: list[Any] = [metadata]
    while stack:
        value = stack.pop()
        if isinstance(value, str) and NUL in value:
            return "metadata"
        if isinstance(value, Mapping):
            if any(NUL in str(k) for k in value):
                return "metadata"
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return None


def _nul_condition(c: Condition) -> tuple[list[Any], bool | None]:
    """A condition naming U+0000, resolved without the store (which could not take it as a parameter): no stored
    key or string holds it (``nul_in``). ``(values left to compare, None)``, or ``([], the constant result)``."""
    if NUL in c.key:
        return [], _holds(c, {})  # the key is absent from every document
    if c.op not in ("$eq", "$ne", "$in", "$nin"):
        return [c.value], None
    values = c.value if c.op in ("$in", "$nin") else [c.value]
    left = [v for v in values if not (isinstance(v, str) and NUL in v)]  # equal to no stored value
    if not left:
        return [], c.op in ("$ne", "$nin")
    return left, None


# ------------------------------------------------------------------------------------------------- sqlite
INT64 = 1 << 63


def _bindable(value: Any) -> Any:
    """An integer SQLite cannot bind (beyond 64 bits) compares as the float it is closest to."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64 else value


@dataclass(frozen=True)
class _SQLKey:
    """How SQL reads one metadata key: ``value`` and ``type`` (as ``json_extract`` and ``json_type`` give them),
    each taking one parameter, ``param``. The key is read through a JSON path (``$."key"``) unless it is empty or
    holds ``"`` or ``\\``, which SQLite's paths cannot quote (it would read no key, or fail): then the object's
    own entries are searched for it (``json_each``), exactly."""

    value: str
    type: str
    param: str

    @classmethod
    def of(cls, m: str, key: str) -> _SQLKey:
        if not key or '"' in key or "\\" in key:
            return cls(f"(SELECT value FROM json_each({m}) WHERE key = ?)", f"(SELECT type FROM json_each({m}) WHERE key = ?)", key)
        return cls(f"json_extract({m}, ?)", f"json_type({m}, ?)", f'$."{key}"')

    def is_number(self) -> str:
        return f"{self.type} IN ('integer', 'real')"


def _sql_equal(value: Any, k: _SQLKey) -> tuple[str, list[Any]]:
    """``stored == value`` in JSON's terms (see ``_equal``)."""
    if value is None:
        return f"{k.value} IS NULL", [k.param]
    if isinstance(value, bool):
        return f"{k.type} = '{'true' if value else 'false'}'", [k.param]
    kind = k.is_number() if _number(value) else f"{k.type} = 'text'"
    return f"({kind} AND {k.value} = ?)", [k.param, k.param, _bindable(value)]


def _sql_condition(c: Condition, m: str) -> tuple[str, list[Any]]:
    values, constant = _nul_condition(c)
    if constant is not None:
        return ("1" if constant else "0"), []
    k = _SQLKey.of(m, c.key)
    if c.op in ("$eq", "$ne", "$in", "$nin"):
        clauses, params = [], []
        for v in values:
            clause, extra = _sql_equal(v, k)
            clauses.append(f"COALESCE({clause}, 0)")  # absent key: NULL in SQL, false here
            params += extra
        expr = "(" + " OR ".join(clauses) + ")"
        return (f"NOT {expr}" if c.op in ("$ne", "$nin") else expr), params
    if c.op == "$exists":
        return f"({k.type} IS {'NOT ' if c.value else ''}NULL)", [k.param]
    sign = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[c.op]
    return f"COALESCE(({k.is_number()} AND {k.value} {sign} ?), 0)", [k.param, k.param, _bindable(c.value)]


def to_sql(node: Node, metadata_column: str = "d.metadata") -> tuple[str, list[Any]]:
    """A SQLite boolean expression over the JSON metadata column, and its parameters."""
    if isinstance(node, Condition):
        return _sql_condition(node, metadata_column)
    if not node.parts:
        return "1", []
    parts = [to_sql(p, metadata_column) for p in node.parts]
    joiner = " AND " if node.logic == "$and" else " OR "
    return "(" + joiner.join(p[0] for p in parts) + ")", [x for p in parts for x in p[1]]


# --------------------------------------------------------------------------------------------- postgresql
def _pg_equal(value: Any, m: str, key: str) -> tuple[str, list[Any]]:
    """``stored == value`` in JSON's terms over a JSONB column. Equality of a string, number or boolean is
    containment (``@>``), which the column's GIN index serves; jsonb compares numbers by value and never
    equates ``true`` with ``1``."""
    if value is None:
        return f"({m} -> %s IS NULL OR {m} -> %s = 'null'::jsonb)", [key, key]
    from psycopg.types.json import Jsonb

    return f"{m} @> %s", [Jsonb({key: value})]


def _pg_condition(c: Condition, m: str) -> tuple[str, list[Any]]:
    values, constant = _nul_condition(c)
    if constant is not None:
        return ("true" if constant else "false"), []
    if c.op in ("$eq", "$ne", "$in", "$nin"):
        clauses, params = [], []
        for v in values:
            clause, extra = _pg_equal(v, m, c.key)
            clauses.append(f"COALESCE({clause}, false)")
            params += extra
        expr = "(" + " OR ".join(clauses) + ")"
        return (f"NOT {expr}" if c.op in ("$ne", "$nin") else expr), params
    if c.op == "$exists":
        return (f"({m} ? %s)" if c.value else f"NOT ({m} ? %s)"), [c.key]
    sign = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[c.op]
    # CASE keeps the cast from running on a value of another type (SQL does not promise AND's order)
    return f"COALESCE(CASE WHEN jsonb_typeof({m} -> %s) = 'number' THEN ({m} ->> %s)::numeric {sign} %s END, false)", [c.key, c.key, c.value]


def to_postgres(node: Node, metadata_column: str = "d.metadata") -> tuple[str, list[Any]]:
    """A PostgreSQL boolean expression over the JSONB metadata column, and its (``%s``) parameters."""
    if isinstance(node, Condition):
        return _pg_condition(node, metadata_column)
    if not node.parts:
        return "true", []
    parts = [to_postgres(p, metadata_column) for p in node.parts]
    joiner = " AND " if node.logic == "$and" else " OR "
    return "(" + joiner.join(p[0] for p in parts) + ")", [x for p in parts for x in p[1]]
