"""Dataset protos to domain objects and back: sources, datasets, and Evaluate's split."""

from __future__ import annotations

from weightsmith.v1 import dataset_pb2, model_service_pb2
from weightsmith_server.api.codecs.common import EnumTable, timestamp
from weightsmith_server.api.codecs.tensors import tensor_spec
from weightsmith_server.datasets import (
    DatasetFormat,
    DatasetInfo,
    DatasetSource,
    DatasetSplit,
    FeatureSpecInfo,
)
from weightsmith_server.dtypes import numpy_dtype_for
from weightsmith_server.errors import InvalidArgument

DATASET_FORMAT = EnumTable(
    dataset_pb2.DatasetFormat,
    {
        dataset_pb2.DATASET_FORMAT_NPZ: DatasetFormat.NPZ,
        dataset_pb2.DATASET_FORMAT_TFRECORD: DatasetFormat.TFRECORD,
        dataset_pb2.DATASET_FORMAT_IMAGE_FOLDER: DatasetFormat.IMAGE_FOLDER,
    },
)
DATASET_SPLIT = EnumTable(
    model_service_pb2.DatasetSplit,
    {
        model_service_pb2.DATASET_SPLIT_UNSPECIFIED: DatasetSplit.TRAIN,
        model_service_pb2.DATASET_SPLIT_TRAIN: DatasetSplit.TRAIN,
        model_service_pb2.DATASET_SPLIT_VALIDATION: DatasetSplit.VALIDATION,
    },
)


def dataset_source(message: dataset_pb2.DatasetSource, field: str) -> DatasetSource:
    """Decode a source (`field` is its request field); the format must be set."""
    if message.format == dataset_pb2.DATASET_FORMAT_UNSPECIFIED:
        raise InvalidArgument(
            "Received no dataset format; set NPZ, TFRECORD or IMAGE_FOLDER.",
            reason="MISSING_FORMAT",
            field=f"{field}.format",
        )
    dataset_format = DATASET_FORMAT.decode(message.format, field=f"{field}.format")
    features = labels = None
    if message.HasField("tfrecord"):
        features = _feature(message.tfrecord.features, f"{field}.tfrecord.features")
        labels = _feature(message.tfrecord.labels, f"{field}.tfrecord.labels")
    image = message.image_folder
    return DatasetSource(
        format=dataset_format,
        tfrecord_features=features,
        tfrecord_labels=labels,
        # Any length passes here: the domain refuses sizes that are not [height, width].
        image_size=tuple(image.image_size) if image.image_size else None,  # type: ignore[arg-type]
        channels=image.channels or 3,
    )


def _feature(message: dataset_pb2.FeatureSpec, field: str) -> FeatureSpecInfo:
    dtype = numpy_dtype_for(message.dtype, field=f"{field}.dtype").name
    return FeatureSpecInfo(name=message.name, dtype=dtype, shape=tuple(message.shape))


def dataset(info: DatasetInfo, used_by: list[str]) -> dataset_pb2.Dataset:
    """Encode a dataset's description; `used_by` lists the queued or running jobs using it."""
    return dataset_pb2.Dataset(
        dataset_id=info.dataset_id,
        format=DATASET_FORMAT.encode(info.format),
        example_count=info.example_count,
        validation_example_count=info.validation_example_count,
        features=tensor_spec(info.features),
        labels=tensor_spec(info.labels),
        class_count=info.class_count,
        class_names=info.class_names,
        size_bytes=info.size_bytes,
        create_time=timestamp(info.create_time),
        used_by_jobs=used_by,
        owner=info.owner,
    )


def dataset_split(number: int, field: str) -> DatasetSplit:
    """Decode Evaluate's `split`: unset means the training split."""
    return DATASET_SPLIT.decode(number, field=field)
