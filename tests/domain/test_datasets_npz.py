"""NPZ datasets: what is accepted, what each rule refuses, and what loads back."""

from __future__ import annotations

import io
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasets_support import X4, Y4, arrays_of, assert_nothing_created, expect, npz_bytes, npz_member, upload

from weightsmith_server.datasets import DatasetStore
from weightsmith_server.errors import InvalidArgument, ResourceExhausted


async def test_npz_upload_records_spec_and_loads_the_same_arrays(store: DatasetStore) -> None:
    x = np.arange(24, dtype=np.float32).reshape(6, 2, 2)
    y = np.array([0, 2, 1, 2, 0, 4], np.int64)
    info = await upload(store, npz_bytes(x=x, y=y), dataset_id="digits")

    assert (info.dataset_id, info.format, info.example_count, info.validation_example_count) == (
        "digits",
        "npz",
        6,
        0,
    )
    assert (info.features.dtype, info.features.shape) == ("float32", (2, 2))
    assert (info.labels.dtype, info.labels.shape) == ("int64", ())
    assert info.class_count == 5 and info.class_names == []
    folder = store.datasets_dir / "digits"
    assert sorted(p.name for p in folder.iterdir()) == ["data.npz", "dataset.json"]
    assert info.size_bytes == (folder / "data.npz").stat().st_size
    assert info.create_time.endswith("Z")
    assert store.get("digits") == info
    assert list(store.tmp_dir.iterdir()) == []

    dataset, count = store.load("digits", "train")
    assert count == 6
    loaded_x, loaded_y = arrays_of(dataset)
    np.testing.assert_array_equal(loaded_x, x)
    np.testing.assert_array_equal(loaded_y, y)
    with pytest.raises(InvalidArgument) as raised:
        store.load("digits", "validation")
    expect(raised, InvalidArgument, "NO_VALIDATION_SPLIT", "dataset_id")


async def test_npz_with_validation_arrays_and_float_targets(store: DatasetStore) -> None:
    x = np.ones((4, 3), np.uint8)
    y = np.array([0, 1, 1, 0], np.int32)
    x_val = np.zeros((2, 3), np.uint8)
    y_val = np.array([3, 0], np.int32)
    info = await upload(store, npz_bytes(x=x, y=y, x_val=x_val, y_val=y_val))

    assert info.dataset_id.startswith("dataset-")  # picked by the server
    assert (info.example_count, info.validation_example_count, info.class_count) == (4, 2, 4)
    assert (info.features.dtype, info.labels.dtype) == ("uint8", "int32")
    dataset, count = store.load(info.dataset_id, "validation")
    assert count == 2
    loaded_x, loaded_y = arrays_of(dataset)
    np.testing.assert_array_equal(loaded_x, x_val)
    np.testing.assert_array_equal(loaded_y, y_val)

    targets = np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)
    regression = await upload(store, npz_bytes(x=x, y=targets))
    assert (regression.class_count, regression.labels.dtype, regression.labels.shape) == (0, "float32", (2,))


@pytest.mark.parametrize(
    ("arrays", "reason", "mentions"),
    [
        ({"x": X4}, "MISSING_ARRAY", "no array `y`"),
        ({"x": X4, "y": Y4, "x_val": X4}, "MISSING_ARRAY", "`x_val` but no `y_val`"),
        ({"x": X4, "y": Y4, "z": X4}, "UNKNOWN_ARRAY", "['z']"),
        ({"x": X4, "y": Y4[:3]}, "LENGTH_MISMATCH", "4 examples in `x` but 3 labels"),
        ({"x": X4[:0], "y": Y4[:0]}, "EMPTY_DATASET", "0 examples"),
        ({"x": np.float32(1), "y": Y4}, "INVALID_SHAPE", "scalar `x`"),
        ({"x": X4, "y": np.array([0, 1, -2, 1])}, "NEGATIVE_LABEL", "-2 (first in example 2)"),
        (
            {"x": np.array([[0, 1], [np.nan, 0], [0, 0], [0, 0]], np.float32), "y": Y4},
            "NON_FINITE_VALUES",
            "example 1",
        ),
        ({"x": X4, "y": np.array([0.0, np.inf, 0.0, 0.0])}, "NON_FINITE_VALUES", "`y`"),
        ({"x": X4, "y": Y4.astype(bool)}, "UNSUPPORTED_DTYPE", "dtype bool"),
        ({"x": np.array(["a", "b", "c", "d"]), "y": Y4}, "UNSUPPORTED_DTYPE", "numeric"),
        ({"x": np.array([1, "a", None, 2], dtype=object), "y": Y4}, "UNSUPPORTED_DTYPE", "pickled"),
        ({"x": X4, "y": Y4, "x_val": np.zeros((2, 3), np.float32), "y_val": Y4[:2]}, "SHAPE_MISMATCH", "[3]"),
        ({"x": X4, "y": Y4, "x_val": np.zeros((2, 2)), "y_val": Y4[:2]}, "DTYPE_MISMATCH", "float64"),
        ({"x": X4, "y": Y4, "x_val": X4[:0], "y_val": Y4[:0]}, "EMPTY_DATASET", "leave out `x_val`"),
        ({"x": X4, "y": Y4, "x_val": X4[:2], "y_val": np.array([0, -1])}, "NEGATIVE_LABEL", "`y_val`"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_npz_rule_violations_are_refused_and_create_nothing(
    store: DatasetStore, arrays: dict[str, Any], reason: str, mentions: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await upload(store, npz_bytes(**arrays), dataset_id="bad")
    assert mentions in expect(raised, InvalidArgument, reason, "chunk")
    assert_nothing_created(store)


async def test_corrupt_npz_is_refused(store: DatasetStore) -> None:
    valid = npz_bytes(x=X4, y=Y4)
    for data in (b"\x00not an npz at all" * 10, valid[: len(valid) // 2], io.BytesIO().getvalue() + b"x"):
        with pytest.raises(InvalidArgument) as raised:
            await upload(store, data)
        expect(raised, InvalidArgument, "CORRUPT_DATASET", "chunk")
    buffer = io.BytesIO()
    np.save(buffer, X4)
    with pytest.raises(InvalidArgument) as raised:
        await upload(store, buffer.getvalue())
    assert "single .npy" in expect(raised, InvalidArgument, "CORRUPT_DATASET", "chunk")
    assert_nothing_created(store)


async def test_npz_header_claiming_more_than_it_holds_is_refused_before_allocation(
    store: DatasetStore,
) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(16))
        archive.writestr("y.npy", npz_member(Y4))
    with pytest.raises(InvalidArgument) as raised:
        await upload(store, buffer.getvalue())
    assert "claims 4000000000000 bytes" in expect(raised, InvalidArgument, "CORRUPT_DATASET", "chunk")
    assert_nothing_created(store)


async def test_compressed_npz_expanding_past_the_limit_is_refused(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    small = DatasetStore(tmp_path / "small", executor, allowed_roots=[], max_upload_bytes=16 << 10)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((1 << 16, 1), np.float32), y=np.zeros(1 << 16, np.int64))
    assert len(buffer.getvalue()) < 16 << 10
    with pytest.raises(ResourceExhausted) as raised:
        await upload(small, buffer.getvalue())
    expect(raised, ResourceExhausted, "ARCHIVE_TOO_LARGE", "chunk")
    assert_nothing_created(small)
