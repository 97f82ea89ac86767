"""NPZ datasets (`numpy.savez`): arrays `x` and `y`, optionally `x_val` and `y_val`, stored as received.

`x` holds the inputs and `y` the labels, one example per entry of the first
dimension; `x_val` and `y_val` (both or neither) are the validation split.
`x` is numeric (float, int or uint8) and finite; `y` holds integer class
indices (at least 0; `class_count` is the largest plus one) or float targets
(`class_count` 0). Pickled (object) arrays are refused, and array headers are
checked before numpy allocates what they claim.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from weightsmith_server.datasets.archive import ARCHIVE_ERRORS
from weightsmith_server.datasets.reader import (
    Contents,
    DatasetFormatReader,
    Received,
    corrupt,
    first_bad_example,
)
from weightsmith_server.datasets.records import DatasetFormat, DatasetSource, DatasetSplit, StoredDataset
from weightsmith_server.errors import InvalidArgument, ResourceExhausted
from weightsmith_server.numerics import all_finite
from weightsmith_server.tensor_spec import TensorSpecInfo

if TYPE_CHECKING:
    import tensorflow as tf

_ARRAYS = ("x", "y", "x_val", "y_val")


class NpzReader(DatasetFormatReader):
    """NPZ files, validated and stored as received."""

    format = DatasetFormat.NPZ
    data_file = "data.npz"

    def ingest(self, received: Received, source: DatasetSource, target: Path) -> Contents:
        contents = validate_npz(received.path, received.data_field, received.max_expanded_bytes)
        os.rename(received.path, target)
        return contents

    def load(self, path: Path, stored: StoredDataset, split: DatasetSplit) -> tuple[tf.data.Dataset, int]:
        return load_arrays(path, split)


def load_arrays(path: Path, split: DatasetSplit) -> tuple[tf.data.Dataset, int]:
    """A stored NPZ's `x`/`y` (or `x_val`/`y_val`) as a dataset of pairs, and their count."""
    import tensorflow as tf

    suffix = "" if split is DatasetSplit.TRAIN else "_val"
    with np.load(path, allow_pickle=False) as npz:
        x = _native(npz[f"x{suffix}"])
        y = _native(npz[f"y{suffix}"])
    return tf.data.Dataset.from_tensor_slices((x, y)), len(x)


def _native(array: np.ndarray) -> np.ndarray:
    """The array in native byte order (TensorFlow takes no big-endian data)."""
    return array.astype(array.dtype.newbyteorder("="), copy=False)


# --- validation ----------------------------------------------------------------


def validate_npz(path: Path, data_field: str, max_expanded_bytes: int) -> Contents:
    """Check an NPZ's arrays against the rules in the module docstring."""
    arrays = _read_arrays(path, data_field, max_expanded_bytes)
    x, y = arrays["x"], arrays["y"]
    _check_examples("x", x, "y", y, data_field)
    _check_values("x", x, "y", y, data_field)
    labels = [y]
    if "x_val" in arrays:
        x_val, y_val = arrays["x_val"], arrays["y_val"]
        _check_examples("x_val", x_val, "y_val", y_val, data_field)
        _check_like_training("x", x, "x_val", x_val, data_field)
        _check_like_training("y", y, "y_val", y_val, data_field)
        _check_values("x_val", x_val, "y_val", y_val, data_field)
        labels.append(y_val)
    return Contents(
        example_count=len(x),
        validation_example_count=len(arrays["x_val"]) if "x_val" in arrays else 0,
        features=TensorSpecInfo("x", x.dtype.name, tuple(int(d) for d in x.shape[1:])),
        labels=TensorSpecInfo("y", y.dtype.name, tuple(int(d) for d in y.shape[1:])),
        class_count=max(int(a.max()) if a.size else -1 for a in labels) + 1 if y.dtype.kind in "iu" else 0,
    )


