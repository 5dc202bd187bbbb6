"""Collection, adapter and dataset names: they become directory and file names, so one rule for all."""

from __future__ import annotations

import re

from embedlift.models.errors import InvalidInputError
from embedlift.service.schemas import NAME_PATTERN

_NAME = re.compile(NAME_PATTERN)


def valid_name(name: str) -> bool:
    return _NAME.match(name) is not None


def check_name(name: str, what: str = "collection") -> str:
    """Letters, digits, ``_ . -``, starting with a letter or digit, at most 128 characters."""
    if not valid_name(name):
        raise InvalidInputError(
            f"invalid {what} name {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name
