"""What `Client` and `AsyncClient` share: configuration, requests and decoding.

Nothing here talks to the network, so the two clients differ only in how they
call grpc. The weight streams bypass the generated stubs: their multicallables
are built on the channel with serializers from `_wire`, which move a chunk's
bytes with one copy each way while the wire format stays plain protobuf.
"""

from __future__ import annotations

import getpass
import io
import json
import os
import pathlib
import socket
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, NamedTuple, Protocol, TypeAlias

import grpc
import numpy as np

from weightsmith import _wire
from weightsmith._types import PredictResult, SelectorLike, _strings, selector_to_proto
from weightsmith.errors import DataLossError
from weightsmith.v1 import edits_pb2, model_service_pb2, tensor_pb2, training_service_pb2, weight_service_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_UPLOAD_CHUNK_BYTES = 1024 * 1024
AUTHOR_METADATA_KEY = "weightsmith-author"

MODEL_SERVICE = "weightsmith.v1.ModelService"
WEIGHT_SERVICE = "weightsmith.v1.WeightService"
TRAINING_SERVICE = "weightsmith.v1.TrainingService"
READ_WEIGHTS_METHOD = f"/{WEIGHT_SERVICE}/ReadWeights"
WRITE_WEIGHTS_METHOD = f"/{WEIGHT_SERVICE}/WriteWeights"

# Only reads are retried: replaying a mutation could commit it twice. WatchJob
# is not here either: `watch_job` reconnects itself from the last event seen.
RETRIED_METHODS: tuple[tuple[str, str], ...] = (
    (MODEL_SERVICE, "GetModel"),
    (MODEL_SERVICE, "ListModels"),
    (MODEL_SERVICE, "Predict"),
    (MODEL_SERVICE, "GetServerInfo"),
    (MODEL_SERVICE, "Evaluate"),
    (WEIGHT_SERVICE, "ReadWeights"),
    (WEIGHT_SERVICE, "ListRevisions"),
    (WEIGHT_SERVICE, "GetRevision"),
    (WEIGHT_SERVICE, "DiffRevisions"),
    (TRAINING_SERVICE, "GetDataset"),
    (TRAINING_SERVICE, "ListDatasets"),
    (TRAINING_SERVICE, "GetJob"),
    (TRAINING_SERVICE, "ListJobs"),
    (TRAINING_SERVICE, "ListJobEvents"),
)

SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{"service": service, "method": method} for service, method in RETRIED_METHODS],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

# Pings detect dead connections under long, quiet streams. A grpc server by
# default answers pings closer than 5 minutes apart with strikes and then a
# GOAWAY ("too_many_pings"), so the client never pings more often than that.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)

# Room for the fields around a `bytes` payload in one message.
_MESSAGE_OVERHEAD_BYTES = 1024

ChannelOptions: TypeAlias = Sequence[tuple[str, Any]]
PredictInputs: TypeAlias = np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray]
WriteWeightsMessage: TypeAlias = weight_service_pb2.WriteWeightsRequest | bytes

_POOLING = {
    None: model_service_pb2.POOLING_UNSPECIFIED,
    "avg": model_service_pb2.POOLING_AVG,
    "max": model_service_pb2.POOLING_MAX,
}
_EXPORT_FORMATS = {
    "keras": model_service_pb2.EXPORT_FORMAT_KERAS,
    "saved_model": model_service_pb2.EXPORT_FORMAT_SAVED_MODEL,
}


def default_author() -> str:
    """Return `user@host` for the `weightsmith-author` header."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # No login name, e.g. an arbitrary container uid.
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    author = f"{user}@{socket.gethostname()}"
    # grpc metadata values must be printable ASCII.
    return "".join(c if " " <= c <= "~" else "?" for c in author)


def _check_author(author: str) -> str:
    if not isinstance(author, str) or not author or not all(" " <= c <= "~" for c in author):
        raise ValueError(
            f"Received an invalid `author`, expected a non-empty string of printable ASCII "
            f"characters (it travels as gRPC metadata). Received: author={author!r}"
        )
    return author


def _check_timeout(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"Received an invalid `{name}`, expected a positive number of seconds or None "
            f"for no deadline. Received: {name}={value!r}"
        )
    return float(value)


def _check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Received a non-integer `{name}`, expected an int. Received: {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        expected = f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}"
        raise ValueError(f"Received an invalid `{name}`, expected {expected}. Received: {value}")
    return int(value)


def _check_weight_chunk_size(chunk_size_bytes: int) -> int:
    if chunk_size_bytes == 0:
        return 0
    return _check_int("chunk_size_bytes", chunk_size_bytes, _wire.MIN_CHUNK_BYTES, _wire.MAX_CHUNK_BYTES)


def _malformed(what: str, problem: object) -> DataLossError:
    return DataLossError(f"The server sent a malformed {what}: {problem}")


class ReadWeightsMessage(NamedTuple):
    """One parsed `ReadWeightsResponse`: the chunk (a view) and the revision."""

    chunk: _wire.ChunkView | None
    revision: int
    error: str = ""


def parse_read_weights_response(data: bytes) -> ReadWeightsMessage:
    """Deserialize a `ReadWeightsResponse` without copying the chunk's data.

    Never raises: grpc would log and drop the error (grpc.aio even yields None),
    so a malformed message is returned with `error` set for `WeightsReader`.
    """
    try:
        chunk, rest = _wire.parse_chunk_field(data, 1)
        revision = weight_service_pb2.ReadWeightsResponse.FromString(rest).revision if rest else 0
    except Exception as exc:  # Reported by WeightsReader, which raises DataLossError.
        return ReadWeightsMessage(None, 0, f"{type(exc).__name__}: {exc}")
    return ReadWeightsMessage(chunk, revision)


def serialize_write_weights_request(message: WriteWeightsMessage) -> bytes:
    """Serialize the header message; chunk messages are already bytes."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


