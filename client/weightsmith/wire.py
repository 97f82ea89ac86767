"""Tensors on the wire: dtype mapping, small tensors, and the zero-copy chunk codec.

Weights travel as `TensorChunk`s of 1-4 MiB. The generated protobuf classes
would copy every chunk's bytes twice on each side (`arr.tobytes()`, then
serialization; parsing, then `np.frombuffer(...).copy()`), so the hot path
encodes and parses the few header fields itself and moves `data` with a single
copy. The bytes on the wire stay standard protobuf: any language's stubs
parse what this writes, and this parses what they write (fields in any order,
unknown fields skipped, shape packed or not).

Public because the server imports it too: both ends share this one codec,
so what the client encodes is exactly what the server parses and vice versa.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from weightsmith.v1 import tensor_pb2

# Bounds on what a peer can make us parse: far above any real tensor, far
# below what would let a crafted header stall a server.
MAX_RANK = 32
MAX_NAME_BYTES = 1024
MAX_HEADER_BYTES = 64 * 1024

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024

_WIRE_VARINT = 0
_WIRE_I64 = 1
_WIRE_LEN = 2
_WIRE_I32 = 5


def _bfloat16() -> np.dtype | None:
    try:
        import ml_dtypes
    except ImportError:  # ml_dtypes is optional on the client side.
        return None
    return np.dtype(ml_dtypes.bfloat16)


_NUMPY_BY_DTYPE: dict[int, np.dtype] = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DATA_TYPE_INT8: np.dtype("i1"),
    tensor_pb2.DATA_TYPE_INT16: np.dtype("<i2"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
    tensor_pb2.DATA_TYPE_UINT16: np.dtype("<u2"),
    tensor_pb2.DATA_TYPE_UINT32: np.dtype("<u4"),
    tensor_pb2.DATA_TYPE_UINT64: np.dtype("<u8"),
    tensor_pb2.DATA_TYPE_BOOL: np.dtype("?"),
}
_BFLOAT16 = _bfloat16()
if _BFLOAT16 is not None:
    _NUMPY_BY_DTYPE[tensor_pb2.DATA_TYPE_BFLOAT16] = _BFLOAT16
_DTYPE_BY_NUMPY: dict[np.dtype, int] = {v: k for k, v in _NUMPY_BY_DTYPE.items()}


def numpy_dtype(dtype: int) -> np.dtype:
    """Return the numpy dtype of a `DataType` value; `ValueError` if unknown."""
    try:
        return _NUMPY_BY_DTYPE[dtype]
    except KeyError:
        name = tensor_pb2.DataType.Name(dtype) if dtype in tensor_pb2.DataType.values() else dtype
        raise ValueError(
            f"Received an unsupported dtype, expected one of "
            f"{sorted(tensor_pb2.DataType.Name(d) for d in _NUMPY_BY_DTYPE)}. Received: {name}"
        ) from None


def wire_dtype(dtype: np.dtype | type | str) -> int:
    """Return the `DataType` value of a numpy dtype; `ValueError` if it has none."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _DTYPE_BY_NUMPY[dt]
    except KeyError:
        raise ValueError(f"numpy dtype {dt} has no weightsmith DataType") from None


def dtype_name(dtype: int) -> str:
    """Return a short readable name such as `float32` for a `DataType` value."""
    try:
        return tensor_pb2.DataType.Name(dtype).removeprefix("DATA_TYPE_").lower()
    except ValueError:
        return str(dtype)


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    # Not `np.ascontiguousarray` alone: it turns a 0-d array into shape (1,).
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def tensor_to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    """Encode a numpy array as a single `Tensor` message."""
    array = _little_endian(np.asarray(array))
    return tensor_pb2.Tensor(dtype=wire_dtype(array.dtype), shape=array.shape, data=array.tobytes())


