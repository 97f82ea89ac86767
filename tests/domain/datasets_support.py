"""Builders and checks the dataset domain tests share: files of every format, uploads, error checks."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from weightsmith_server.datasets import (
    DatasetFormat,
    DatasetInfo,
    DatasetSource,
    DatasetStore,
    FeatureSpecInfo,
)
from weightsmith_server.errors import WeightsmithError

MAX_UPLOAD = 1 << 20
NPZ = DatasetSource(DatasetFormat.NPZ)
IMAGES = DatasetSource(DatasetFormat.IMAGE_FOLDER, image_size=(4, 4), channels=3)
FLOAT_FEATURES = FeatureSpecInfo("features", "float32", (3,))
INT_LABELS = FeatureSpecInfo("label", "int64", ())
TFRECORD = DatasetSource(DatasetFormat.TFRECORD, tfrecord_features=FLOAT_FEATURES, tfrecord_labels=INT_LABELS)
X4 = np.zeros((4, 2), np.float32)
Y4 = np.array([0, 1, 2, 1], np.int64)


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


async def chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def upload(
    store: DatasetStore,
    data: bytes,
    source: DatasetSource = NPZ,
    dataset_id: str = "",
    size_bytes: int | None = None,
) -> DatasetInfo:
    size = len(data) if size_bytes is None else size_bytes
    return await store.upload(dataset_id, source, size, chunks(data))


def expect(
    raised: pytest.ExceptionInfo[WeightsmithError], kind: type[WeightsmithError], reason: str, field: str
) -> str:
    """Check an error's class, reason and field; return its message."""
    error = raised.value
    assert type(error) is kind, error
    assert (error.reason, error.violations[0][0]) == (reason, field), error.message
    return error.message


def assert_nothing_created(store: DatasetStore) -> None:
    assert list(store.datasets_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []
    assert store.list(0, "") == ([], "")


def arrays_of(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    x, y = next(iter(dataset.batch(1000)))
    return x.numpy(), y.numpy()


def png(height: int, width: int, value: int, channels: int = 3) -> bytes:
    pixels = np.full((height, width, channels), value, np.uint8)
    return tf.io.encode_png(pixels).numpy()


def zip_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                archive.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                archive.addfile(info, io.BytesIO(entry[1]))
    return buffer.getvalue()


def zip_symlink(name: str, target: str) -> bytes:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat/a.png", png(2, 2, 1))
        archive.writestr(info, target)
    return buffer.getvalue()


def tar_link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def example(features: dict[str, tf.train.Feature]) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def floats(values: Any) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def ints(values: Any) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def raw(data: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))


def tfrecord_bytes(tmp_path: Path, records: list[bytes]) -> bytes:
    path = tmp_path / "records.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return path.read_bytes()


def float_records(count: int, labels: Callable[[int], int] = lambda i: i % 3) -> list[bytes]:
    return [example({"features": floats([i, i + 0.5, -i]), "label": ints([labels(i)])}) for i in range(count)]


def npz_member(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
