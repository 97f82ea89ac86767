"""What the store records about a dataset, the domain's dataset enums, and their `dataset.json` form."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

from weightsmith_server.enums import member
from weightsmith_server.tensor_spec import TensorSpecInfo


class DatasetFormat(enum.StrEnum):
    """How a dataset file is laid out; the value is what `dataset.json` stores."""

    NPZ = "npz"
    TFRECORD = "tfrecord"
    IMAGE_FOLDER = "image_folder"

    @classmethod
    def parse(cls, value: str, *, field: str) -> DatasetFormat:
        """The format named `value`; UNSUPPORTED_FORMAT on `field` for any other."""
        return member(cls, value, field=field, reason="UNSUPPORTED_FORMAT")


class DatasetSplit(enum.StrEnum):
    """Which examples of a dataset to read: the training ones or the NPZ's `x_val`/`y_val`."""

    TRAIN = "train"
    VALIDATION = "validation"

    @classmethod
    def parse(cls, value: str, *, field: str) -> DatasetSplit:
        """The split named `value`; INVALID_SPLIT on `field` for any other."""
        return member(cls, value, field=field, reason="INVALID_SPLIT")


@dataclass(frozen=True)
class FeatureSpecInfo:
    """One feature of a TFRecord `tf.train.Example`: its key, dtype and per-example shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DatasetSource:
    """How to read a dataset file: its format and the format's options.

    Each format takes at most one option group (`tfrecord`, `image_folder`);
    `option_groups` says which are set, so a format can refuse the others.
    """

    format: DatasetFormat
    tfrecord_features: FeatureSpecInfo | None = None
    tfrecord_labels: FeatureSpecInfo | None = None
    image_size: tuple[int, int] | None = None
    channels: int = 3

    def option_groups(self) -> list[str]:
        """The option groups set, named as their request fields."""
        groups = []
        if self.tfrecord_features is not None or self.tfrecord_labels is not None:
            groups.append("tfrecord")
        if self.image_size is not None:
            groups.append("image_folder")
        return groups


@dataclass(frozen=True)
class DatasetInfo:
    """Everything GetDataset reports; `features`/`labels` shapes omit the example dimension."""

    dataset_id: str
    format: DatasetFormat
    example_count: int
    validation_example_count: int
    features: TensorSpecInfo
    labels: TensorSpecInfo
    class_count: int
    class_names: list[str]
    size_bytes: int
    create_time: str
    # The principal that created it ("" without authentication); only it sees and uses the dataset.
    owner: str = ""


@dataclass(frozen=True)
class StoredDataset:
    """A committed dataset: its description and the source it was read with."""

    info: DatasetInfo
    source: DatasetSource

    def to_json(self) -> dict[str, Any]:
        """The `dataset.json` document (enums are written as their string values)."""
        return {"dataset": asdict(self.info), "source": asdict(self.source)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StoredDataset:
        """Rebuild from a `dataset.json`; an unknown format raises (the dataset is unrestorable)."""
        info, source = raw["dataset"], raw["source"]
        return cls(
            info=DatasetInfo(
                **info
                | {
                    "format": DatasetFormat.parse(info["format"], field="dataset.format"),
                    "features": _tensor_spec(info["features"]),
                    "labels": _tensor_spec(info["labels"]),
                    "class_names": list(info["class_names"]),
                }
            ),
            source=DatasetSource(
                format=DatasetFormat.parse(source["format"], field="source.format"),
                tfrecord_features=_feature(source["tfrecord_features"]),
                tfrecord_labels=_feature(source["tfrecord_labels"]),
                image_size=None if source["image_size"] is None else tuple(source["image_size"]),
                channels=source["channels"],
            ),
        )


def _tensor_spec(raw: dict[str, Any]) -> TensorSpecInfo:
    return TensorSpecInfo(raw["name"], raw["dtype"], tuple(raw["shape"]))


def _feature(raw: dict[str, Any] | None) -> FeatureSpecInfo | None:
    return None if raw is None else FeatureSpecInfo(raw["name"], raw["dtype"], tuple(raw["shape"]))
