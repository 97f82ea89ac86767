"""What every dataset format implements, and the helpers the formats share.

A format (`DatasetFormatReader`) checks its options in a `DatasetSource`,
turns a received file into the stored data file (validating every example,
converting where the stored form differs) and reads a stored split back as a
`tf.data.Dataset`. The store does the rest (ids, staging, the commit), so a
new format is one module and one line in `formats.py`.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from weightsmith_server.datasets.records import DatasetFormat, DatasetSource, DatasetSplit, StoredDataset
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.limits import InputLimits, excerpt
from weightsmith_server.tensor_spec import TensorSpecInfo

if TYPE_CHECKING:
    import tensorflow as tf

# How each option group is named in messages.
_OPTION_LABELS = {"tfrecord": "TFRecord", "image_folder": "image folder"}


@dataclass(frozen=True)
class Received:
    """A received file and the request fields errors about it name.

    Attributes:
        path: The file, private to this creation (a format may rename it).
        data_field: The field that carried it (`chunk` or `uri`).
        source_field: The field that described it (`header.source` or `source`).
        max_expanded_bytes: The most bytes its contents may expand to in memory.
        limits: The server's other bounds on inputs (members, images).
    """

    path: Path
    data_field: str
    source_field: str
    max_expanded_bytes: int
    limits: InputLimits = field(default_factory=InputLimits)


@dataclass(frozen=True)
class Contents:
    """What validation learned about a data file."""

    example_count: int
    validation_example_count: int
    features: TensorSpecInfo
    labels: TensorSpecInfo
    class_count: int
    class_names: list[str] = field(default_factory=list)


class DatasetFormatReader(abc.ABC):
    """One dataset format: its options, its validation on arrival and its reading for jobs.

    Attributes:
        format: The format this reader handles.
        data_file: The stored data file's name in the dataset's folder.
        option_group: The `DatasetSource` option group it takes (None: none).
    """

    format: ClassVar[DatasetFormat]
    data_file: ClassVar[str]
    option_group: ClassVar[str | None] = None

    def check_source(self, source: DatasetSource, prefix: str) -> DatasetSource:
        """Refuse other formats' options, check this one's; returns the source with defaults filled in."""
        for group in source.option_groups():
            if group != self.option_group:
                label = _OPTION_LABELS[group]
                raise InvalidArgument(
                    f"Received {label} options for a {self.format.value} dataset; set the format to "
                    f"{label} or leave the options out.",
                    reason="OPTIONS_MISMATCH",
                    field=f"{prefix}.{group}",
                )
        return self.check_options(source, prefix)

    def check_options(self, source: DatasetSource, prefix: str) -> DatasetSource:
        """Check this format's own options (`prefix` is the source's field); none by default."""
        return source

    @abc.abstractmethod
    def ingest(self, received: Received, source: DatasetSource, target: Path) -> Contents:
        """Validate `received` completely and leave the data file to store at `target`. Blocking."""

    @abc.abstractmethod
    def load(self, path: Path, stored: StoredDataset, split: DatasetSplit) -> tuple[tf.data.Dataset, int]:
        """An unbatched dataset of `(x, y)` pairs of a split the dataset has, and its example count."""


def corrupt(what: str, detail: object, data_field: str) -> InvalidArgument:
    """CORRUPT_DATASET: `what` cannot be read, because of `detail`."""
    return InvalidArgument(
        f"The {what} cannot be read: {excerpt(detail, 300)}.", reason="CORRUPT_DATASET", field=data_field
    )


def tf_message(exc: Exception) -> str:
    """A TensorFlow error's message without its op and function decorations."""
    text = getattr(exc, "message", None) or str(exc)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*(\[\[|\[Op:).*$", "", text, flags=re.DOTALL)
    return text.strip().rstrip(".")[:300]


def first_bad_example(array: np.ndarray, bad: np.ndarray) -> int:
    """The index of the first example (first dimension) where the elementwise mask `bad` is set."""
    return int(np.flatnonzero(bad.reshape(len(array), -1).any(axis=1))[0])