# Copies received chunks into their arrays while the stream goes on receiving.
COPIER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsmith-copy")


class WeightsReader:
    """Assembles a ReadWeights stream into arrays, in stream (model) order."""

    def __init__(self, out: Mapping[str, np.ndarray] | None = None) -> None:
        self._assembler = _wire.TensorAssembler(COPIER, out)
        self.revision: int | None = None

    def add(self, message: ReadWeightsMessage | None) -> None:
        """Copy one message's chunk into its tensor; `DataLossError` if malformed."""
        if message is None or message.chunk is None:
            problem = message.error if message is not None and message.error else "no chunk"
            raise _malformed("ReadWeights message", problem)
        if self.revision is None:
            self.revision = message.revision
        elif message.revision != self.revision:
            raise _malformed(
                "ReadWeights stream",
                f"revision changed from {self.revision} to {message.revision} mid-stream",
            )
        try:
            self._assembler.add(message.chunk)
        except _wire.OutMismatchError:
            raise
        except ValueError as exc:
            raise _malformed("ReadWeights stream", exc) from exc

    def finish(self) -> dict[str, np.ndarray]:
        """Check the stream ended on a complete tensor and return all of them."""
        try:
            return self._assembler.finish()
        except ValueError as exc:
            raise _malformed("ReadWeights stream", exc) from exc


class ExportReceiver:
    """Checks an ExportModel stream: consistent size and revision, every byte."""

    def __init__(self) -> None:
        self.size_bytes: int | None = None
        self.revision = 0
        self.received = 0

    def add(self, response: model_service_pb2.ExportModelResponse | None) -> bytes:
        """Return the chunk's bytes; `DataLossError` if the stream is inconsistent."""
        if response is None:
            raise _malformed("ExportModel message", "it could not be parsed")
        if self.size_bytes is None:
            self.size_bytes = response.size_bytes
            self.revision = response.revision
        elif (response.size_bytes, response.revision) != (self.size_bytes, self.revision):
            raise _malformed(
                "ExportModel stream",
                f"size/revision changed from {self.size_bytes}/{self.revision} to "
                f"{response.size_bytes}/{response.revision} mid-stream",
            )
        self.received += len(response.chunk)
        if self.received > self.size_bytes:
            raise _malformed("ExportModel stream", f"more than the announced {self.size_bytes} bytes")
        return response.chunk

    def finish(self) -> None:
        """Check every announced byte arrived."""
        if self.size_bytes is None:
            raise _malformed("ExportModel stream", "it ended without any message")
        if self.received != self.size_bytes:
            raise _malformed(
                "ExportModel stream",
                f"it ended after {self.received} of {self.size_bytes} bytes",
            )


@dataclass(frozen=True)
class UploadSource:
    """A `.keras` file to upload: on disk at `path`, else in memory as `data`."""

    size_bytes: int
    data: bytes = b""
    path: pathlib.Path | None = None


def partial_path(path: pathlib.Path) -> pathlib.Path:
    """Where an export is written before it is renamed into place."""
    return path.with_name(f".{path.name}.part")


# --- datasets -------------------------------------------------------------------

DatasetSourceLike: TypeAlias = Mapping[str, np.ndarray] | str | os.PathLike[str] | bytes
FeatureSpecLike: TypeAlias = training_service_pb2.FeatureSpec | tuple[str, Any, Sequence[int]]

DATASET_FORMATS: dict[str, int] = {
    "npz": training_service_pb2.DATASET_FORMAT_NPZ,
    "tfrecord": training_service_pb2.DATASET_FORMAT_TFRECORD,
    "image_folder": training_service_pb2.DATASET_FORMAT_IMAGE_FOLDER,
}
_NPZ_KEYS = ("x", "y", "x_val", "y_val")
_FEATURE_DTYPES = {
    "float32": tensor_pb2.DATA_TYPE_FLOAT32,
    "int64": tensor_pb2.DATA_TYPE_INT64,
    "uint8": tensor_pb2.DATA_TYPE_UINT8,
}
_SUFFIX_FORMATS: tuple[tuple[tuple[str, ...], str], ...] = (
    ((".npz",), "npz"),
    ((".tfrecord", ".tfrecords"), "tfrecord"),
    ((".zip", ".tar", ".tar.gz", ".tgz"), "image_folder"),
)
_DATASET_SPLITS = {
    "train": model_service_pb2.DATASET_SPLIT_TRAIN,
    "validation": model_service_pb2.DATASET_SPLIT_VALIDATION,
}


def detect_dataset_format(path: pathlib.Path) -> str | None:
    """Return the format a dataset path implies (a directory is an image folder); None if unknown."""
    if path.is_dir():
        return "image_folder"
    name = path.name.lower()
    for suffixes, format in _SUFFIX_FORMATS:
        if name.endswith(suffixes):
            return format
    return None


