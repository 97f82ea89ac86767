"""Datasets: training data validated on arrival, stored durably, read back through `tf.data`.

A dataset is one file the server received (UploadDataset) or copied from a
folder it may read (CreateDataset), checked completely before the call is
acknowledged: a dataset that exists is one a job can train on.

One module per format, each a `DatasetFormatReader` (`reader.py`), found
through `get_format` (`formats.py`), as Keras's `trainers/data_adapters`:

- `npz.py`: `numpy.savez` arrays `x`, `y` (and `x_val`, `y_val`), stored as received.
- `tfrecord.py`: `tf.train.Example` records, stored as received.
- `image_folder.py`: zip or tar archives of `<class>/<image>` files
  (`archive.py` reads them safely, `images.py` decodes), stored as arrays.

`store.py` holds `DatasetStore`: ids, the upload limits, staging and the
commit, listing, deletion and loading for jobs.
"""

from weightsmith_server.datasets.formats import get_format
from weightsmith_server.datasets.reader import DatasetFormatReader
from weightsmith_server.datasets.records import (
    DatasetFormat,
    DatasetInfo,
    DatasetSource,
    DatasetSplit,
    FeatureSpecInfo,
)
from weightsmith_server.datasets.store import DatasetStore

__all__ = [
    "DatasetFormat",
    "DatasetFormatReader",
    "DatasetInfo",
    "DatasetSource",
    "DatasetSplit",
    "DatasetStore",
    "FeatureSpecInfo",
    "get_format",
]
