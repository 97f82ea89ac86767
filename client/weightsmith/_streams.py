"""The weight and export streams: building what is sent, checking what arrives.

Nothing here does I/O; both clients feed these the messages of their calls.
Weight chunks bypass the generated message classes (`weightsmith.wire`): a
ReadWeights response is parsed as a view and copied once into its array, a
WriteWeights chunk is encoded straight from the array's buffer, and the bytes
on the wire stay plain protobuf.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, NamedTuple, TypeAlias, TypeVar

import numpy as np

from weightsmith import _checks, wire, zerocopy
from weightsmith.errors import DataLossError
from weightsmith.v1 import model_service_pb2, weight_service_pb2

T = TypeVar("T")
WriteWeightsMessage: TypeAlias = weight_service_pb2.WriteWeightsRequest | bytes

# Copies received chunks into their arrays while the stream goes on receiving.
COPIER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsmith-copy")
# Received chunks a read may have waiting for COPIER: beyond this the receiving thread waits for a
# copy (flow control then slows the server) instead of piling up messages in memory.
COPY_BACKLOG = 8


def malformed(what: str, problem: object) -> DataLossError:
    """The error for a message or stream the server got wrong."""
    return DataLossError(f"The server sent a malformed {what}: {problem}")


def weight_chunk_size(chunk_size_bytes: int) -> int:
    """Check a weight stream's chunk size; 0 stays 0 (the default)."""
    if chunk_size_bytes == 0:
        return 0
    return _checks.integer("chunk_size_bytes", chunk_size_bytes, wire.MIN_CHUNK_BYTES, wire.MAX_CHUNK_BYTES)


# --- ReadWeights ------------------------------------------------------------------


class ReadWeightsMessage(NamedTuple):
    """One parsed `ReadWeightsResponse`: the chunk (a view) and the revision."""

    chunk: wire.ChunkView | None
    revision: int
    error: str = ""


def parse_read_weights_response(data: bytes) -> ReadWeightsMessage:
    """Deserialize a `ReadWeightsResponse` without copying the chunk's data.

    Never raises: grpc would log and drop the error (grpc.aio even yields None),
    so a malformed message is returned with `error` set for `WeightsReader`.
    """
    try:
        chunk, rest = wire.parse_chunk_field(data, 1)
        revision = weight_service_pb2.ReadWeightsResponse.FromString(rest).revision if rest else 0
    except Exception as exc:  # Reported by WeightsReader, which raises DataLossError.
        return ReadWeightsMessage(None, 0, f"{type(exc).__name__}: {exc}")
    return ReadWeightsMessage(chunk, revision)


class _BoundedCopier(Executor):
    """COPIER, with at most `COPY_BACKLOG` of one read's chunks queued or being copied."""

    def __init__(self) -> None:
        self._slots = threading.BoundedSemaphore(COPY_BACKLOG)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        self._slots.acquire()
        try:
            future = COPIER.submit(fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future


class _Destinations(Mapping[str, np.ndarray]):
    """The assembler's `out`: the caller's arrays, else one allocated as its header arrives.

    The new array comes from `zerocopy.empty` (a mapping reused from the pool
    of freed ones where one of its size is kept) instead of the assembler's
    `np.empty`.
    """

    def __init__(self, out: Mapping[str, np.ndarray] | None) -> None:
        self._out = out or {}
        self._name = ""
        self._fresh: np.ndarray | None = None

    def prepare(self, chunk: wire.ChunkView) -> None:
        """Allocate the array for a tensor's first chunk, unless the caller gave one."""
        self._name, self._fresh = chunk.name, None
        if chunk.name in self._out or any(d < 0 for d in chunk.shape):
            return  # the assembler checks the caller's array, and refuses the shape
        self._fresh = zerocopy.empty(chunk.shape, wire.numpy_dtype(chunk.dtype))

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._out:
            return self._out[name]
        if name == self._name and self._fresh is not None:
            return self._fresh
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self._out) + (self._fresh is not None)

    def __iter__(self) -> Iterator[str]:
        yield from self._out
        if self._fresh is not None and self._name not in self._out:
            yield self._name

    def __bool__(self) -> bool:
        return True  # the assembler keeps this object, not `out or {}`


