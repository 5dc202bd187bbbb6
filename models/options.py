"""Typed settings from command-line flags and ``EMBEDLIFT_*`` variables: one conversion, one message.

Every setting embedlift reads (the base specification's fields, the service's settings) is declared once with
a type (``Annotated[int, Meta(ge=1)]``, a ``Literal``, ``bool``, ``Path``); its value comes from a flag, else its
environment variable, else the default (flag > environment > default, as infinity's ``EngineArgs``). A value that
does not fit is refused in one line that names where it came from, the value, and what is allowed:

    EMBEDLIFT_PORT='abc' is not valid: expected an integer from 1 to 65535
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import msgspec

from embedlift.models.errors import InvalidInputError

ENV_PREFIX = "EMBEDLIFT_"
#: Spellings of booleans accepted from the environment beyond msgspec's own (``true``/``false``/``1``/``0``).
_BOOLS = {"yes": "true", "on": "true", "no": "false", "off": "false"}


class SettingError(InvalidInputError):
    """A flag or ``EMBEDLIFT_*`` value that does not fit its setting (the CLI prints it and exits 2)."""

    code = "invalid_setting"


def env_name(field: str) -> str:
    """``max_seq_length`` -> ``EMBEDLIFT_MAX_SEQ_LENGTH``."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """``max_seq_length`` -> ``--max-seq-length``."""
    return "--" + field.replace("_", "-")


def _optional_of(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (else the annotation itself)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _describe(info: msgspec.inspect.Type) -> str:
    """What a type allows, in words: ``an integer from 1 to 65535``, ``one of 'torch', 'int8'``."""
    t = msgspec.inspect
    if isinstance(info, t.UnionType):
        parts = [_describe(x) for x in info.types if not isinstance(x, t.NoneType)]
        return " or ".join(parts) if parts else "nothing"
    if isinstance(info, t.LiteralType):
        return "one of " + ", ".join(repr(v) for v in info.values)
    if isinstance(info, t.BoolType):
        return "true or false"
    if isinstance(info, (t.IntType, t.FloatType)):
        noun = "an integer" if isinstance(info, t.IntType) else "a number"
        if info.ge is not None and info.le is not None:
            return f"{noun} from {info.ge} to {info.le}"
        bounds = [f">= {info.ge}" if info.ge is not None else f"> {info.gt}" if info.gt is not None else "",
                  f"<= {info.le}" if info.le is not None else f"< {info.lt}" if info.lt is not None else ""]
        return " ".join([noun, " and ".join(b for b in bounds if b)]).strip()
    if isinstance(info, t.StrType):
        return "a string" + (f" matching {info.pattern}" if info.pattern else "") + (" (not empty)" if info.min_length else "")
    return f"a value of type {type(info).__name__.removesuffix('Type').lower()}"


def allowed(annotation: Any) -> str:
    """What a setting's type allows, in words."""
    if _optional_of(annotation) is Path:
        return "a path"
    return _describe(msgspec.inspect.type_info(annotation))


def convert(value: Any, annotation: Any, where: str) -> Any:
    """``value`` (a flag's or variable's text, or a typed default) as ``annotation``.

    Raises:
        SettingError: Naming ``where`` (``--port`` or ``EMBEDLIFT_PORT``), the value and what is allowed.
    """
    inner = _optional_of(annotation)
    if inner is Path:
        return value if isinstance(value, Path) else Path(str(value))
    if inner is bool and isinstance(value, str):
        value = _BOOLS.get(value.strip().lower(), value.strip())
    try:
        return msgspec.convert(value, annotation, strict=False)
    except msgspec.ValidationError:
        raise SettingError(f"{where}={value!r} is not valid: expected {allowed(annotation)}") from None


def read_fields(
    cls: type,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    env_names: Mapping[str, str] | None = None,
    flag_names: Mapping[str, str] | None = None,
    values: Mapping[str, Mapping[str, Any]] | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The typed values of a dataclass's or Struct's fields that a flag or variable gives (unset ones left out).

    Args:
        cls: A dataclass or msgspec Struct whose field annotations are the settings' types.
        flags: Parsed flags by field name (``None``: not given).
        env: The environment (variables ``EMBEDLIFT_<FIELD>``, or ``env_names``); ``None``: ``os.environ``.
        env_names: Field -> variable name where it is not ``EMBEDLIFT_<FIELD>``.
        flag_names: Field -> flag name where it is not ``--<field>`` (for messages).
        values: Field -> {spelling: value} for settings spelled otherwise on the command line (``--backend
            torch`` is ``quantization=None``).
        skip: Fields read otherwise (a nested settings object).
    """
    flags = flags or {}
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(cls.__struct_fields__)  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    for name in names:
        if name in skip:
            continue
        variable = (env_names or {}).get(name, env_name(name))
        raw, where = flags.get(name), (flag_names or {}).get(name, flag_name(name))
        if raw is None:
            raw, where = env.get(variable) or None, variable
        if raw is None:
            continue
        spelled = (values or {}).get(name)
        if spelled is not None and isinstance(raw, str):
            if raw not in spelled:
                raise SettingError(f"{where}={raw!r} is not valid: expected one of {', '.join(map(repr, spelled))}")
            out[name] = spelled[raw]
            continue
        out[name] = convert(raw, hints[name], where)
    return out
