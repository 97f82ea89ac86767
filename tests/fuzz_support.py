"""Fuzzing tools: every RPC from the service descriptors, protobuf strategies, mutations, raw calls.

`hypothesis` has no protobuf strategy, so `messages(descriptor)` walks a
message descriptor and draws every field from an attacker's palette: huge,
unicode and path-traversal strings, integers at the extremes, NaN and
infinities, unknown enum numbers, big and empty repeated fields, every oneof
member. `mutate_stream` starts from a valid request (a list of messages: one
for a unary request, several for a client stream) and changes one thing:
one field of one message, the order or number of messages, or their bytes.
Requests travel as bytes over raw channel methods, so byte-level mutations
reach the server exactly as written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import strategies as st

from weightsmith.v1 import model_service_pb2, training_service_pb2, weight_service_pb2

SERVICE_MODULES = (model_service_pb2, weight_service_pb2, training_service_pb2)
FD = pb_descriptor.FieldDescriptor

# Codes that mean the server failed, hung or went away, never a verdict on the input.
FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


@dataclass(frozen=True)
class Rpc:
    """One method of one service, as its descriptor declares it."""

    service: str
    name: str
    input: pb_descriptor.Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    def __str__(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.name}"


def all_rpcs() -> list[Rpc]:
    """Every method of ModelService, WeightService and TrainingService."""
    rpcs = []
    for module in SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rpcs.append(
                    Rpc(
                        service.full_name,
                        method.name,
                        method.input_type,
                        method.client_streaming,
                        method.server_streaming,
                    )
                )
    return rpcs


def message_class(descriptor: pb_descriptor.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


# --- values -------------------------------------------------------------------

BIG = 70_000  # past every string bound, far below the message limit
INTERESTING_STRINGS = (
    "",
    " ",
    "a",
    "-",
    ".",
    "..",
    "../../../../etc/passwd",
    "..\\..\\windows",
    "/etc/passwd",
    "/",
    "//",
    "~",
    "file:///etc/passwd",
    "http://127.0.0.1:1/x",
    "imports/../../x",
    "tmp",
    "a/../../b",
    "\x00",
    "a\x00b",
    "\n\r\t",
    "*",
    "**",
    "?",
    "[",
    "[!]",
    "{}",
    "%s%n%x",
    "${HOME}",
    "\u202e\u0635",
    "😀" * 3,
    "Ａ",
    "ﬁ",
    "é" * 700,
    "NaN",
    "-1",
    "0",
    "1e309",
    "null",
    "{",
    "[[[[[[[[",
    "logits/bias",
    "logits/kernel",
    "hidden/kernel",
    "logits/*",
    "*/bias",
    "logits",
    "hidden",
    "features",
    "Dense",
    "Lambda",
    "glorot_uniform",
    "mse",
    "accuracy",
    "val_loss",
    "sparse_categorical_crossentropy",
    "fz-base",
    "fz-other",
    "fz-victim",
    "fz-data",
    "fz-job",
    "fz.npz",
    "a" * 255,
    "0" * 256,
    "a/" + "b" * 300 + "/c",
    "a" * 1025,
    "a" * 4097,
    "x" * BIG,
)
INT_EDGES = (
    0,
    1,
    -1,
    2,
    7,
    64,
    255,
    256,
    4095,
    4096,
    65536,
    2**31 - 1,
    -(2**31),
    2**32,
    2**53,
    2**63 - 1,
    -(2**63),
)
FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-320, 1e308, -1e308, float("nan"), float("inf"), float("-inf"))

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}

# Any character a protobuf string can hold (UTF-8 has no lone surrogates).
UTF8 = st.characters(codec="utf-8")
strings = st.one_of(
    st.sampled_from(INTERESTING_STRINGS),
    st.text(UTF8, max_size=24),
    st.builds(lambda c, n: c * n, UTF8, st.sampled_from([256, 1025, 4097, BIG])),
)
binaries = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([b"", b"\x00", b"\xff" * 9, b"PK\x03\x04", b"\x93NUMPY", b"\x00" * BIG]),
)
doubles = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats())


@cache
def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([v for v in INT_EDGES if low <= v <= high]),
        st.integers(max(low, -8), min(high, 64)),
        st.integers(low, high),
    )


def scalar_values(field: pb_descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    """An attacker's palette for one scalar field."""
    kind = field.type
    if kind in _INT_RANGES:
        return _ints(*_INT_RANGES[kind])
    if kind == FD.TYPE_STRING:
        return strings
    if kind == FD.TYPE_BYTES:
        return binaries
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_DOUBLE:
        return doubles
    if kind == FD.TYPE_FLOAT:
        return st.one_of(st.sampled_from(FLOAT_EDGES[:6] + FLOAT_EDGES[8:]), st.floats(width=32))
    if kind == FD.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _ints(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field type {kind} of {field.full_name}")


# --- messages -----------------------------------------------------------------

MAX_DEPTH = 5


def _is_map(field: pb_descriptor.FieldDescriptor) -> bool:
    return field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _is_repeated(field: pb_descriptor.FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _real_oneof(field: pb_descriptor.FieldDescriptor) -> pb_descriptor.OneofDescriptor | None:
    oneof = field.containing_oneof
    if oneof is None or (len(oneof.fields) == 1 and oneof.name == f"_{field.name}"):
        return None  # a proto3 `optional`: its synthetic oneof is just presence
    return oneof


def _element_values(field: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return scalar_values(field)


def _field_values(field: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """Values for one whole field: a scalar, a message, a list or a dict."""
    if _is_map(field):
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(scalar_values(key), _element_values(value, depth), max_size=3)
    element = _element_values(field, depth)
    if not _is_repeated(field):
        return element
    if field.type == FD.TYPE_MESSAGE:
        return st.lists(element, max_size=3)
    if field.type in (FD.TYPE_STRING, FD.TYPE_BYTES):  # many short ones, never many huge ones
        short = st.text(UTF8, max_size=3) if field.type == FD.TYPE_STRING else st.binary(max_size=3)
        many = st.builds(lambda v, n: [v] * n, short, st.sampled_from([33, 1000, 20_000]))
    else:
        many = st.builds(lambda v, n: [v] * n, element, st.sampled_from([33, 1000, 100_000]))
    return st.one_of(st.lists(element, max_size=5), many)


def set_field(message: Message, field: pb_descriptor.FieldDescriptor, value: Any) -> None:
    """Set `field` of `message` to a value drawn by `_field_values`."""
    if _is_map(field):
        target = getattr(message, field.name)
        for key, item in value.items():
            if field.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif _is_repeated(field):
        message.ClearField(field.name)
        if field.type == FD.TYPE_MESSAGE:
            for item in value:
                getattr(message, field.name).add().CopyFrom(item)
        else:
            getattr(message, field.name).extend(value)
    elif field.type == FD.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


@cache
def messages(descriptor: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Arbitrary messages of `descriptor`: any subset of fields, at most one member per oneof."""
    cls = message_class(descriptor)
    if depth >= MAX_DEPTH or not descriptor.fields:
        return st.just(cls())
    plain = [f for f in descriptor.fields if _real_oneof(f) is None]
    oneofs = [o for o in descriptor.oneofs if not (len(o.fields) == 1 and o.name == f"_{o.fields[0].name}")]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for field in plain:
            if draw(st.booleans()):
                set_field(message, field, draw(_field_values(field, depth)))
        for oneof in oneofs:
            chosen = draw(st.sampled_from([None, *oneof.fields]))
            if chosen is not None:
                set_field(message, chosen, draw(_field_values(chosen, depth)))
        return message

    return build()


# --- mutations ----------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """One field of one (sub)message of a request: where a mutation lands."""

    message: Message
    field: pb_descriptor.FieldDescriptor
    path: str


def sites(message: Message, prefix: str = "") -> Iterator[Site]:
    """Every field, set or not, of `message` and of every submessage it holds."""
    for field in message.DESCRIPTOR.fields:
        path = f"{prefix}{field.name}"
        yield Site(message, field, path)
        if field.type != FD.TYPE_MESSAGE or _is_map(field):
            continue
        if _is_repeated(field):
            for i, item in enumerate(getattr(message, field.name)):
                yield from sites(item, f"{path}[{i}].")
        elif message.HasField(field.name):
            yield from sites(getattr(message, field.name), f"{path}.")


_JSON_REPLACEMENTS: tuple[Any, ...] = (
    None,
    -1,
    0,
    1,
    2.5,
    65536,
    1e300,
    "",
    "x" * 300,
    [],
    {},
    True,
    "Lambda",
)


def _mutate_json(draw: st.DrawFn, text: str) -> str | None:
    """Replace one node of a JSON document, or None when `text` is not JSON."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    nodes: list[tuple[Any, Any]] = []  # (container, key)
    stack = [document]
    while stack:
        node = stack.pop()
        children = (
            node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        )
        for key, child in children:
            nodes.append((node, key))
            stack.append(child)
    if not nodes:
        return None
    container, key = draw(st.sampled_from(nodes))
    container[key] = draw(st.sampled_from(_JSON_REPLACEMENTS))
    return json.dumps(document)


def _mutate_scalar(draw: st.DrawFn, field: pb_descriptor.FieldDescriptor, value: Any) -> Any:
    if field.type == FD.TYPE_STRING and value:
        how = draw(st.sampled_from(["json", "truncate", "double", "traverse", "case", "new"]))
        if how == "json":
            mutated = _mutate_json(draw, value)
            if mutated is not None:
                return mutated
        if how == "truncate":
            return value[: draw(st.integers(0, len(value) - 1))]
        if how == "double":
            return value * 2
        if how == "traverse":
            return f"../{value}"
        if how == "case":
            return value.swapcase() + "\u0301"
    if field.type == FD.TYPE_BYTES and value:
        how = draw(st.sampled_from(["truncate", "flip", "extend", "new"]))
        if how == "truncate":
            return value[: draw(st.integers(0, len(value) - 1))]
        if how == "flip":
            position = draw(st.integers(0, len(value) - 1))
            return value[:position] + bytes([value[position] ^ 0xFF]) + value[position + 1 :]
        if how == "extend":
            return value + draw(st.binary(min_size=1, max_size=16))
    if field.type in _INT_RANGES and draw(st.booleans()):
        low, high = _INT_RANGES[field.type]
        return min(high, max(low, draw(st.sampled_from([value - 1, value + 1, -value, value * 1000]))))
    return draw(scalar_values(field))


def mutate_message(draw: st.DrawFn, message: Message) -> str:
    """Change one field of `message` (in place); returns what was done, for the log."""
    candidates = list(sites(message))
    if not candidates:  # a message without fields: an unknown field then
        message.MergeFromString(
            draw(st.sampled_from([b"\x08\x01", b"\x12\x01a", b"\xf8\xff\xff\xff\x0f\x00"]))
        )
        return "unknown field"
    site = draw(st.sampled_from(candidates))
    field, target = site.field, site.message
    if _is_map(field):
        how = draw(st.sampled_from(["clear", "add"]))
        if how == "clear":
            target.ClearField(field.name)
        else:
            set_field(target, field, draw(_field_values(field, 0)))
        return f"{site.path}: {how}"
    if _is_repeated(field) and field.type == FD.TYPE_MESSAGE:
        items = [type(item).FromString(item.SerializeToString()) for item in getattr(target, field.name)]
        how = draw(st.sampled_from(["clear", "drop", "duplicate", "append", "reverse"]))
        if how == "append" or not items:
            items.append(draw(messages(field.message_type, 1)))
        elif how == "clear":
            items = []
        elif how == "drop":
            del items[draw(st.integers(0, len(items) - 1))]
        elif how == "duplicate":
            items.append(items[draw(st.integers(0, len(items) - 1))])
        else:
            items.reverse()
        set_field(target, field, items)
        return f"{site.path}: {how}"
    if _is_repeated(field):
        items = list(getattr(target, field.name))
        how = draw(st.sampled_from(["clear", "drop", "extreme", "append", "huge", "new"]))
        if how == "clear" or (how == "drop" and not items):
            items = []
        elif how == "drop":
            del items[draw(st.integers(0, len(items) - 1))]
        elif how == "extreme" and items:
            index = draw(st.integers(0, len(items) - 1))
            items[index] = _mutate_scalar(draw, field, items[index])
        elif how == "append":
            items.append(draw(scalar_values(field)))
        elif how == "huge":  # a thousand times the field, kept under a few MiB
            items = (items or [draw(scalar_values(field))])[:1] * 1000
            if field.type in (FD.TYPE_STRING, FD.TYPE_BYTES):
                items = [item[:256] for item in items]
        else:
            items = draw(_field_values(field, 0))
        set_field(target, field, items)
        return f"{site.path}: {how}"
    if field.type == FD.TYPE_MESSAGE:
        how = draw(st.sampled_from(["clear", "new", "empty"]))
        if how == "clear":
            target.ClearField(field.name)
        elif how == "empty":
            getattr(target, field.name).SetInParent()
            getattr(target, field.name).Clear()
            getattr(target, field.name).SetInParent()
        else:
            set_field(target, field, draw(messages(field.message_type, 1)))
        return f"{site.path}: {how}"
    if draw(st.integers(0, 7)) == 0:
        target.ClearField(field.name)
        return f"{site.path}: clear"
    set_field(target, field, _mutate_scalar(draw, field, getattr(target, field.name)))
    return f"{site.path}: set"


def _mutate_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "insert", "tag", "random"]))
    if how == "random" or not data:
        return draw(st.binary(max_size=64))
    position = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return data[:position]
    if how == "flip":
        return data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))]) + data[position + 1 :]
    if how == "insert":
        return data[:position] + draw(st.binary(min_size=1, max_size=12)) + data[position:]
    # A field tag of every wire type, some invalid, with a runaway length.
    return data + draw(
        st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x0f", b"\x80", b"\xfa\xff\xff\xff\x0f\x02", b"\x12"])
    )


