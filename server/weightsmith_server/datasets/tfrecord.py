"""TFRecord datasets of `tf.train.Example`, stored as received.

One feature holds the inputs and one the labels, each described by a
`FeatureSpecInfo` (FLOAT32 float_list, INT64 int64_list, or UINT8 raw bytes
in a bytes_list). Every record is parsed at validation, so a job never meets
a bad one. Compressed files are refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from weightsmith_server.datasets.reader import (
    Contents,
    DatasetFormatReader,
    Received,
    corrupt,
    first_bad_example,
    tf_message,
)
from weightsmith_server.datasets.records import (
    DatasetFormat,
    DatasetSource,
    DatasetSplit,
    FeatureSpecInfo,
    StoredDataset,
)
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.numerics import all_finite
from weightsmith_server.tensor_spec import TensorSpecInfo

if TYPE_CHECKING:
    import tensorflow as tf

FEATURE_DTYPES = ("float32", "int64", "uint8")
_SCAN_BATCH = 1024


class TfRecordReader(DatasetFormatReader):
    """TFRecord files of `tf.train.Example`, parsed completely on arrival."""

    format = DatasetFormat.TFRECORD
    data_file = "data.tfrecord"
    option_group = "tfrecord"

    def check_options(self, source: DatasetSource, prefix: str) -> DatasetSource:
        if source.tfrecord_features is None or source.tfrecord_labels is None:
            raise InvalidArgument(
                "A TFRecord dataset needs `tfrecord.features` and `tfrecord.labels`: the key, dtype and "
                "per-example shape of the input and label features.",
                reason="MISSING_TFRECORD_OPTIONS",
                field=f"{prefix}.tfrecord",
            )
        _check_feature(source.tfrecord_features, f"{prefix}.tfrecord.features")
        _check_feature(source.tfrecord_labels, f"{prefix}.tfrecord.labels")
        return source

    def ingest(self, received: Received, source: DatasetSource, target: Path) -> Contents:
        contents = _scan(received, *_specs(source))
        os.rename(received.path, target)
        return contents

    def load(self, path: Path, stored: StoredDataset, split: DatasetSplit) -> tuple[tf.data.Dataset, int]:
        import tensorflow as tf

        # A TFRecord dataset has only a training split (`StoredDataset.info` says so).
        parse = _parser(*_specs(stored.source))
        records = tf.data.TFRecordDataset(str(path))
        return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE), stored.info.example_count


def _specs(source: DatasetSource) -> tuple[FeatureSpecInfo, FeatureSpecInfo]:
    """The feature and label specs of a checked source."""
    if source.tfrecord_features is None or source.tfrecord_labels is None:
        raise ValueError("a TFRecord dataset source lacks its feature specs")
    return source.tfrecord_features, source.tfrecord_labels


def _check_feature(spec: FeatureSpecInfo, field: str) -> None:
    if not spec.name:
        raise InvalidArgument(
            "Received an empty feature name, expected the feature's key in the `tf.train.Example`.",
            reason="INVALID_FEATURE_SPEC",
            field=f"{field}.name",
        )
    if spec.dtype not in FEATURE_DTYPES:
        raise InvalidArgument(
            f"Received dtype {spec.dtype!r} for feature {spec.name!r}, expected FLOAT32 (float_list), "
            f"INT64 (int64_list) or UINT8 (raw bytes in a bytes_list).",
            reason="UNSUPPORTED_DTYPE",
            field=f"{field}.dtype",
        )
    if not all(isinstance(d, int) and d >= 1 for d in spec.shape):
        raise InvalidArgument(
            f"Received shape {list(spec.shape)} for feature {spec.name!r}, expected positive dimensions "
            f"(empty for a scalar).",
            reason="INVALID_SHAPE",
            field=f"{field}.shape",
        )


def _parser(features: FeatureSpecInfo, labels: FeatureSpecInfo) -> Callable[[Any], Any]:
    """A function from one serialized `tf.train.Example` to its `(x, y)` tensors."""
    import tensorflow as tf

    def parsing(spec: FeatureSpecInfo) -> Any:
        if spec.dtype == "uint8":
            return tf.io.FixedLenFeature([], tf.string)
        return tf.io.FixedLenFeature(list(spec.shape), tf.float32 if spec.dtype == "float32" else tf.int64)

    description = {spec.name: parsing(spec) for spec in (features, labels)}

    def decode(value: Any, spec: FeatureSpecInfo) -> Any:
        if spec.dtype != "uint8":
            return value
        return tf.reshape(tf.io.decode_raw(value, tf.uint8), list(spec.shape))

    def parse(serialized: Any) -> tuple[Any, Any]:
        parsed = tf.io.parse_single_example(serialized, description)
        return decode(parsed[features.name], features), decode(parsed[labels.name], labels)

    return parse


def _scan(received: Received, features: FeatureSpecInfo, labels: FeatureSpecInfo) -> Contents:
    """Parse every record with the source's specs; count them and check their values."""
    import tensorflow as tf

    parse = _parser(features, labels)
    records = tf.data.TFRecordDataset(str(received.path))
    batches = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(_SCAN_BATCH)
    count = 0
    largest_label = -1
    iterator = iter(batches)
    while True:
        try:
            x, y = next(iterator)
        except StopIteration:
            break
        except tf.errors.DataLossError as exc:
            raise _unreadable(received, exc) from exc
        except tf.errors.OpError as exc:
            index, message = _first_bad_record(records, parse, count, exc)
            raise InvalidArgument(
                f"Record {index} does not match `{received.source_field}.tfrecord`: {message}. Expected "
                f"feature {features.name!r} ({features.dtype}, shape {list(features.shape)}) and label "
                f"{labels.name!r} ({labels.dtype}, shape {list(labels.shape)}); fix the specs or the file.",
                reason="EXAMPLE_MISMATCH",
                field=f"{received.source_field}.tfrecord",
            ) from exc
        largest_label = max(
            largest_label, _check_batch(x.numpy(), y.numpy(), count, features, labels, received)
        )
        count += len(x)
    if count == 0:
        raise InvalidArgument(
            "The TFRecord file holds no records, expected at least 1 `tf.train.Example`.",
            reason="EMPTY_DATASET",
            field=received.data_field,
        )
    return Contents(
        example_count=count,
        validation_example_count=0,
        features=TensorSpecInfo(features.name, features.dtype, features.shape),
        labels=TensorSpecInfo(labels.name, labels.dtype, labels.shape),
        class_count=largest_label + 1 if labels.dtype != "float32" else 0,
    )