class WeightsReader:
    """Assembles a ReadWeights stream into arrays, in stream (model) order."""

    def __init__(self, out: Mapping[str, np.ndarray] | None = None) -> None:
        self._destinations = _Destinations(out)
        self._assembler = wire.TensorAssembler(_BoundedCopier(), self._destinations)
        self.revision: int | None = None

    def add(self, message: ReadWeightsMessage | None) -> None:
        """Copy one message's chunk into its tensor; `DataLossError` if malformed."""
        if message is None or message.chunk is None:
            problem = message.error if message is not None and message.error else "no chunk"
            raise malformed("ReadWeights message", problem)
        if self.revision is None:
            self.revision = message.revision
        elif message.revision != self.revision:
            raise malformed(
                "ReadWeights stream",
                f"revision changed from {self.revision} to {message.revision} mid-stream",
            )
        try:
            if message.chunk.name:
                self._destinations.prepare(message.chunk)
            self._assembler.add(message.chunk)
        except wire.OutMismatchError:
            raise
        except ValueError as exc:
            raise malformed("ReadWeights stream", exc) from exc

    def finish(self) -> dict[str, np.ndarray]:
        """Check the stream ended on a complete tensor and return all of them."""
        try:
            return self._assembler.finish()
        except ValueError as exc:
            raise malformed("ReadWeights stream", exc) from exc


# --- WriteWeights -----------------------------------------------------------------


def _weight_arrays(weights: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"Received an invalid `weights`, expected a mapping of variable path to "
            f"array. Received: {type(weights).__name__}"
        )
    if not weights:
        raise ValueError("Received no weights, expected at least one `{path: array}` entry to write.")
    arrays: list[tuple[str, np.ndarray]] = []
    for name, value in weights.items():
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"Received an invalid variable path, expected a non-empty string such as "
                f"'dense_1/kernel'. Received: {name!r}"
            )
        array = np.asarray(value)
        try:
            wire.wire_dtype(array.dtype)
        except ValueError as exc:
            raise ValueError(f"Received an unsupported array for {name!r}: {exc}") from None
        arrays.append((name, array))
    return arrays


def write_weights_messages(
    model_id: str,
    weights: Mapping[str, np.ndarray],
    *,
    expected_revision: int | None,
    message: str,
    allow_non_finite: bool,
    chunk_size_bytes: int,
) -> Iterator[WriteWeightsMessage]:
    """Return the WriteWeights stream: the header, then pre-encoded chunks.

    Everything is validated before the first message is produced: an error
    raised inside a request iterator would only cancel the call.
    """
    arrays = _weight_arrays(weights)
    chunk_bytes = weight_chunk_size(chunk_size_bytes) or wire.DEFAULT_CHUNK_BYTES
    header = weight_service_pb2.WriteWeightsHeader(
        model_id=model_id, message=message, allow_non_finite=bool(allow_non_finite)
    )
    if expected_revision is not None:
        header.expected_revision = _checks.integer("expected_revision", expected_revision, 1)

    def messages() -> Iterator[WriteWeightsMessage]:
        yield weight_service_pb2.WriteWeightsRequest(header=header)
        for name, array in arrays:
            for fields in wire.iter_tensor_chunks(name, array, chunk_bytes):
                yield wire.encode_chunk(2, *fields)

    return messages()


# --- ExportModel ------------------------------------------------------------------


class ExportReceiver:
    """Checks an ExportModel stream: consistent size and revision, every byte."""

    def __init__(self) -> None:
        self.size_bytes: int | None = None
        self.revision = 0
        self.received = 0

    def add(self, response: model_service_pb2.ExportModelResponse | None) -> bytes:
        """Return the chunk's bytes; `DataLossError` if the stream is inconsistent."""
        if response is None:
            raise malformed("ExportModel message", "it could not be parsed")
        if self.size_bytes is None:
            self.size_bytes = response.size_bytes
            self.revision = response.revision
        elif (response.size_bytes, response.revision) != (self.size_bytes, self.revision):
            raise malformed(
                "ExportModel stream",
                f"size/revision changed from {self.size_bytes}/{self.revision} to "
                f"{response.size_bytes}/{response.revision} mid-stream",
            )
        self.received += len(response.chunk)
        if self.received > self.size_bytes:
            raise malformed("ExportModel stream", f"more than the announced {self.size_bytes} bytes")
        return response.chunk

    def finish(self) -> None:
        """Check every announced byte arrived."""
        if self.size_bytes is None:
            raise malformed("ExportModel stream", "it ended without any message")
        if self.received != self.size_bytes:
            raise malformed(
                "ExportModel stream",
                f"it ended after {self.received} of {self.size_bytes} bytes",
            )


def partial_path(path: pathlib.Path) -> pathlib.Path:
    """Where an export is written before it is renamed into place."""
    return path.with_name(f".{path.name}.part")
