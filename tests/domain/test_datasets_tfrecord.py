"""TFRecord datasets: feature specs, every record parsed on arrival, what loads back."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from datasets_support import (
    INT_LABELS,
    TFRECORD,
    arrays_of,
    assert_nothing_created,
    example,
    expect,
    float_records,
    floats,
    raw,
    tfrecord_bytes,
    upload,
)

from weightsmith_server.datasets import DatasetFormat, DatasetSource, DatasetStore, FeatureSpecInfo
from weightsmith_server.errors import InvalidArgument


async def test_tfrecord_with_float_features_and_int_labels(store: DatasetStore, tmp_path: Path) -> None:
    info = await upload(store, tfrecord_bytes(tmp_path, float_records(7)), TFRECORD, "records")

    assert (info.example_count, info.validation_example_count, info.class_count) == (7, 0, 3)
    assert info.features.name == "features" and info.features.shape == (3,)
    assert (info.labels.name, info.labels.dtype, info.labels.shape) == ("label", "int64", ())
    assert (store.datasets_dir / "records" / "data.tfrecord").is_file()
    dataset, count = store.load("records", "train")
    x, y = arrays_of(dataset)
    assert count == 7
    np.testing.assert_array_equal(x, [[i, i + 0.5, -i] for i in range(7)])
    np.testing.assert_array_equal(y, [i % 3 for i in range(7)])
    with pytest.raises(InvalidArgument) as raised:
        store.load("records", "validation", field="spec.validation_dataset_id")
    expect(raised, InvalidArgument, "NO_VALIDATION_SPLIT", "spec.validation_dataset_id")


async def test_tfrecord_with_raw_uint8_images_and_float_labels(store: DatasetStore, tmp_path: Path) -> None:
    images = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1)
    records = [
        example({"image": raw(img.tobytes()), "target": floats([i * 0.5])}) for i, img in enumerate(images)
    ]
    source = DatasetSource(
        DatasetFormat.TFRECORD,
        tfrecord_features=FeatureSpecInfo("image", "uint8", (2, 2, 1)),
        tfrecord_labels=FeatureSpecInfo("target", "float32", (1,)),
    )
    info = await upload(store, tfrecord_bytes(tmp_path, records), source)

    assert (info.features.dtype, info.features.shape, info.class_count) == ("uint8", (2, 2, 1), 0)
    x, y = arrays_of(store.load(info.dataset_id, "train")[0])
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, [[0.0], [0.5], [1.0]])


async def test_tfrecord_errors(store: DatasetStore, tmp_path: Path) -> None:
    valid = tfrecord_bytes(tmp_path, float_records(5))
    corrupt = bytearray(valid)
    corrupt[len(valid) // 2] ^= 0xFF
    cases: list[tuple[bytes, DatasetSource, str, str, str]] = [
        (bytes(corrupt), TFRECORD, "CORRUPT_DATASET", "chunk", "cannot be read"),
        (gzip.compress(valid), TFRECORD, "CORRUPT_DATASET", "chunk", "compressed TFRecord"),
        (
            valid,
            DatasetSource(DatasetFormat.TFRECORD, FeatureSpecInfo("features", "float32", (4,)), INT_LABELS),
            "EXAMPLE_MISMATCH",
            "header.source.tfrecord",
            "Record 0",
        ),
        (
            tfrecord_bytes(tmp_path, [*float_records(2), example({"features": floats([1, 2, 3])})]),
            TFRECORD,
            "EXAMPLE_MISMATCH",
            "header.source.tfrecord",
            "Record 2",
        ),
        (
            tfrecord_bytes(tmp_path, float_records(4, labels=lambda i: 1 - i)),
            TFRECORD,
            "NEGATIVE_LABEL",
            "chunk",
            "record 2",
        ),
    ]
    for data, source, reason, field, mentions in cases:
        with pytest.raises(InvalidArgument) as raised:
            await upload(store, data, source)
        assert mentions in expect(raised, InvalidArgument, reason, field)
    assert_nothing_created(store)
