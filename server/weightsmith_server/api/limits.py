"""Bounds on every string of every request, from the message descriptors.

`RequestLimits.check(message)` walks a request (nested messages, repeated
fields, maps and oneofs alike, without recursion) and refuses it when a
string field holds more than `max_string_bytes` UTF-8 bytes
(STRING_TOO_LONG, naming the field path such as
`edits[3].selector.layers[0]`), or when a repeated field or map holds more
than `MAX_REPEATED` items (TOO_MANY_ITEMS). Bulk fields (a Keras config
JSON) have their own, larger bound. Anything that is not a protobuf message
(the weight codec's zero-copy chunks, which bound their own names) passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from weightsmith_server.errors import InvalidArgument, ResourceExhausted
from weightsmith_server.limits import MIB, check_config_size, excerpt

# Items one repeated field or map may hold: far above any real request
# (a selector of every variable of a large model), far below what a 64 MiB
# message of one-byte strings would make the server walk.
MAX_REPEATED = 100_000
# Fields that carry a whole Keras config: bounded by --max-config-mb instead.
CONFIG_FIELDS = frozenset({"weightsmith.v1.CreateModelRequest.keras_config_json"})
# The field types whose items are looked into; numbers need no bound of their own.
_WALKED = frozenset({FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE})


@dataclass(frozen=True)
class RequestLimits:
    """The string bounds applied to every request message."""

    max_string_bytes: int = 4096
    # Full field names with a bound of their own (bytes), such as CONFIG_FIELDS.
    bulk_fields: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(CONFIG_FIELDS, 16 * MIB))

    @classmethod
    def of(cls, max_string_bytes: int, max_config_bytes: int) -> RequestLimits:
        """The limits for the flags: strings, and the config fields at `max_config_bytes`."""
        return cls(max_string_bytes, dict.fromkeys(CONFIG_FIELDS, max_config_bytes))

    def check(self, request: Any) -> None:
        """Refuse `request` when one of its strings or repeated fields is over its bound."""
        if not isinstance(request, Message):
            return
        stack: list[tuple[Message, str]] = [(request, "")]
        while stack:
            message, prefix = stack.pop()
            for descriptor, value in message.ListFields():
                path = f"{prefix}{descriptor.name}"
                if _is_map(descriptor):
                    self._check_map(descriptor, value, path, stack)
                elif descriptor.is_repeated:
                    _check_count(len(value), path)
                    if descriptor.type in _WALKED:
                        for index, item in enumerate(value):
                            self._check_value(descriptor, item, f"{path}[{index}]", stack)
                else:
                    self._check_value(descriptor, value, path, stack)

    def _check_map(
        self, descriptor: FieldDescriptor, value: Any, path: str, stack: list[tuple[Message, str]]
    ) -> None:
        _check_count(len(value), path)
        key_field = descriptor.message_type.fields_by_name["key"]
        value_field = descriptor.message_type.fields_by_name["value"]
        for key in value:
            where = f"{path}[{excerpt(key, 40)!r}]"
            self._check_value(key_field, key, where, stack)
            self._check_value(value_field, value[key], where, stack)

    def _check_value(
        self, descriptor: FieldDescriptor, value: Any, path: str, stack: list[tuple[Message, str]]
    ) -> None:
        if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            stack.append((value, f"{path}."))
        elif descriptor.type == FieldDescriptor.TYPE_STRING:
            bulk = self.bulk_fields.get(descriptor.full_name)
            if bulk is not None:
                check_config_size(_utf8_size(value, bulk), bulk, field=path)
            else:
                _check_string(value, path, self.max_string_bytes)


def _is_map(descriptor: FieldDescriptor) -> bool:
    message = descriptor.message_type
    return message is not None and message.GetOptions().map_entry


def _utf8_size(value: str, limit: int) -> int:
    """The UTF-8 size of `value` where it matters: exact near `limit`, a lower bound far from it."""
    if len(value) > limit:
        return len(value)
    if len(value) * 4 <= limit:
        return len(value)  # under the limit whatever it encodes to
    return len(value.encode("utf-8", "surrogatepass"))


def _check_string(value: str, path: str, limit: int) -> None:
    size = _utf8_size(value, limit)
    if size > limit:
        raise InvalidArgument(
            f"Received {path} of {size} bytes or more; the server accepts at most {limit} bytes in a "
            f"string field (--max-string-bytes).",
            reason="STRING_TOO_LONG",
            field=path,
            metadata={"size_bytes": str(size), "limit_bytes": str(limit)},
        )


def _check_count(count: int, path: str) -> None:
    if count > MAX_REPEATED:
        raise ResourceExhausted(
            f"Received {count} items in {path}; the server accepts at most {MAX_REPEATED} in one field.",
            reason="TOO_MANY_ITEMS",
            field=path,
            metadata={"count": str(count), "limit": str(MAX_REPEATED)},
        )
