"""The dataset formats by name: the one place a new format is registered.

Separate from the package's `__init__` so the store can dispatch without
importing its own package while that is still being initialised.
"""

from __future__ import annotations

from weightsmith_server.datasets.image_folder import ImageFolderReader
from weightsmith_server.datasets.npz import NpzReader
from weightsmith_server.datasets.reader import DatasetFormatReader
from weightsmith_server.datasets.records import DatasetFormat
from weightsmith_server.datasets.tfrecord import TfRecordReader

_READERS: dict[DatasetFormat, DatasetFormatReader] = {
    reader.format: reader for reader in (NpzReader(), TfRecordReader(), ImageFolderReader())
}


def get_format(name: str, *, field: str = "format") -> DatasetFormatReader:
    """The reader of the format `name`; UNSUPPORTED_FORMAT on `field` for an unknown one."""
    return _READERS[DatasetFormat.parse(name, field=field)]
