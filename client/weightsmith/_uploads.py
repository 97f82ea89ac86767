"""Client-streaming uploads: a header message, then a file's bytes in chunks.

`upload_model` and `upload_dataset` prepare an `Upload` (checking every
option before the stream starts, since an error raised inside a request
iterator would only cancel the call); the client then streams it.
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from google.protobuf.message import Message

from weightsmith._datasets import (
    DatasetSourceLike,
    FeatureSpecLike,
    dataset_source,
    npz_buffer,
    source_format,
    zip_image_folder,
)
from weightsmith.v1 import model_service_pb2, training_service_pb2


@dataclass(eq=False)
class Upload:
    """What an upload streams: `header`, then the bytes of a file or of an owned buffer.

    One-shot: `open()` hands over the buffer (in-memory bytes, an `.npz` or a
    temporary zip), which closing deletes.

    Attributes:
        header: The first request message of the stream.
        chunk: Builds the request message carrying one block of bytes.
        path: The file to stream, or None to stream `buffer`.
        buffer: The bytes to stream when there is no `path`.
    """

    header: Message
    chunk: Callable[[bytes], Message]
    path: pathlib.Path | None = None
    buffer: IO[bytes] | None = None

    @property
    def size_bytes(self) -> int:
        """Bytes the upload streams after the header."""
        return self.header.header.size_bytes  # type: ignore[attr-defined]

    def open(self) -> IO[bytes]:
        """Return the bytes to stream as a file object; the caller closes it."""
        if self.path is not None:
            return self.path.open("rb")
        assert self.buffer is not None
        self.buffer.seek(0)
        return self.buffer

    def close(self) -> None:
        """Release the buffer (deleting a temporary zip); idempotent."""
        if self.buffer is not None:
            self.buffer.close()


def _size(buffer: IO[bytes]) -> int:
    size = buffer.seek(0, io.SEEK_END)
    buffer.seek(0)
    return size


def model_upload(source: str | os.PathLike[str] | bytes, model_id: str, message: str) -> Upload:
    """Prepare the UploadModel stream of a `.keras` file, given as a path or as its bytes."""
    path: pathlib.Path | None = None
    buffer: IO[bytes] | None = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        buffer = io.BytesIO(bytes(source))
        size = _size(buffer)
    elif isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"Received a `source` that is not a file, expected the path of a .keras "
                f"file or its bytes. Received: source={str(source)!r}"
            )
        size = path.stat().st_size
    else:
        raise TypeError(
            f"Received an invalid `source`, expected a path (str or os.PathLike) or bytes. "
            f"Received: {type(source).__name__}"
        )
    header = model_service_pb2.UploadModelHeader(model_id=model_id, size_bytes=size, message=message)
    return Upload(
        header=model_service_pb2.UploadModelRequest(header=header),
        chunk=lambda block: model_service_pb2.UploadModelRequest(chunk=block),
        path=path,
        buffer=buffer,
    )


def dataset_upload(
    source: DatasetSourceLike,
    dataset_id: str,
    *,
    format: str | None,
    tfrecord_features: FeatureSpecLike | None,
    tfrecord_labels: FeatureSpecLike | None,
    image_size: Sequence[int] | None,
    channels: int,
) -> Upload:
    """Detect the source's format, check its options and prepare its bytes (blocking).

    Arrays are serialized to an in-memory `.npz`; a directory is zipped
    into a temporary file. Everything is checked before the stream starts.
    """
    dataset = dataset_source(
        source_format(source, format),
        tfrecord_features=tfrecord_features,
        tfrecord_labels=tfrecord_labels,
        image_size=image_size,
        channels=channels,
    )
    # Only now, with the options checked: the buffers below may be large.
    path: pathlib.Path | None = None
    buffer: IO[bytes] | None = None
    if isinstance(source, Mapping):
        buffer = npz_buffer(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        buffer = io.BytesIO(bytes(source))
    elif pathlib.Path(source).is_dir():
        buffer = zip_image_folder(pathlib.Path(source))
    else:
        path = pathlib.Path(source)
    size = path.stat().st_size if buffer is None else _size(buffer)  # type: ignore[union-attr]
    header = training_service_pb2.UploadDatasetHeader(dataset_id=dataset_id, source=dataset, size_bytes=size)
    return Upload(
        header=training_service_pb2.UploadDatasetRequest(header=header),
        chunk=lambda block: training_service_pb2.UploadDatasetRequest(chunk=block),
        path=path,
        buffer=buffer,
    )
