"""Dataset formats on the client: the `DatasetSource` of a format and its options, and the bytes of a source.

`upload_dataset` and `create_dataset` describe a dataset by a format name
(`"npz"`, `"tfrecord"`, `"image_folder"`) and its options; `dataset_source`
checks they go together. An upload's source may also be arrays (serialized
to an in-memory `.npz`) or an image folder (zipped into a temporary file).
"""

from __future__ import annotations

import io
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import IO, Any, TypeAlias

import numpy as np

from weightsmith import _checks
from weightsmith.v1 import dataset_pb2, tensor_pb2

DatasetSourceLike: TypeAlias = Mapping[str, np.ndarray] | str | os.PathLike[str] | bytes
FeatureSpecLike: TypeAlias = dataset_pb2.FeatureSpec | tuple[str, Any, Sequence[int]]

DATASET_FORMATS: dict[str, int] = {
    "npz": dataset_pb2.DATASET_FORMAT_NPZ,
    "tfrecord": dataset_pb2.DATASET_FORMAT_TFRECORD,
    "image_folder": dataset_pb2.DATASET_FORMAT_IMAGE_FOLDER,
}
_NPZ_KEYS = ("x", "y", "x_val", "y_val")
_FEATURE_DTYPES = {
    "float32": tensor_pb2.DATA_TYPE_FLOAT32,
    "int64": tensor_pb2.DATA_TYPE_INT64,
    "uint8": tensor_pb2.DATA_TYPE_UINT8,
}
_SUFFIX_FORMATS: tuple[tuple[tuple[str, ...], str], ...] = (
    ((".npz",), "npz"),
    ((".tfrecord", ".tfrecords"), "tfrecord"),
    ((".zip", ".tar", ".tar.gz", ".tgz"), "image_folder"),
)


def detect_dataset_format(path: pathlib.Path) -> str | None:
    """Return the format a dataset path implies (a directory is an image folder); None if unknown."""
    if path.is_dir():
        return "image_folder"
    name = path.name.lower()
    for suffixes, format in _SUFFIX_FORMATS:
        if name.endswith(suffixes):
            return format
    return None


def _checked_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    keys = list(arrays)
    unknown = [key for key in keys if key not in _NPZ_KEYS]
    if unknown or "x" not in arrays or "y" not in arrays or (("x_val" in arrays) != ("y_val" in arrays)):
        raise ValueError(
            f"Received dataset arrays {keys}, expected 'x' and 'y', optionally with both 'x_val' and "
            f"'y_val', and no other key."
        )
    checked: dict[str, np.ndarray] = {}
    for key in _NPZ_KEYS:
        if key not in arrays:
            continue
        array = np.asarray(arrays[key])
        if array.dtype.hasobject or array.ndim == 0:
            raise ValueError(
                f"Received an invalid array {key!r}, expected a numeric array with a batch dimension. "
                f"Received: dtype={array.dtype}, shape={array.shape}"
            )
        checked[key] = array
    for features, labels in (("x", "y"), ("x_val", "y_val")):
        if features in checked and len(checked[features]) != len(checked[labels]):
            raise ValueError(
                f"Received {len(checked[features])} examples in {features!r} but "
                f"{len(checked[labels])} in {labels!r}, expected as many labels as examples."
            )
    return checked


def npz_buffer(arrays: Mapping[str, Any]) -> io.BytesIO:
    """Serialize `{"x", "y", "x_val"?, "y_val"?}` arrays as an `.npz` in memory, positioned at 0."""
    buffer = io.BytesIO()
    np.savez(buffer, **_checked_arrays(arrays))
    buffer.seek(0)
    return buffer


def zip_image_folder(directory: pathlib.Path) -> IO[bytes]:
    """Zip an image folder (one subfolder per class) into a temporary file, positioned at 0.

    Entries are `class/filename` (deeper paths kept), sorted; hidden files and
    folders and files directly in `directory` are left out. Images are stored
    without compression: they are compressed already. The file is deleted
    when closed.
    """
    classes = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(
            f"Received an image folder without class subfolders, expected one subfolder of images "
            f"per class. Received: {str(directory)!r}"
        )
    file = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    try:
        count = 0
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for class_dir in classes:
                for path in sorted(class_dir.rglob("*")):
                    relative = path.relative_to(directory)
                    if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                        archive.write(path, relative.as_posix())
                        count += 1
        if not count:
            raise ValueError(
                f"Received an image folder whose class subfolders hold no file, expected images. "
                f"Received: {str(directory)!r}"
            )
        file.seek(0)
    except BaseException:
        file.close()
        raise
    return file