def npz_buffer(arrays: Mapping[str, Any]) -> io.BytesIO:
    """Serialize `{"x", "y", "x_val"?, "y_val"?}` arrays as an `.npz` in memory, positioned at 0."""
    keys = list(arrays)
    unknown = [key for key in keys if key not in _NPZ_KEYS]
    if unknown or "x" not in arrays or "y" not in arrays or (("x_val" in arrays) != ("y_val" in arrays)):
        raise ValueError(
            f"Received dataset arrays {keys}, expected 'x' and 'y', optionally with both 'x_val' and "
            f"'y_val', and no other key."
        )
    checked: dict[str, np.ndarray] = {}
    for key in _NPZ_KEYS:
        if key not in arrays:
            continue
        array = np.asarray(arrays[key])
        if array.dtype.hasobject or array.ndim == 0:
            raise ValueError(
                f"Received an invalid array {key!r}, expected a numeric array with a batch dimension. "
                f"Received: dtype={array.dtype}, shape={array.shape}"
            )
        checked[key] = array
    for features, labels in (("x", "y"), ("x_val", "y_val")):
        if features in checked and len(checked[features]) != len(checked[labels]):
            raise ValueError(
                f"Received {len(checked[features])} examples in {features!r} but "
                f"{len(checked[labels])} in {labels!r}, expected as many labels as examples."
            )
    buffer = io.BytesIO()
    np.savez(buffer, **checked)
    buffer.seek(0)
    return buffer


def zip_image_folder(directory: pathlib.Path) -> IO[bytes]:
    """Zip an image folder (one subfolder per class) into a temporary file, positioned at 0.

    Entries are `class/filename` (deeper paths kept), sorted; hidden files and
    folders and files directly in `directory` are left out. Images are stored
    without compression: they are compressed already. The file is deleted
    when closed.
    """
    classes = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(
            f"Received an image folder without class subfolders, expected one subfolder of images "
            f"per class. Received: {str(directory)!r}"
        )
    file = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    try:
        count = 0
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for class_dir in classes:
                for path in sorted(class_dir.rglob("*")):
                    relative = path.relative_to(directory)
                    if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                        archive.write(path, relative.as_posix())
                        count += 1
        if not count:
            raise ValueError(
                f"Received an image folder whose class subfolders hold no file, expected images. "
                f"Received: {str(directory)!r}"
            )
        file.seek(0)
    except BaseException:
        file.close()
        raise
    return file


@dataclass(eq=False)
class DatasetUpload:
    """A dataset to upload: its header, then the bytes of a file or of an owned buffer.

    One-shot: `open()` hands over the buffer (an in-memory `.npz`, raw bytes
    or a temporary zip), which closing deletes.
    """

    header: training_service_pb2.UploadDatasetRequest
    path: pathlib.Path | None = None
    buffer: IO[bytes] | None = None

    @property
    def size_bytes(self) -> int:
        """Bytes the upload streams after the header."""
        return self.header.header.size_bytes

    def open(self) -> IO[bytes]:
        """Return the bytes to stream as a file object; the caller closes it."""
        if self.path is not None:
            return self.path.open("rb")
        assert self.buffer is not None
        self.buffer.seek(0)
        return self.buffer

    def messages(self, chunk_size_bytes: int) -> Iterator[training_service_pb2.UploadDatasetRequest]:
        """Yield the UploadDataset stream: the header, then chunks of at most `chunk_size_bytes`."""
        yield self.header
        with self.open() as file:
            while block := file.read(chunk_size_bytes):
                yield training_service_pb2.UploadDatasetRequest(chunk=block)

    def close(self) -> None:
        """Release the buffer (deleting a temporary zip); idempotent."""
        if self.buffer is not None:
            self.buffer.close()


def _buffer_size(buffer: IO[bytes]) -> int:
    size = buffer.seek(0, io.SEEK_END)
    buffer.seek(0)
    return size


def _feature_spec(name: str, value: FeatureSpecLike | None, format: str) -> training_service_pb2.FeatureSpec:
    if value is None:
        raise ValueError(
            f"Received no `{name}`, expected a `(name, dtype, shape)` tuple or a FeatureSpec with "
            f"format={format!r}, for example ('image', 'uint8', [32, 32, 3])."
        )
    if isinstance(value, training_service_pb2.FeatureSpec):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise TypeError(
            f"Received an invalid `{name}`, expected a `(name, dtype, shape)` tuple or a FeatureSpec. "
            f"Received: {name}={value!r}"
        )
    key, dtype, shape = value
    if not isinstance(key, str) or not key:
        raise ValueError(
            f"Received an invalid feature name in `{name}`, expected the non-empty key of the "
            f"feature in each tf.train.Example. Received: {key!r}"
        )
    try:
        dtype_name = np.dtype(dtype).name
    except TypeError:
        dtype_name = str(dtype)
    if dtype_name not in _FEATURE_DTYPES:
        raise ValueError(
            f"Received an invalid dtype in `{name}`, expected one of {sorted(_FEATURE_DTYPES)} "
            f"(uint8 reads a bytes_list of raw bytes). Received: {dtype!r}"
        )
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(
            f"Received an invalid shape in `{name}`, expected a sequence of dimensions such as "
            f"[32, 32, 3] ([] for a scalar). Received: {shape!r}"
        )
    return training_service_pb2.FeatureSpec(
        name=key,
        dtype=_FEATURE_DTYPES[dtype_name],
        shape=[_check_int(f"{name} shape[{i}]", d, 1) for i, d in enumerate(shape)],
    )