def mutate_stream(draw: st.DrawFn, valid: list[Message], streaming: bool) -> tuple[list[bytes], str]:
    """A valid request (list of messages) with one thing changed, serialized; and what changed."""
    stream = [type(m).FromString(m.SerializeToString()) for m in valid]
    kinds = ["field", "field", "field", "bytes"]
    if streaming:
        kinds += ["drop-header", "drop", "duplicate", "swap", "shuffle", "truncate", "insert", "header-twice"]
    kind = draw(st.sampled_from(kinds))
    index = draw(st.integers(0, len(stream) - 1))
    if kind == "field":
        done = mutate_message(draw, stream[index])
        return [m.SerializeToString() for m in stream], f"message {index}: {done}"
    frames = [m.SerializeToString() for m in stream]
    if kind == "bytes":
        frames[index] = _mutate_bytes(draw, frames[index])
    elif kind == "drop-header":
        frames = frames[1:]
    elif kind == "drop" and len(frames) > 1:
        del frames[index]
    elif kind == "duplicate":
        frames.insert(index, frames[index])
    elif kind == "swap" and len(frames) > 1:
        other = draw(st.integers(0, len(frames) - 1))
        frames[index], frames[other] = frames[other], frames[index]
    elif kind == "shuffle":
        frames = draw(st.permutations(frames))
    elif kind == "truncate":
        frames = frames[:index]
    elif kind == "insert":
        frames.insert(index, draw(messages(stream[0].DESCRIPTOR)).SerializeToString())
    elif kind == "header-twice":
        frames.append(frames[0])
    return frames, f"stream: {kind} at {index}"


