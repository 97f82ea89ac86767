"""Domain enums from the strings that stand for them, refusing any other value by field."""

from __future__ import annotations

import enum
from typing import TypeVar

from weightsmith_server.errors import InvalidArgument

E = TypeVar("E", bound=enum.StrEnum)


def member(kind: type[E], value: str, *, field: str, reason: str) -> E:
    """`value` as a member of `kind`; INVALID_ARGUMENT `reason` naming `field` when it is none."""
    try:
        return kind(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in kind)
        raise InvalidArgument(
            f"Received {field}={str(value)[:100]!r}, expected one of {accepted}.", reason=reason, field=field
        ) from None