def dataset_source(
    format: str,
    *,
    tfrecord_features: FeatureSpecLike | None,
    tfrecord_labels: FeatureSpecLike | None,
    image_size: Sequence[int] | None,
    channels: int,
) -> training_service_pb2.DatasetSource:
    """Build the `DatasetSource` of a format name and its options, checking they go together."""
    if format not in DATASET_FORMATS:
        raise ValueError(
            f"Received an invalid `format`, expected one of {sorted(DATASET_FORMATS)}. "
            f"Received: format={format!r}"
        )
    channels = _check_int("channels", channels, 1, 3)
    if channels == 2:
        raise ValueError("Received channels=2, expected 1 (grayscale) or 3 (RGB).")
    misplaced = [
        name
        for name, given, owner in (
            ("tfrecord_features", tfrecord_features is not None, "tfrecord"),
            ("tfrecord_labels", tfrecord_labels is not None, "tfrecord"),
            ("image_size", image_size is not None, "image_folder"),
        )
        if given and format != owner
    ]
    if misplaced:
        raise ValueError(
            f"Received {misplaced} with format={format!r}, expected `tfrecord_*` only with "
            f"'tfrecord' and `image_size` only with 'image_folder'."
        )
    source = training_service_pb2.DatasetSource(format=DATASET_FORMATS[format])
    if format == "tfrecord":
        source.tfrecord.features.CopyFrom(_feature_spec("tfrecord_features", tfrecord_features, format))
        source.tfrecord.labels.CopyFrom(_feature_spec("tfrecord_labels", tfrecord_labels, format))
    elif format == "image_folder":
        if image_size is None or isinstance(image_size, (str, bytes)) or len(image_size) != 2:
            raise ValueError(
                f"Received an invalid `image_size`, expected (height, width) for an image folder, "
                f"for example (96, 96). Received: image_size={image_size!r}"
            )
        source.image_folder.image_size.extend(
            _check_int(f"image_size[{i}]", d, 1) for i, d in enumerate(image_size)
        )
        source.image_folder.channels = channels
    return source


# --- jobs -----------------------------------------------------------------------

DEFAULT_MAX_RECONNECTS = 20
WATCH_BACKOFF_INITIAL_S = 0.2
WATCH_BACKOFF_MAX_S = 2.0
TERMINAL_JOB_STATES = frozenset(
    {
        training_service_pb2.JOB_STATE_SUCCEEDED,
        training_service_pb2.JOB_STATE_FAILED,
        training_service_pb2.JOB_STATE_CANCELLED,
    }
)
_RECONNECTABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# How grpc words a connection that dropped mid-stream when it reports it as
# INTERNAL or UNKNOWN rather than UNAVAILABLE.
_DROPPED_CONNECTION_MARKERS = (
    "rst_stream",
    "stream removed",
    "socket closed",
    "connection reset",
    "goaway",
    "unexpected eos",
)


def is_reconnectable(exc: grpc.RpcError) -> bool:
    """Whether a failed WatchJob stream may be resumed: the connection failed, not the request."""
    code_method = getattr(exc, "code", None)
    code = code_method() if callable(code_method) else grpc.StatusCode.UNKNOWN
    if code in _RECONNECTABLE_CODES:
        return True
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        details_method = getattr(exc, "details", None)
        details = str((details_method() if callable(details_method) else None) or exc).lower()
        return any(marker in details for marker in _DROPPED_CONNECTION_MARKERS)
    return False


class JobWatch:
    """The state of one `watch_job` across reconnections; both clients drive it, it does no I/O.

    It remembers the last sequence number seen, drops replayed events, and
    decides whether and when to reconnect after a stream fails: only for
    `is_reconnectable` errors, after a backoff of 0.2 s doubling to 2 s, at
    most `max_reconnects` times in a row (an event resets the count and the
    backoff). With `timeout` (for `wait_job`), every connection's deadline is
    capped to what is left and `TimeoutError` is raised when it runs out.
    """

    def __init__(
        self,
        job_id: str,
        *,
        after_sequence: int,
        reconnect: bool,
        max_reconnects: int,
        stream_timeout: float | None,
        timeout: float | None = None,
    ) -> None:
        self.job_id = job_id
        self.last_sequence = _check_int("after_sequence", after_sequence, 0)
        self.reconnects = 0
        self._reconnect = bool(reconnect)
        self._max_reconnects = _check_int("max_reconnects", max_reconnects, 0)
        self._stream_timeout = stream_timeout
        self._timeout = _check_timeout("timeout", timeout)
        self._deadline = None if self._timeout is None else time.monotonic() + self._timeout
        self._failures = 0
        self._backoff = WATCH_BACKOFF_INITIAL_S

    def request(self) -> training_service_pb2.WatchJobRequest:
        """The WatchJob request of the next connection: from the last event seen."""
        return training_service_pb2.WatchJobRequest(job_id=self.job_id, after_sequence=self.last_sequence)

    def _remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _timed_out(self) -> TimeoutError:
        return TimeoutError(
            f"Job {self.job_id!r} did not finish within timeout={self._timeout} seconds "
            f"(last event seen: {self.last_sequence})."
        )

    def call_timeout(self) -> float | None:
        """The deadline of the next connection; `TimeoutError` if `timeout` ran out."""
        remaining = self._remaining()
        if remaining is None:
            return self._stream_timeout
        if remaining <= 0:
            raise self._timed_out()
        return remaining if self._stream_timeout is None else min(remaining, self._stream_timeout)

    def accept(self, event: training_service_pb2.JobEvent) -> bool:
        """Record an event; False for one already seen (a replay), which the caller skips."""
        if event.sequence <= self.last_sequence:
            return False
        self.last_sequence = event.sequence
        self._failures = 0
        self._backoff = WATCH_BACKOFF_INITIAL_S
        return True

    def reconnect_delay(self, exc: grpc.RpcError) -> float | None:
        """Seconds to wait before reconnecting after `exc`; None when `exc` should be raised.

        Raises `TimeoutError` (chained to `exc`) when `timeout` ran out.
        """
        if not self._reconnect or not is_reconnectable(exc):
            return None
        remaining = self._remaining()
        if remaining is not None and remaining <= 0:
            raise self._timed_out() from exc
        if self._failures >= self._max_reconnects:
            return None
        self._failures += 1
        self.reconnects += 1
        delay = self._backoff
        self._backoff = min(self._backoff * 2, WATCH_BACKOFF_MAX_S)
        return delay if remaining is None else max(0.0, min(delay, remaining))


