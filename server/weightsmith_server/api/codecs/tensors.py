"""Tensors between the wire and numpy, with errors that name the field.

Wraps the client's codec (`weightsmith.wire`), which both ends share, and
turns its `ValueError`s into `InvalidArgument`s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from weightsmith import wire
from weightsmith.v1 import tensor_pb2, weight_service_pb2
from weightsmith_server.dtypes import numpy_dtype
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.tensor_spec import TensorSpecInfo


def wire_dtype(name: str) -> int:
    """The wire `DataType` of a stored or Keras dtype name (`float32`, ...)."""
    return wire.wire_dtype(numpy_dtype(name))


def tensor_spec(spec: TensorSpecInfo) -> tensor_pb2.TensorSpec:
    """A model input or output, or a dataset feature, as a TensorSpec."""
    return tensor_pb2.TensorSpec(name=spec.name, dtype=wire_dtype(spec.dtype), shape=spec.shape)


def decode_tensor(tensor: tensor_pb2.Tensor, *, field: str) -> np.ndarray:
    """A `Tensor` message as a read-only array, validated."""
    try:
        return wire.tensor_from_proto(tensor)
    except ValueError as exc:
        raise InvalidArgument(str(exc), reason="INVALID_TENSOR", field=field) from exc


def encode_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    return wire.tensor_to_proto(array)


def encode_read_chunks(path: str, array: np.ndarray, chunk_bytes: int, revision: int) -> Iterator[bytes]:
    """Serialized `ReadWeightsResponse`s for one tensor: one copy of its bytes."""
    trailer = wire.varint_field(2, revision)
    for name, dtype, shape, offset, data in wire.iter_tensor_chunks(path, array, chunk_bytes):
        yield wire.encode_chunk(1, name, dtype, shape, offset, data, trailer)


def serialize_read_response(message: bytes | weight_service_pb2.ReadWeightsResponse) -> bytes:
    """Response serializer that passes pre-encoded chunks through untouched."""
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass(frozen=True)
class MalformedMessage:
    """A request message that failed to parse, and why (reported in order)."""

    problem: str


def parse_write_request(
    data: bytes,
) -> wire.ChunkView | weight_service_pb2.WriteWeightsRequest | MalformedMessage:
    """Request deserializer: chunks as zero-copy views, the header as a message.

    A malformed message is passed on as `MalformedMessage`: a deserializer that
    raised would end the call with an opaque status instead of a clear error.
    """
    try:
        chunk, _ = wire.parse_chunk_field(data, 2)
    except ValueError as exc:
        return MalformedMessage(str(exc))
    if chunk is not None:
        return chunk
    try:
        return weight_service_pb2.WriteWeightsRequest.FromString(data)
    except DecodeError as exc:
        return MalformedMessage(f"not a WriteWeightsRequest: {exc}")


def chunk_size(requested: int, default: int) -> int:
    """A stream's chunk size in bytes: the server default for 0, else within the codec's bounds."""
    if requested == 0:
        return default
    if not wire.MIN_CHUNK_BYTES <= requested <= wire.MAX_CHUNK_BYTES:
        raise InvalidArgument(
            f"Received chunk_size_bytes={requested}, expected 0 (server default) or "
            f"{wire.MIN_CHUNK_BYTES} to {wire.MAX_CHUNK_BYTES}.",
            reason="INVALID_CHUNK_SIZE",
            field="chunk_size_bytes",
        )
    return requested
