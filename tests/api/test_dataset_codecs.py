"""The dataset codecs: proto enums the server does not know are refused, naming the field."""

from __future__ import annotations

import pytest

from weightsmith.v1 import dataset_pb2, model_service_pb2, tensor_pb2
from weightsmith_server.api.codecs.datasets import dataset, dataset_source, dataset_split
from weightsmith_server.datasets import DatasetFormat, DatasetInfo, DatasetSplit, FeatureSpecInfo
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.tensor_spec import TensorSpecInfo


def test_sources_decode_to_the_domain_enum_and_unknown_numbers_are_refused() -> None:
    features = dataset_pb2.FeatureSpec(name="x", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3])
    labels = dataset_pb2.FeatureSpec(name="y", dtype=tensor_pb2.DATA_TYPE_INT64)
    message = dataset_pb2.DatasetSource(
        format=dataset_pb2.DATASET_FORMAT_TFRECORD,
        tfrecord=dataset_pb2.TfRecordOptions(features=features, labels=labels),
    )
    source = dataset_source(message, "source")
    assert source.format is DatasetFormat.TFRECORD
    assert (source.tfrecord_features, source.tfrecord_labels) == (
        FeatureSpecInfo("x", "float32", (3,)),
        FeatureSpecInfo("y", "int64", ()),
    )

    with pytest.raises(InvalidArgument) as raised:
        dataset_source(dataset_pb2.DatasetSource(format=42), "header.source")
    assert (raised.value.reason, raised.value.violations[0][0]) == (
        "INVALID_ENUM_VALUE",
        "header.source.format",
    )
    with pytest.raises(InvalidArgument) as raised:
        dataset_source(dataset_pb2.DatasetSource(), "source")
    assert (raised.value.reason, raised.value.violations[0][0]) == ("MISSING_FORMAT", "source.format")


def test_evaluate_split_defaults_to_train_and_refuses_unknown_numbers() -> None:
    assert dataset_split(model_service_pb2.DATASET_SPLIT_UNSPECIFIED, "split") is DatasetSplit.TRAIN
    assert dataset_split(model_service_pb2.DATASET_SPLIT_VALIDATION, "split") is DatasetSplit.VALIDATION
    with pytest.raises(InvalidArgument) as raised:
        dataset_split(7, "split")
    assert (raised.value.reason, raised.value.violations[0][0]) == ("INVALID_ENUM_VALUE", "split")


def test_datasets_encode_their_format_and_specs() -> None:
    info = DatasetInfo(
        dataset_id="pets",
        format=DatasetFormat.IMAGE_FOLDER,
        example_count=3,
        validation_example_count=0,
        features=TensorSpecInfo("x", "uint8", (4, 4, 3)),
        labels=TensorSpecInfo("y", "int64", ()),
        class_count=2,
        class_names=["cat", "dog"],
        size_bytes=123,
        create_time="2026-01-02T03:04:05Z",
    )
    message = dataset(info, ["job-1"])
    assert message.format == dataset_pb2.DATASET_FORMAT_IMAGE_FOLDER
    assert (message.features.dtype, list(message.features.shape)) == (tensor_pb2.DATA_TYPE_UINT8, [4, 4, 3])
    assert (list(message.class_names), list(message.used_by_jobs)) == (["cat", "dog"], ["job-1"])
    assert message.create_time.seconds > 0