class _BaseClient:
    """Configuration, request building and response decoding for both clients."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        stream_timeout: float | None,
        author: str | None,
        max_message_bytes: int,
        credentials: grpc.ChannelCredentials | None,
        options: ChannelOptions,
    ) -> None:
        if not isinstance(target, str) or not target:
            raise ValueError(
                f"Received an invalid `target`, expected an address such as "
                f"'127.0.0.1:50051' or 'dns:///weightsmith:50051'. Received: target={target!r}"
            )
        self._target = target
        self._timeout = _check_timeout("timeout", timeout)
        self._stream_timeout = _check_timeout("stream_timeout", stream_timeout)
        self._author = default_author() if author is None else _check_author(author)
        self._metadata: tuple[tuple[str, str], ...] = ((AUTHOR_METADATA_KEY, self._author),)
        self._max_message_bytes = _check_int(
            "max_message_bytes", max_message_bytes, 4 * _MESSAGE_OVERHEAD_BYTES + 1
        )
        self._credentials = credentials
        self._channel_options = self._build_channel_options(options)

    @property
    def target(self) -> str:
        """The server address the client connects to."""
        return self._target

    @property
    def author(self) -> str:
        """The `weightsmith-author` recorded on the revisions this client commits."""
        return self._author

    def _build_channel_options(self, options: ChannelOptions) -> list[tuple[str, Any]]:
        merged: dict[str, Any] = {
            "grpc.max_send_message_length": self._max_message_bytes,
            "grpc.max_receive_message_length": self._max_message_bytes,
            "grpc.enable_retries": 1,
            "grpc.service_config": json.dumps(SERVICE_CONFIG),
            **dict(KEEPALIVE_OPTIONS),
        }
        # The caller's options win over ours.
        for key, value in options:
            merged[key] = value
        return list(merged.items())

    # --- ModelService requests ----------------------------------------------

    @staticmethod
    def _create_model_request(
        model_id: str,
        *,
        architecture: str | None,
        include_top: bool | None,
        input_shape: Sequence[int] | None,
        classes: int,
        pooling: str | None,
        weights_file: str,
        classifier_activation: str,
        keras_config: str | Mapping[str, Any] | None,
        seed: int | None,
        message: str,
    ) -> model_service_pb2.CreateModelRequest:
        if (architecture is None) == (keras_config is None):
            received = "both" if architecture is not None else "neither"
            raise ValueError(
                f"Received {received} of `architecture` and `keras_config`, expected exactly "
                f"one: a keras.applications name such as 'ResNet50', or a Keras model config "
                f"(`model.to_json()` or its dict)."
            )
        request = model_service_pb2.CreateModelRequest(model_id=model_id, message=message)
        if seed is not None:
            request.seed = _check_int("seed", seed, -(2**63), 2**63 - 1)
        if keras_config is not None:
            catalog_options = {
                "include_top": include_top is not None,
                "input_shape": input_shape is not None,
                "classes": classes != 0,
                "pooling": pooling is not None,
                "weights_file": bool(weights_file),
                "classifier_activation": bool(classifier_activation),
            }
            given = [name for name, is_set in catalog_options.items() if is_set]
            if given:
                raise ValueError(
                    f"Received catalog options {given} with `keras_config`, expected them "
                    f"only with `architecture`; put them in the Keras config instead."
                )
            if isinstance(keras_config, Mapping):
                request.keras_config_json = json.dumps(keras_config)
            elif isinstance(keras_config, str) and keras_config:
                request.keras_config_json = keras_config
            else:
                raise TypeError(
                    f"Received an invalid `keras_config`, expected a non-empty JSON string or "
                    f"a dict. Received: {type(keras_config).__name__}"
                )
            return request
        if not isinstance(architecture, str) or not architecture:
            raise ValueError(
                f"Received an invalid `architecture`, expected a keras.applications "
                f"constructor name such as 'ResNet50'. Received: architecture={architecture!r}"
            )
        if pooling not in _POOLING:
            raise ValueError(
                f"Received an invalid `pooling`, expected 'avg', 'max' or None. Received: pooling={pooling!r}"
            )
        catalog = request.catalog
        catalog.name = architecture
        if include_top is not None:
            catalog.include_top = bool(include_top)
        if input_shape is not None:
            catalog.input_shape.extend(
                _check_int(f"input_shape[{i}]", d, 1) for i, d in enumerate(input_shape)
            )
        catalog.classes = _check_int("classes", classes, 0, 2**31 - 1)
        catalog.pooling = _POOLING[pooling]
        catalog.weights_file = weights_file
        catalog.classifier_activation = classifier_activation
        return request

    def _upload_chunk_size(self, chunk_size_bytes: int) -> int:
        return _check_int(
            "chunk_size_bytes",
            chunk_size_bytes,
            1,
            self._max_message_bytes - _MESSAGE_OVERHEAD_BYTES,
        )

    @staticmethod
    def _upload_source(source: str | os.PathLike[str] | bytes) -> UploadSource:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            return UploadSource(size_bytes=len(data), data=data)
        if isinstance(source, (str, os.PathLike)):
            path = pathlib.Path(source)
            if not path.is_file():
                raise FileNotFoundError(
                    f"Received a `source` that is not a file, expected the path of a .keras "
                    f"file or its bytes. Received: source={str(source)!r}"
                )
            return UploadSource(size_bytes=path.stat().st_size, path=path)
        raise TypeError(
            f"Received an invalid `source`, expected a path (str or os.PathLike) or bytes. "
            f"Received: {type(source).__name__}"
        )

    @staticmethod
    def _upload_header(
        model_id: str, source: UploadSource, message: str
    ) -> model_service_pb2.UploadModelRequest:
        return model_service_pb2.UploadModelRequest(
            header=model_service_pb2.UploadModelHeader(
                model_id=model_id, size_bytes=source.size_bytes, message=message
            )
        )

    @staticmethod
    def _export_request(model_id: str, revision: int, format: str) -> model_service_pb2.ExportModelRequest:
        if format not in _EXPORT_FORMATS:
            raise ValueError(
                f"Received an invalid `format`, expected one of {sorted(_EXPORT_FORMATS)}. "
                f"Received: format={format!r}"
            )
        return model_service_pb2.ExportModelRequest(
            model_id=model_id,
            revision=_check_int("revision", revision, 0),
            format=_EXPORT_FORMATS[format],
        )

    @staticmethod
    def _predict_request(
        model_id: str, inputs: PredictInputs, output_layers: Sequence[str]
    ) -> model_service_pb2.PredictRequest:
        if isinstance(inputs, Mapping):
            named = [(str(name), value, f"inputs[{name!r}]") for name, value in inputs.items()]
        elif isinstance(inputs, (list, tuple)):
            named = [("", value, f"inputs[{i}]") for i, value in enumerate(inputs)]
        else:
            named = [("", inputs, "inputs")]
        if not named:
            raise ValueError(
                "Received no inputs, expected one array per model input (an array, a list "
                "of arrays in positional order, or a dict keyed by input name)."
            )
        request = model_service_pb2.PredictRequest(
            model_id=model_id,
            output_layers=(output_layers,) if isinstance(output_layers, str) else output_layers,
        )
        for name, value, label in named:
            try:
                tensor = _wire.tensor_to_proto(np.asarray(value))
            except ValueError as exc:
                raise ValueError(f"Received an unsupported array for {label}: {exc}") from None
            request.inputs.append(tensor_pb2.NamedTensor(name=name, tensor=tensor))
        return request

    @staticmethod
    def _predict_result(response: model_service_pb2.PredictResponse) -> PredictResult:
        def decode(tensors: Sequence[tensor_pb2.NamedTensor], kind: str) -> dict[str, np.ndarray]:
            arrays: dict[str, np.ndarray] = {}
            for i, named in enumerate(tensors):
                try:
                    arrays[named.name or f"{kind}_{i}"] = _wire.tensor_from_proto(named.tensor)
                except ValueError as exc:
                    raise _malformed(f"Predict {kind} {named.name or i!r}", exc) from exc
            return arrays

        return PredictResult(
            outputs=decode(response.outputs, "output"),
            layer_outputs=decode(response.layer_outputs, "layer_output"),
            revision=response.revision,
        )

    # --- WeightService requests ---------------------------------------------

    # Shared with `weightsmith.edits`, which builds selectors without a client.
    _selector_proto = staticmethod(selector_to_proto)

    def _read_weights_request(
        self,
        model_id: str,
        selector: SelectorLike | None,
        revision: int,
        chunk_size_bytes: int,
    ) -> weight_service_pb2.ReadWeightsRequest:
        return weight_service_pb2.ReadWeightsRequest(
            model_id=model_id,
            selector=self._selector_proto(selector),
            revision=_check_int("revision", revision, 0),
            chunk_size_bytes=_check_weight_chunk_size(chunk_size_bytes),
        )

    @staticmethod
    def _write_weights_messages(
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
        if not isinstance(weights, Mapping):
            raise TypeError(
                f"Received an invalid `weights`, expected a mapping of variable path to "
                f"array. Received: {type(weights).__name__}"
            )
        if not weights:
            raise ValueError("Received no weights, expected at least one `{path: array}` entry to write.")
        chunk_bytes = _check_weight_chunk_size(chunk_size_bytes) or _wire.DEFAULT_CHUNK_BYTES
        arrays: list[tuple[str, np.ndarray]] = []
        for name, value in weights.items():
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"Received an invalid variable path, expected a non-empty string such as "
                    f"'dense_1/kernel'. Received: {name!r}"
                )
            array = np.asarray(value)
            try:
                _wire.wire_dtype(array.dtype)
            except ValueError as exc:
                raise ValueError(f"Received an unsupported array for {name!r}: {exc}") from None
            arrays.append((name, array))
        header = weight_service_pb2.WriteWeightsHeader(
            model_id=model_id, message=message, allow_non_finite=bool(allow_non_finite)
        )
        if expected_revision is not None:
            header.expected_revision = _check_int("expected_revision", expected_revision, 1)

        def messages() -> Iterator[WriteWeightsMessage]:
            yield weight_service_pb2.WriteWeightsRequest(header=header)
            for name, array in arrays:
                for fields in _wire.iter_tensor_chunks(name, array, chunk_bytes):
                    yield _wire.encode_chunk(2, *fields)

        return messages()

    @staticmethod
    def _apply_edits_request(
        model_id: str,
        edits: Sequence[edits_pb2.Edit],
        *,
        expected_revision: int | None,
        message: str,
        dry_run: bool,
    ) -> weight_service_pb2.ApplyEditsRequest:
        if isinstance(edits, edits_pb2.Edit) or not isinstance(edits, Sequence):
            raise TypeError(
                f"Received an invalid `edits`, expected a list of `Edit`s built with "
                f"`weightsmith.edits`. Received: {type(edits).__name__}"
            )
        if not edits:
            raise ValueError("Received no edits, expected at least one `weightsmith.edits` operation.")
        for i, edit in enumerate(edits):
            if not isinstance(edit, edits_pb2.Edit):
                raise TypeError(
                    f"Received an invalid `edits[{i}]`, expected an `Edit` built with "
                    f"`weightsmith.edits`, such as `edits.scale('*/kernel', 0.5)`. Received: {edit!r}"
                )
            if edit.WhichOneof("op") is None:
                raise ValueError(f"Received an empty `edits[{i}]`, expected an `Edit` with its `op` set.")
        request = weight_service_pb2.ApplyEditsRequest(
            model_id=model_id, edits=edits, message=message, dry_run=bool(dry_run)
        )
        if expected_revision is not None:
            request.expected_revision = _check_int("expected_revision", expected_revision, 1)
        return request

    @staticmethod
    def _diff_revisions_request(
        model_id: str, from_revision: int, to_revision: int
    ) -> weight_service_pb2.DiffRevisionsRequest:
        return weight_service_pb2.DiffRevisionsRequest(
            model_id=model_id,
            from_revision=_check_int("from_revision", from_revision, 1),
            to_revision=_check_int("to_revision", to_revision, 0),
        )

    @staticmethod
    def _revert_model_request(
        model_id: str, to_revision: int, *, expected_revision: int | None, message: str
    ) -> weight_service_pb2.RevertModelRequest:
        request = weight_service_pb2.RevertModelRequest(
            model_id=model_id, to_revision=_check_int("to_revision", to_revision, 1), message=message
        )
        if expected_revision is not None:
            request.expected_revision = _check_int("expected_revision", expected_revision, 1)
        return request

    @staticmethod
    def _upload_data_messages(
        data: bytes, chunk_size_bytes: int
    ) -> Iterator[model_service_pb2.UploadModelRequest]:
        for start in range(0, len(data), chunk_size_bytes):
            yield model_service_pb2.UploadModelRequest(chunk=data[start : start + chunk_size_bytes])

    @staticmethod
    def _evaluate_request(
        model_id: str,
        dataset_id: str,
        *,
        loss: str,
        metrics: Sequence[str],
        batch_size: int,
        revision: int,
        split: str,
        rescale: float | None,
    ) -> model_service_pb2.EvaluateRequest:
        if not isinstance(loss, str) or not loss:
            raise ValueError(
                f"Received an invalid `loss`, expected a Keras loss name such as "
                f"'sparse_categorical_crossentropy'. Received: loss={loss!r}"
            )
        if split not in _DATASET_SPLITS:
            raise ValueError(
                f"Received an invalid `split`, expected one of {sorted(_DATASET_SPLITS)}. "
                f"Received: split={split!r}"
            )
        request = model_service_pb2.EvaluateRequest(
            model_id=model_id,
            dataset_id=dataset_id,
            batch_size=_check_int("batch_size", batch_size, 0, 2**31 - 1),
            revision=_check_int("revision", revision, 0),
            loss=loss,
            metrics=_strings("metrics", metrics),
            split=_DATASET_SPLITS[split],
        )
        if rescale is not None:
            if isinstance(rescale, bool) or not isinstance(rescale, (int, float, np.integer, np.floating)):
                raise TypeError(f"Received a non-numeric `rescale`, expected a float. Received: {rescale!r}")
            request.rescale = float(rescale)
        return request

    # --- TrainingService requests -------------------------------------------

    @staticmethod
    def _dataset_upload(
        source: DatasetSourceLike,
        dataset_id: str,
        *,
        format: str | None,
        tfrecord_features: FeatureSpecLike | None,
        tfrecord_labels: FeatureSpecLike | None,
        image_size: Sequence[int] | None,
        channels: int,
    ) -> DatasetUpload:
        """Detect the source's format, check its options and prepare its bytes (blocking).

        Arrays are serialized to an in-memory `.npz`; a directory is zipped
        into a temporary file. Everything is checked before the stream starts.
        """
        path: pathlib.Path | None = None
        buffer: IO[bytes] | None = None
        if isinstance(source, Mapping):
            if format not in (None, "npz"):
                raise ValueError(
                    f"Received arrays with format={format!r}, expected format 'npz' (or None) for a "
                    f"mapping of arrays."
                )
            format = "npz"
        elif isinstance(source, (bytes, bytearray, memoryview)):
            if format is None:
                raise ValueError(
                    f"Received a dataset as bytes without `format`, expected one of "
                    f"{sorted(DATASET_FORMATS)} to say how to read them."
                )
        elif isinstance(source, (str, os.PathLike)):
            path = pathlib.Path(source)
            if not path.exists():
                raise FileNotFoundError(
                    f"Received a `source` that does not exist, expected a dataset file or an image "
                    f"folder. Received: source={str(source)!r}"
                )
            detected = detect_dataset_format(path)
            if path.is_dir() and format not in (None, "image_folder"):
                raise ValueError(
                    f"Received a directory with format={format!r}, expected format 'image_folder' "
                    f"(or None): a directory is uploaded as a zipped image folder."
                )
            format = format if format is not None else detected
            if format is None:
                raise ValueError(
                    f"Received a dataset file whose format cannot be told from its name, expected a "
                    f".npz, .tfrecord, .zip, .tar or .tar.gz file, or `format` set to one of "
                    f"{sorted(DATASET_FORMATS)}. Received: source={str(source)!r}"
                )
        else:
            raise TypeError(
                f"Received an invalid `source`, expected a mapping of arrays, a path (str or "
                f"os.PathLike) or bytes. Received: {type(source).__name__}"
            )
        dataset = dataset_source(
            format,
            tfrecord_features=tfrecord_features,
            tfrecord_labels=tfrecord_labels,
            image_size=image_size,
            channels=channels,
        )
        # Only now, with the options checked: the buffers below may be large.
        if isinstance(source, Mapping):
            buffer = npz_buffer(source)
        elif isinstance(source, (bytes, bytearray, memoryview)):
            buffer = io.BytesIO(bytes(source))
        elif path is not None and path.is_dir():
            buffer = zip_image_folder(path)
            path = None
        size = _buffer_size(buffer) if buffer is not None else path.stat().st_size  # type: ignore[union-attr]
        header = training_service_pb2.UploadDatasetRequest(
            header=training_service_pb2.UploadDatasetHeader(
                dataset_id=dataset_id, source=dataset, size_bytes=size
            )
        )
        return DatasetUpload(header=header, path=path, buffer=buffer)

    @staticmethod
    def _create_dataset_request(
        uri: str,
        dataset_id: str,
        *,
        format: str,
        tfrecord_features: FeatureSpecLike | None,
        tfrecord_labels: FeatureSpecLike | None,
        image_size: Sequence[int] | None,
        channels: int,
    ) -> training_service_pb2.CreateDatasetRequest:
        if isinstance(uri, os.PathLike):
            uri = os.fspath(uri)
        if not isinstance(uri, str) or not uri:
            raise ValueError(
                f"Received an invalid `uri`, expected a path or file:// URI under one of the server's "
                f"dataset roots. Received: uri={uri!r}"
            )
        return training_service_pb2.CreateDatasetRequest(
            dataset_id=dataset_id,
            uri=uri,
            source=dataset_source(
                format,
                tfrecord_features=tfrecord_features,
                tfrecord_labels=tfrecord_labels,
                image_size=image_size,
                channels=channels,
            ),
        )

    @staticmethod
    def _create_job_request(
        spec: training_service_pb2.JobSpec, job_id: str
    ) -> training_service_pb2.CreateJobRequest:
        if not isinstance(spec, training_service_pb2.JobSpec):
            raise TypeError(
                f"Received an invalid `spec`, expected a `JobSpec` built with `weightsmith.jobs.spec`. "
                f"Received: {type(spec).__name__}"
            )
        return training_service_pb2.CreateJobRequest(job_id=job_id, spec=spec)

    @staticmethod
    def _list_job_events_request(
        job_id: str, after_sequence: int, page_size: int, page_token: str
    ) -> training_service_pb2.ListJobEventsRequest:
        return training_service_pb2.ListJobEventsRequest(
            job_id=job_id,
            after_sequence=_check_int("after_sequence", after_sequence, 0),
            page_size=page_size,
            page_token=page_token,
        )

    def _job_watch(
        self,
        job_id: str,
        *,
        after_sequence: int = 0,
        reconnect: bool = True,
        max_reconnects: int = DEFAULT_MAX_RECONNECTS,
        timeout: float | None = None,
    ) -> JobWatch:
        return JobWatch(
            job_id,
            after_sequence=after_sequence,
            reconnect=reconnect,
            max_reconnects=max_reconnects,
            stream_timeout=self._stream_timeout,
            timeout=timeout,
        )


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


@contextmanager
def cancel_on_error(call: _Cancellable) -> Iterator[None]:
    """Cancel a streaming call when the block raises, so it stops at once."""
    try:
        yield
    except BaseException:
        call.cancel()
        raise