def _read_arrays(path: Path, data_field: str, max_expanded_bytes: int) -> dict[str, np.ndarray]:
    """Every array of a well-formed NPZ holding the expected names, within the expansion limit."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    # Checked first: np.load would take any other file for a pickle and say so.
    if magic.startswith(b"\x93NUMPY"):
        raise InvalidArgument(
            "Received a single .npy array, expected an .npz archive with arrays `x` and `y`; write it "
            "with numpy.savez(path, x=..., y=...).",
            reason="CORRUPT_DATASET",
            field=data_field,
        )
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise corrupt(
            "NPZ file", "it is not a zip archive; expected a file written by numpy.savez", data_field
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, *ARCHIVE_ERRORS) as exc:
        raise corrupt("NPZ file", f"{exc}; expected a file written by numpy.savez", data_field) from exc
    with loaded as npz:
        expanded = sum(info.file_size for info in npz.zip.infolist())
        if expanded > max_expanded_bytes:
            raise ResourceExhausted(
                f"The NPZ file's arrays take {expanded} bytes, more than the server's limit of "
                f"{max_expanded_bytes} bytes for a dataset held in memory.",
                reason="ARCHIVE_TOO_LARGE",
                field=data_field,
            )
        _check_names(list(npz.files), data_field)
        return {name: _read_array(npz, name, data_field) for name in npz.files}


def _check_names(names: list[str], data_field: str) -> None:
    """Only the known arrays, `x` and `y` among them, and validation arrays in pairs."""
    unknown = [n for n in names if n not in _ARRAYS]
    if unknown:
        raise InvalidArgument(
            f"Received arrays {unknown} in the NPZ file, expected only `x`, `y` and optionally "
            f"`x_val` and `y_val`.",
            reason="UNKNOWN_ARRAY",
            field=data_field,
        )
    for required in ("x", "y"):
        if required not in names:
            raise InvalidArgument(
                f"The NPZ file has no array `{required}`; expected arrays `x` and `y` (optionally "
                f"`x_val` and `y_val`). Received arrays: {names}.",
                reason="MISSING_ARRAY",
                field=data_field,
            )
    if ("x_val" in names) != ("y_val" in names):
        present, missing = ("x_val", "y_val") if "x_val" in names else ("y_val", "x_val")
        raise InvalidArgument(
            f"The NPZ file has `{present}` but no `{missing}`; give both validation arrays or neither.",
            reason="MISSING_ARRAY",
            field=data_field,
        )


def _read_array(npz: Any, name: str, data_field: str) -> np.ndarray:
    """One NPZ array, after checking its header.

    The header is read first because numpy allocates what it claims before
    reading any data: a few bytes could otherwise ask for terabytes.
    """
    member = f"{name}.npy" if f"{name}.npy" in npz.zip.namelist() else name
    try:
        with npz.zip.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except (ValueError, *ARCHIVE_ERRORS) as exc:
        raise corrupt(f"NPZ array `{name}`", exc, data_field) from exc
    if dtype.hasobject:
        raise InvalidArgument(
            f"Array `{name}` holds Python objects (pickled), which the server never loads; expected a "
            f"numeric array.",
            reason="UNSUPPORTED_DTYPE",
            field=data_field,
        )
    claimed = math.prod(shape) * dtype.itemsize
    held = npz.zip.getinfo(member).file_size
    if claimed > held:
        raise corrupt(
            f"NPZ array `{name}`",
            f"its header claims {claimed} bytes of data, the file holds {held}",
            data_field,
        )
    try:
        array = npz[name]
    except (ValueError, *ARCHIVE_ERRORS) as exc:
        raise corrupt(f"NPZ array `{name}`", exc, data_field) from exc
    if not isinstance(array, np.ndarray):
        raise corrupt(f"NPZ member `{member}`", "it is not a .npy array", data_field)
    return array


def _check_examples(x_name: str, x: np.ndarray, y_name: str, y: np.ndarray, data_field: str) -> None:
    """Both arrays have an example dimension of the same, non-zero length."""
    for name, array in ((x_name, x), (y_name, y)):
        if array.ndim == 0:
            raise InvalidArgument(
                f"Received a scalar `{name}`, expected an array whose first dimension indexes examples.",
                reason="INVALID_SHAPE",
                field=data_field,
            )
    if len(x) != len(y):
        raise InvalidArgument(
            f"Received {len(x)} examples in `{x_name}` but {len(y)} labels in `{y_name}`, expected the "
            f"same first dimension.",
            reason="LENGTH_MISMATCH",
            field=data_field,
        )
    if len(x) == 0:
        raise InvalidArgument(
            f"Received 0 examples in `{x_name}`, expected at least 1"
            + ("; leave out `x_val` and `y_val` instead." if x_name == "x_val" else "."),
            reason="EMPTY_DATASET",
            field=data_field,
        )


def _check_like_training(
    train_name: str, train: np.ndarray, val_name: str, val: np.ndarray, data_field: str
) -> None:
    """A validation array has its training array's dtype and example shape."""
    if val.dtype != train.dtype:
        raise InvalidArgument(
            f"Received `{val_name}` of dtype {val.dtype.name}, expected the dtype of "
            f"`{train_name}`: {train.dtype.name}.",
            reason="DTYPE_MISMATCH",
            field=data_field,
        )
    if val.shape[1:] != train.shape[1:]:
        raise InvalidArgument(
            f"Received `{val_name}` with examples of shape {list(val.shape[1:])}, expected the "
            f"example shape of `{train_name}`: {list(train.shape[1:])}.",
            reason="SHAPE_MISMATCH",
            field=data_field,
        )


def _check_values(x_name: str, x: np.ndarray, y_name: str, y: np.ndarray, data_field: str) -> None:
    """Numeric dtypes, finite floats and non-negative integer labels."""
    if x.dtype.kind not in "fiu":
        raise InvalidArgument(
            f"Received `{x_name}` of dtype {x.dtype.name}, expected a numeric array (float, int or uint8).",
            reason="UNSUPPORTED_DTYPE",
            field=data_field,
        )
    if y.dtype.kind not in "fiu":
        raise InvalidArgument(
            f"Received `{y_name}` of dtype {y.dtype.name}, expected integer class indices or float targets.",
            reason="UNSUPPORTED_DTYPE",
            field=data_field,
        )
    for name, array in ((x_name, x), (y_name, y)):
        if array.dtype.kind == "f" and not all_finite(array):
            bad = first_bad_example(array, ~np.isfinite(array))
            raise InvalidArgument(
                f"Array `{name}` holds NaN or infinite values (first in example {bad}), expected finite "
                f"values.",
                reason="NON_FINITE_VALUES",
                field=data_field,
            )
    if y.dtype.kind == "i" and y.size and (lowest := int(y.min())) < 0:
        bad = first_bad_example(y, y < 0)
        raise InvalidArgument(
            f"Array `{y_name}` holds the negative label {lowest} (first in example {bad}), expected class "
            f"indices of at least 0.",
            reason="NEGATIVE_LABEL",
            field=data_field,
        )