def tensor_from_proto(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Decode a `Tensor` message into a read-only numpy array (no copy)."""
    dtype = numpy_dtype(tensor.dtype)
    if len(tensor.shape) > MAX_RANK:
        raise ValueError(f"Received a tensor of rank {len(tensor.shape)}, expected at most {MAX_RANK}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"Received a negative dimension in shape {list(shape)}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"Received {len(tensor.data)} bytes of data, expected {expected} for shape "
            f"{list(shape)} and dtype {dtype_name(tensor.dtype)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


# --- protobuf wire format, just what the chunk codec needs ------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("malformed protobuf: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# Fields in one chunk message: a handful are real; thousands are an attack.
_MAX_FIELDS = 256


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield `(field_number, wire_type, value)`; LEN values are zero-copy views."""
    pos = 0
    end = len(buf)
    count = 0
    while pos < end:
        count += 1
        if count > _MAX_FIELDS:
            raise ValueError(f"malformed chunk: more than {_MAX_FIELDS} fields")
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _WIRE_VARINT:
            value, pos = _read_varint(buf, pos)
            yield number, wire_type, value
        elif wire_type == _WIRE_LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise ValueError("malformed protobuf: field runs past the message")
            yield number, wire_type, buf[pos : pos + length]
            pos += length
        elif wire_type == _WIRE_I64:
            pos += 8
        elif wire_type == _WIRE_I32:
            pos += 4
        else:
            raise ValueError(f"malformed protobuf: wire type {wire_type}")
    if pos != end:
        raise ValueError("malformed protobuf: truncated fixed-width field")


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A parsed `TensorChunk` whose `data` is a view into the received message."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    data: memoryview


def _parse_chunk(buf: memoryview) -> ChunkView:
    name = ""
    dtype = 0
    shape: list[int] = []
    offset = 0
    data = memoryview(b"")
    for number, wire_type, value in _fields(buf):
        if number == 1 and wire_type == _WIRE_LEN:
            if len(value) > MAX_NAME_BYTES:  # type: ignore[arg-type]
                raise ValueError(f"tensor name longer than {MAX_NAME_BYTES} bytes")
            name = bytes(value).decode("utf-8")
        elif number == 2 and wire_type == _WIRE_VARINT:
            dtype = value  # type: ignore[assignment]
        elif number == 3 and wire_type == _WIRE_LEN:
            packed = value
            if len(packed) > 10 * MAX_RANK:  # type: ignore[arg-type]
                raise ValueError(f"tensor shape of more than {MAX_RANK} dimensions")
            pos = 0
            while pos < len(packed):  # type: ignore[arg-type]
                dim, pos = _read_varint(packed, pos)  # type: ignore[arg-type]
                shape.append(_signed64(dim))
        elif number == 3 and wire_type == _WIRE_VARINT:
            shape.append(_signed64(value))  # type: ignore[arg-type]
            if len(shape) > MAX_RANK:
                raise ValueError(f"tensor shape of more than {MAX_RANK} dimensions")
        elif number == 4 and wire_type == _WIRE_VARINT:
            offset = _signed64(value)  # type: ignore[arg-type]
        elif number == 5 and wire_type == _WIRE_LEN:
            data = value  # type: ignore[assignment]
    return ChunkView(name=name, dtype=dtype, shape=tuple(shape), offset=offset, data=data)


def parse_chunk_field(message: bytes, field_number: int) -> tuple[ChunkView | None, bytes]:
    """Split a message holding a `TensorChunk` at `field_number`.

    Returns the chunk (or None when absent) and the message's other fields,
    re-encoded, for the generated class to parse. Beside a chunk they are a
    few bytes (at most MAX_HEADER_BYTES); a message without a chunk (a
    stream's header) may be as large as the transport allows, and its own
    fields are bounded by whoever reads them.
    """
    buf = memoryview(message)
    chunk: ChunkView | None = None
    rest: list[bytes | memoryview] = []
    rest_bytes = 0
    for number, wire_type, value in _fields(buf):
        if number == field_number and wire_type == _WIRE_LEN:
            chunk = _parse_chunk(value)  # type: ignore[arg-type]
        elif wire_type == _WIRE_VARINT:
            rest.append(_varint(number << 3 | wire_type) + _varint(value))  # type: ignore[arg-type]
        elif wire_type == _WIRE_LEN:
            rest_bytes += len(value)  # type: ignore[arg-type]
            rest.append(_varint(number << 3 | wire_type) + _varint(len(value)))  # type: ignore[arg-type]
            rest.append(value)  # type: ignore[arg-type]
    if chunk is not None and rest_bytes > MAX_HEADER_BYTES:
        raise ValueError(f"more than {MAX_HEADER_BYTES} bytes of fields besides the chunk")
    return chunk, b"".join(rest)


def encode_chunk(
    field_number: int,
    name: str,
    dtype: int,
    shape: tuple[int, ...],
    offset: int,
    data: memoryview,
    trailer: bytes = b"",
) -> bytes:
    """Serialize a message whose field `field_number` is a `TensorChunk`.

    `data` is copied once, into the returned bytes. `trailer` holds the outer
    message's other fields, already encoded.
    """
    header = tensor_pb2.TensorChunk(
        name=name, dtype=dtype, shape=shape if name else (), offset=offset
    ).SerializeToString()
    data_prefix = b"\x2a" + _varint(len(data))
    inner_length = len(header) + len(data_prefix) + len(data)
    return b"".join(
        (
            _varint(field_number << 3 | _WIRE_LEN),
            _varint(inner_length),
            header,
            data_prefix,
            data,
            trailer,
        )
    )


def varint_field(field_number: int, value: int) -> bytes:
    """Encode one varint field, for `encode_chunk`'s trailer."""
    return _varint(field_number << 3 | _WIRE_VARINT) + _varint(value)


def byte_view(array: np.ndarray) -> memoryview:
    """Return a flat byte view of a C-contiguous little-endian array (no copy)."""
    return memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")


def iter_tensor_chunks(
    name: str, array: np.ndarray, chunk_bytes: int
) -> Iterator[tuple[str, int, tuple[int, ...], int, memoryview]]:
    """Split one tensor into `(name, dtype, shape, offset, data)` chunk fields.

    Every tensor yields at least one chunk, even when it has no elements.
    """
    array = _little_endian(array)
    dtype = wire_dtype(array.dtype)
    view = byte_view(array)
    total = len(view)
    offset = 0
    first = True
    while first or offset < total:
        end = min(offset + chunk_bytes, total)
        yield (name if first else "", dtype, array.shape, offset, view[offset:end])
        first = False
        offset = end


class OutMismatchError(ValueError):
    """An `out` array does not match the tensor the server sent."""


def _copy_into(target: np.ndarray, data: memoryview) -> None:
    # numpy releases the GIL for a large copy, so it overlaps with receiving.
    np.copyto(target, np.frombuffer(data, dtype=np.uint8))


class TensorAssembler:
    """Rebuilds tensors from a chunk stream into preallocated arrays.

    Checks what the protocol promises: a tensor's first chunk names it, chunks
    continue it in order without gaps or overlaps, and it is complete before
    the next begins. Raises `ValueError` naming the problem otherwise.

    With a `copier` executor the byte copies run there, so that the thread
    receiving the stream is never held up by them; `finish` waits for them.
    Arrays in `out` are filled in place instead of allocating new ones (which
    saves the page faults of fresh memory on repeated reads).
    """

    def __init__(self, copier: Executor | None = None, out: Mapping[str, np.ndarray] | None = None) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self._copier = copier
        self._out = out or {}
        self._pending: list[Future[None]] = []
        self._current: str | None = None
        self._buffer: memoryview | None = None
        self._target: np.ndarray | None = None
        self._filled = 0

    def add(self, chunk: ChunkView) -> None:
        """Copy one chunk into its tensor."""
        if chunk.name:
            self._finish_current()
            if chunk.name in self.tensors:
                raise ValueError(f"tensor {chunk.name!r} was sent twice")
            dtype = numpy_dtype(chunk.dtype)
            if any(d < 0 for d in chunk.shape):
                raise ValueError(f"negative dimension in shape {list(chunk.shape)}")
            array = self._out.get(chunk.name)
            if array is None:
                array = np.empty(chunk.shape, dtype=dtype)
            elif array.shape != chunk.shape or array.dtype != dtype or not array.flags.c_contiguous:
                raise OutMismatchError(
                    f"out[{chunk.name!r}] is a {array.dtype} array of shape {array.shape}, expected a "
                    f"C-contiguous {dtype} array of shape {chunk.shape}"
                )
            self.tensors[chunk.name] = array
            self._current = chunk.name
            self._buffer = byte_view(array)
            self._target = array.reshape(-1).view(np.uint8) if array.size else None
            self._filled = 0
        elif self._current is None:
            raise ValueError("a chunk without a name must continue a tensor")
        assert self._buffer is not None
        if chunk.offset != self._filled:
            kind = "overlaps" if chunk.offset < self._filled else "leaves a gap before"
            raise ValueError(
                f"chunk at offset {chunk.offset} {kind} byte {self._filled} of {self._current!r}"
            )
        end = chunk.offset + len(chunk.data)
        if end > len(self._buffer):
            raise ValueError(
                f"chunk ends at byte {end}, past the {len(self._buffer)} bytes of {self._current!r}"
            )
        if end > chunk.offset and self._target is not None:  # empty tensors have no buffer
            target = self._target[chunk.offset : end]
            if self._copier is None:
                _copy_into(target, chunk.data)
            else:
                self._pending.append(self._copier.submit(_copy_into, target, chunk.data))
        self._filled = end

    def _finish_current(self) -> None:
        if self._current is not None and self._buffer is not None and self._filled != len(self._buffer):
            raise ValueError(
                f"tensor {self._current!r} ended after {self._filled} of {len(self._buffer)} bytes"
            )
        self._current = None
        self._buffer = None

    def finish(self) -> dict[str, np.ndarray]:
        """Check the last tensor is complete, wait for the copies, return all tensors."""
        self._finish_current()
        for pending in self._pending:
            pending.result()
        self._pending.clear()
        return self.tensors