# --- calls --------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the server answered: its code, message, error trailers and responses."""

    code: grpc.StatusCode
    details: str
    trailers: bytes  # every trailing metadata key and value, concatenated
    reason: str | None
    responses: list[bytes]

    @property
    def reply_bytes(self) -> int:
        """What an error reply takes: its message and its trailers."""
        return len(self.details.encode()) + len(self.trailers)


def _reason(trailing: Any) -> str | None:
    from google.rpc import error_details_pb2, status_pb2

    for key, value in trailing or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return None


def call(channel: grpc.Channel, rpc: Rpc, frames: list[bytes], timeout: float) -> Outcome:
    """Send `frames` (serialized requests) to `rpc` as they are, and collect the answer."""
    responses: list[bytes] = []
    try:
        if rpc.client_streaming and rpc.server_streaming:
            method = channel.stream_stream(rpc.path)
            responses.extend(method(iter(frames), timeout=timeout))
        elif rpc.client_streaming:
            responses.append(channel.stream_unary(rpc.path)(iter(frames), timeout=timeout))
        elif rpc.server_streaming:
            responses.extend(channel.unary_stream(rpc.path)(frames[0], timeout=timeout))
        else:
            responses.append(channel.unary_unary(rpc.path)(frames[0], timeout=timeout))
    except grpc.RpcError as error:
        trailing = error.trailing_metadata() or ()  # type: ignore[attr-defined]
        trailers = b"".join(k.encode() + (v if isinstance(v, bytes) else v.encode()) for k, v in trailing)
        details = error.details() or ""  # type: ignore[attr-defined]
        return Outcome(error.code(), details, trailers, _reason(trailing), responses)  # type: ignore[attr-defined]
    return Outcome(grpc.StatusCode.OK, "", b"", None, responses)


