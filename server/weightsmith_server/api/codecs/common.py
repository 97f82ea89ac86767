"""What every codec shares: enum tables that refuse unknown values, timestamps, Struct values."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from weightsmith_server.errors import InvalidArgument

V = TypeVar("V")


class EnumTable(Generic[V]):
    """A proto enum's numbers and the domain values they stand for, both ways.

    Protobuf keeps enum numbers it does not know (open enums), so a newer or
    careless client can send any number: `decode` refuses those with
    INVALID_ARGUMENT naming the field, never a silent default. The
    `*_UNSPECIFIED` number decodes only when the mapping gives it a meaning
    (a documented default); otherwise the field is required.

    Example:
        >>> scopes = EnumTable(edits_pb2.PruneScope, {0: "per_tensor", 1: "per_tensor", 2: "global"})
        >>> scopes.decode(2, field="scope")
        'global'
    """

    def __init__(self, proto_enum: EnumTypeWrapper, values: Mapping[int, V]) -> None:
        self._proto_enum = proto_enum
        self._values = dict(values)
        self._numbers: dict[V, int] = {}
        for number, value in self._values.items():
            # The first (lowest non-zero when one exists) number encodes a value.
            if value not in self._numbers or self._numbers[value] == 0:
                self._numbers[value] = number

    def decode(self, number: int, *, field: str) -> V:
        try:
            return self._values[number]
        except KeyError:
            accepted = ", ".join(self._proto_enum.Name(n) for n in sorted(self._values))
            raise InvalidArgument(
                f"Received {field}={number}, which is not a value this server accepts for "
                f"{self._proto_enum.DESCRIPTOR.full_name}; expected one of: {accepted}.",
                reason="INVALID_ENUM_VALUE",
                field=field,
                metadata={"enum": self._proto_enum.DESCRIPTOR.full_name, "value": str(number)},
            ) from None

    def encode(self, value: V) -> int:
        return self._numbers[value]


def timestamp(text: str) -> timestamp_pb2.Timestamp:
    """A stored RFC 3339 time as a protobuf Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(dt.datetime.fromisoformat(text.replace("Z", "+00:00")))
    return stamp


def _plain(value: Any) -> Any:
    """Struct values to Python: whole-number floats become ints (Struct has only doubles)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def struct(message: struct_pb2.Struct, *, field: str) -> dict[str, Any]:
    """A Struct as plain Python values; NaN and infinities (JSON has none) are INVALID_ARGUMENT."""
    try:
        return _plain(json_format.MessageToDict(message))
    except ValueError:
        raise InvalidArgument(
            f"Received NaN or infinity in `{field}`; its numbers must be finite.",
            reason="NOT_FINITE",
            field=field,
        ) from None