def _feature_spec(name: str, value: FeatureSpecLike | None, format: str) -> dataset_pb2.FeatureSpec:
    if value is None:
        raise ValueError(
            f"Received no `{name}`, expected a `(name, dtype, shape)` tuple or a FeatureSpec with "
            f"format={format!r}, for example ('image', 'uint8', [32, 32, 3])."
        )
    if isinstance(value, dataset_pb2.FeatureSpec):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise TypeError(
            f"Received an invalid `{name}`, expected a `(name, dtype, shape)` tuple or a FeatureSpec. "
            f"Received: {name}={value!r}"
        )
    key, dtype, shape = value
    if not isinstance(key, str) or not key:
        raise ValueError(
            f"Received an invalid feature name in `{name}`, expected the non-empty key of the "
            f"feature in each tf.train.Example. Received: {key!r}"
        )
    try:
        dtype_name = np.dtype(dtype).name
    except TypeError:
        dtype_name = str(dtype)
    if dtype_name not in _FEATURE_DTYPES:
        raise ValueError(
            f"Received an invalid dtype in `{name}`, expected one of {sorted(_FEATURE_DTYPES)} "
            f"(uint8 reads a bytes_list of raw bytes). Received: {dtype!r}"
        )
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(
            f"Received an invalid shape in `{name}`, expected a sequence of dimensions such as "
            f"[32, 32, 3] ([] for a scalar). Received: {shape!r}"
        )
    return dataset_pb2.FeatureSpec(
        name=key,
        dtype=_FEATURE_DTYPES[dtype_name],
        shape=[_checks.integer(f"{name} shape[{i}]", d, 1) for i, d in enumerate(shape)],
    )


def _check_options_match(
    format: str,
    tfrecord_features: FeatureSpecLike | None,
    tfrecord_labels: FeatureSpecLike | None,
    image_size: Sequence[int] | None,
) -> None:
    misplaced = [
        name
        for name, given, owner in (
            ("tfrecord_features", tfrecord_features is not None, "tfrecord"),
            ("tfrecord_labels", tfrecord_labels is not None, "tfrecord"),
            ("image_size", image_size is not None, "image_folder"),
        )
        if given and format != owner
    ]
    if misplaced:
        raise ValueError(
            f"Received {misplaced} with format={format!r}, expected `tfrecord_*` only with "
            f"'tfrecord' and `image_size` only with 'image_folder'."
        )


def dataset_source(
    format: str,
    *,
    tfrecord_features: FeatureSpecLike | None,
    tfrecord_labels: FeatureSpecLike | None,
    image_size: Sequence[int] | None,
    channels: int,
) -> dataset_pb2.DatasetSource:
    """Build the `DatasetSource` of a format name and its options, checking they go together."""
    if format not in DATASET_FORMATS:
        raise ValueError(
            f"Received an invalid `format`, expected one of {sorted(DATASET_FORMATS)}. "
            f"Received: format={format!r}"
        )
    channels = _checks.integer("channels", channels, 1, 3)
    if channels == 2:
        raise ValueError("Received channels=2, expected 1 (grayscale) or 3 (RGB).")
    _check_options_match(format, tfrecord_features, tfrecord_labels, image_size)
    source = dataset_pb2.DatasetSource(format=DATASET_FORMATS[format])
    if format == "tfrecord":
        source.tfrecord.features.CopyFrom(_feature_spec("tfrecord_features", tfrecord_features, format))
        source.tfrecord.labels.CopyFrom(_feature_spec("tfrecord_labels", tfrecord_labels, format))
    elif format == "image_folder":
        if image_size is None or isinstance(image_size, (str, bytes)) or len(image_size) != 2:
            raise ValueError(
                f"Received an invalid `image_size`, expected (height, width) for an image folder, "
                f"for example (96, 96). Received: image_size={image_size!r}"
            )
        source.image_folder.image_size.extend(
            _checks.integer(f"image_size[{i}]", d, 1) for i, d in enumerate(image_size)
        )
        source.image_folder.channels = channels
    return source


def source_format(source: DatasetSourceLike, format: str | None) -> str:
    """Return the format of an upload's source: `format`, or what the source's form implies."""
    if isinstance(source, Mapping):
        if format not in (None, "npz"):
            raise ValueError(
                f"Received arrays with format={format!r}, expected format 'npz' (or None) for a "
                f"mapping of arrays."
            )
        return "npz"
    if isinstance(source, (bytes, bytearray, memoryview)):
        if format is None:
            raise ValueError(
                f"Received a dataset as bytes without `format`, expected one of "
                f"{sorted(DATASET_FORMATS)} to say how to read them."
            )
        return format
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"Received an invalid `source`, expected a mapping of arrays, a path (str or "
            f"os.PathLike) or bytes. Received: {type(source).__name__}"
        )
    path = pathlib.Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"Received a `source` that does not exist, expected a dataset file or an image "
            f"folder. Received: source={str(source)!r}"
        )
    if path.is_dir() and format not in (None, "image_folder"):
        raise ValueError(
            f"Received a directory with format={format!r}, expected format 'image_folder' "
            f"(or None): a directory is uploaded as a zipped image folder."
        )
    detected = format if format is not None else detect_dataset_format(path)
    if detected is None:
        raise ValueError(
            f"Received a dataset file whose format cannot be told from its name, expected a "
            f".npz, .tfrecord, .zip, .tar or .tar.gz file, or `format` set to one of "
            f"{sorted(DATASET_FORMATS)}. Received: source={str(source)!r}"
        )
    return detected