# --- the store ----------------------------------------------------------------

# Folders (relative to the store root) that change without any request.
VOLATILE = ("tmp",)
_digests: dict[tuple[str, int, int, int], str] = {}


def _file_digest(path: Path, stat: os.stat_result) -> str:
    """The file's content hash; cached by inode, size and mtime once its mtime is old enough.

    File times tick coarsely (a few ms), so a file written twice within one
    tick keeps its mtime: recent files are always read again.
    """
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _digests:
        return _digests[key]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if time.time_ns() - stat.st_mtime_ns > 2_000_000_000:
        _digests[key] = digest
    return digest


def store_digest(root: Path) -> dict[str, str]:
    """Every file under `root` but the volatile folders: relative name -> content hash."""
    tree: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        relative = os.path.relpath(folder, root)
        if relative == ".":
            dirs[:] = [d for d in dirs if d not in VOLATILE]
        for name in dirs:
            tree[os.path.join(relative, name) + "/"] = "dir"
        for name in files:
            path = Path(folder) / name
            tree[os.path.join(relative, name)] = _file_digest(path, path.stat())
    return tree


def diff_digests(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Readable differences between two store digests."""
    changes = [f"+ {name}" for name in sorted(after.keys() - before.keys())]
    changes += [f"- {name}" for name in sorted(before.keys() - after.keys())]
    changes += [f"~ {name}" for name in sorted(before.keys() & after.keys()) if before[name] != after[name]]
    return changes