def _unreadable(received: Received, exc: Exception) -> InvalidArgument:
    """CORRUPT_DATASET for a damaged file, with a hint when it is gzip-compressed."""
    with open(received.path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    hint = "; compressed TFRecord files are not supported, write them uncompressed" if gzipped else ""
    return corrupt("TFRecord file", f"{tf_message(exc)}{hint}", received.data_field)


def _check_batch(
    x: np.ndarray,
    y: np.ndarray,
    start: int,
    features: FeatureSpecInfo,
    labels: FeatureSpecInfo,
    received: Received,
) -> int:
    """Check a batch's values (finite, labels at least 0); returns its largest class label, or -1."""
    for name, array in ((features.name, x), (labels.name, y)):
        if array.dtype.kind == "f" and not all_finite(array):
            bad = start + first_bad_example(array, ~np.isfinite(array))
            raise InvalidArgument(
                f"Feature {name!r} of record {bad} holds NaN or infinite values, expected finite values.",
                reason="NON_FINITE_VALUES",
                field=received.data_field,
            )
    if labels.dtype == "float32" or not y.size:
        return -1
    if labels.dtype == "int64" and int(y.min()) < 0:
        bad = start + first_bad_example(y, y < 0)
        raise InvalidArgument(
            f"Label {labels.name!r} of record {bad} is negative ({int(y.min())} in this batch), expected "
            f"class indices of at least 0.",
            reason="NEGATIVE_LABEL",
            field=received.data_field,
        )
    return int(y.max())


def _first_bad_record(
    records: tf.data.Dataset, parse: Callable[[Any], Any], start: int, error: Exception
) -> tuple[int, str]:
    """Find which record of the failing batch does not parse, to name it in the error."""
    for offset, serialized in enumerate(records.skip(start).take(_SCAN_BATCH)):
        try:
            parse(serialized)
        except Exception as exc:
            return start + offset, tf_message(exc)
    return start, tf_message(error)
