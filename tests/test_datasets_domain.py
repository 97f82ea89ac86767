"""DatasetStore without gRPC: every format's checks, the commit, CreateDataset paths, restore."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from weightsmith_server.datasets import DatasetInfo, DatasetSource, DatasetStore, FeatureSpecInfo
from weightsmith_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    WeightsmithError,
)

MAX_UPLOAD = 1 << 20
NPZ = DatasetSource("npz")
IMAGES = DatasetSource("image_folder", image_size=(4, 4), channels=3)
FLOAT_FEATURES = FeatureSpecInfo("features", "float32", (3,))
INT_LABELS = FeatureSpecInfo("label", "int64", ())
TFRECORD = DatasetSource("tfrecord", tfrecord_features=FLOAT_FEATURES, tfrecord_labels=INT_LABELS)


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    folder = tmp_path / "allowed"
    folder.mkdir()
    return folder


@pytest.fixture
def store(tmp_path: Path, executor: ThreadPoolExecutor, allowed: Path) -> DatasetStore:
    datasets = DatasetStore(
        tmp_path / "store", executor, allowed_roots=[allowed], max_upload_bytes=MAX_UPLOAD
    )
    datasets.restore()
    return datasets


# --- helpers -----------------------------------------------------------------


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


async def chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def upload(
    store: DatasetStore,
    data: bytes,
    source: DatasetSource = NPZ,
    dataset_id: str = "",
    size_bytes: int | None = None,
) -> DatasetInfo:
    size = len(data) if size_bytes is None else size_bytes
    return await store.upload(dataset_id, source, size, chunks(data))


def expect(
    raised: pytest.ExceptionInfo[WeightsmithError], kind: type[WeightsmithError], reason: str, field: str
) -> str:
    """Check an error's class, reason and field; return its message."""
    error = raised.value
    assert type(error) is kind, error
    assert (error.reason, error.violations[0][0]) == (reason, field), error.message
    return error.message


def assert_nothing_created(store: DatasetStore) -> None:
    assert list(store.datasets_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []
    assert store.list(0, "") == ([], "")


def arrays_of(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    x, y = next(iter(dataset.batch(1000)))
    return x.numpy(), y.numpy()


def png(height: int, width: int, value: int, channels: int = 3) -> bytes:
    pixels = np.full((height, width, channels), value, np.uint8)
    return tf.io.encode_png(pixels).numpy()


def zip_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                archive.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                archive.addfile(info, io.BytesIO(entry[1]))
    return buffer.getvalue()


def zip_symlink(name: str, target: str) -> bytes:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat/a.png", png(2, 2, 1))
        archive.writestr(info, target)
    return buffer.getvalue()


def tar_link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def example(features: dict[str, tf.train.Feature]) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def floats(values: Any) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def ints(values: Any) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def raw(data: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))


def tfrecord_bytes(tmp_path: Path, records: list[bytes]) -> bytes:
    path = tmp_path / "records.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return path.read_bytes()


def float_records(count: int, labels: Callable[[int], int] = lambda i: i % 3) -> list[bytes]:
    return [example({"features": floats([i, i + 0.5, -i]), "label": ints([labels(i)])}) for i in range(count)]


# --- NPZ ---------------------------------------------------------------------


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


X4 = np.zeros((4, 2), np.float32)
Y4 = np.array([0, 1, 2, 1], np.int64)


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


def npz_member(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


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


# --- the upload stream -------------------------------------------------------


@pytest.mark.parametrize(
    ("announced", "kind", "reason", "field"),
    [
        (lambda n: n + 10, InvalidArgument, "UPLOAD_TRUNCATED", "chunk"),
        (lambda n: n - 10, InvalidArgument, "UPLOAD_SIZE_MISMATCH", "chunk"),
        (lambda n: MAX_UPLOAD + 1, ResourceExhausted, "UPLOAD_TOO_LARGE", "header.size_bytes"),
        (lambda n: 0, InvalidArgument, "INVALID_SIZE", "header.size_bytes"),
    ],
    ids=["truncated", "oversized", "over-limit", "zero"],
)
async def test_upload_size_must_match_the_header(
    store: DatasetStore,
    announced: Callable[[int], int],
    kind: type[WeightsmithError],
    reason: str,
    field: str,
) -> None:
    data = npz_bytes(x=X4, y=Y4)
    with pytest.raises(kind) as raised:
        await upload(store, data, dataset_id="sized", size_bytes=announced(len(data)))
    expect(raised, kind, reason, field)
    assert_nothing_created(store)
    assert (await upload(store, data, dataset_id="sized")).dataset_id == "sized"  # the id was released


@pytest.mark.parametrize(
    ("source", "reason", "field"),
    [
        (DatasetSource(""), "UNSUPPORTED_FORMAT", "header.source.format"),
        (DatasetSource("csv"), "UNSUPPORTED_FORMAT", "header.source.format"),
        (DatasetSource("tfrecord"), "MISSING_TFRECORD_OPTIONS", "header.source.tfrecord"),
        (
            DatasetSource("tfrecord", FeatureSpecInfo("f", "float64", (2,)), INT_LABELS),
            "UNSUPPORTED_DTYPE",
            "header.source.tfrecord.features.dtype",
        ),
        (
            DatasetSource("tfrecord", FLOAT_FEATURES, FeatureSpecInfo("", "int64", ())),
            "INVALID_FEATURE_SPEC",
            "header.source.tfrecord.labels.name",
        ),
        (
            DatasetSource("tfrecord", FeatureSpecInfo("f", "float32", (2, 0)), INT_LABELS),
            "INVALID_SHAPE",
            "header.source.tfrecord.features.shape",
        ),
        (DatasetSource("image_folder"), "INVALID_IMAGE_SIZE", "header.source.image_folder.image_size"),
        (
            DatasetSource("image_folder", image_size=(0, 4)),
            "INVALID_IMAGE_SIZE",
            "header.source.image_folder.image_size",
        ),
        (
            DatasetSource("image_folder", image_size=(5000, 4)),
            "INVALID_IMAGE_SIZE",
            "header.source.image_folder.image_size",
        ),
        (
            DatasetSource("image_folder", image_size=(4, 4), channels=4),
            "INVALID_CHANNELS",
            "header.source.image_folder.channels",
        ),
        (DatasetSource("npz", image_size=(4, 4)), "OPTIONS_MISMATCH", "header.source.image_folder"),
        (
            DatasetSource("npz", tfrecord_features=FLOAT_FEATURES),
            "OPTIONS_MISMATCH",
            "header.source.tfrecord",
        ),
    ],
)
async def test_invalid_sources_are_refused_before_any_byte_is_read(
    store: DatasetStore, source: DatasetSource, reason: str, field: str
) -> None:
    async def never() -> AsyncIterator[bytes]:
        raise AssertionError("the stream must not be read")
        yield b""

    with pytest.raises(InvalidArgument) as raised:
        await store.upload("", source, 10, never())
    expect(raised, InvalidArgument, reason, field)
    assert_nothing_created(store)


async def test_ids_are_validated_and_unique(store: DatasetStore, allowed: Path) -> None:
    data = npz_bytes(x=X4, y=Y4)
    with pytest.raises(InvalidArgument) as raised:
        await upload(store, data, dataset_id="Not_Valid")
    expect(raised, InvalidArgument, "INVALID_ID", "header.dataset_id")

    await upload(store, data, dataset_id="taken")
    with pytest.raises(AlreadyExists) as raised_exists:
        await upload(store, data, dataset_id="taken")
    expect(raised_exists, AlreadyExists, "DATASET_EXISTS", "header.dataset_id")
    (allowed / "data.npz").write_bytes(data)
    with pytest.raises(AlreadyExists) as raised_exists:
        await store.create("taken", NPZ, str(allowed / "data.npz"))
    expect(raised_exists, AlreadyExists, "DATASET_EXISTS", "dataset_id")
    with pytest.raises(InvalidArgument) as raised:
        store.get("-bad")
    expect(raised, InvalidArgument, "INVALID_ID", "dataset_id")
    with pytest.raises(NotFound) as raised_missing:
        store.get("absent", field="spec.train_dataset_id")
    expect(raised_missing, NotFound, "DATASET_NOT_FOUND", "spec.train_dataset_id")


# --- TFRecord ----------------------------------------------------------------


async def test_tfrecord_with_float_features_and_int_labels(store: DatasetStore, tmp_path: Path) -> None:
    info = await upload(store, tfrecord_bytes(tmp_path, float_records(7)), TFRECORD, "records")

    assert (info.example_count, info.validation_example_count, info.class_count) == (7, 0, 3)
    assert info.features.name == "features" and info.features.shape == (3,)
    assert (info.labels.name, info.labels.dtype, info.labels.shape) == ("label", "int64", ())
    assert (store.datasets_dir / "records" / "data.tfrecord").is_file()
    dataset, count = store.load("records", "train")
    x, y = arrays_of(dataset)
    assert count == 7
    np.testing.assert_array_equal(x, [[i, i + 0.5, -i] for i in range(7)])
    np.testing.assert_array_equal(y, [i % 3 for i in range(7)])
    with pytest.raises(InvalidArgument) as raised:
        store.load("records", "validation", field="spec.validation_dataset_id")
    expect(raised, InvalidArgument, "NO_VALIDATION_SPLIT", "spec.validation_dataset_id")


async def test_tfrecord_with_raw_uint8_images_and_float_labels(store: DatasetStore, tmp_path: Path) -> None:
    images = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1)
    records = [
        example({"image": raw(img.tobytes()), "target": floats([i * 0.5])}) for i, img in enumerate(images)
    ]
    source = DatasetSource(
        "tfrecord",
        tfrecord_features=FeatureSpecInfo("image", "uint8", (2, 2, 1)),
        tfrecord_labels=FeatureSpecInfo("target", "float32", (1,)),
    )
    info = await upload(store, tfrecord_bytes(tmp_path, records), source)

    assert (info.features.dtype, info.features.shape, info.class_count) == ("uint8", (2, 2, 1), 0)
    x, y = arrays_of(store.load(info.dataset_id, "train")[0])
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, [[0.0], [0.5], [1.0]])


async def test_tfrecord_errors(store: DatasetStore, tmp_path: Path) -> None:
    valid = tfrecord_bytes(tmp_path, float_records(5))
    corrupt = bytearray(valid)
    corrupt[len(valid) // 2] ^= 0xFF
    cases: list[tuple[bytes, DatasetSource, str, str, str]] = [
        (bytes(corrupt), TFRECORD, "CORRUPT_DATASET", "chunk", "cannot be read"),
        (gzip.compress(valid), TFRECORD, "CORRUPT_DATASET", "chunk", "compressed TFRecord"),
        (
            valid,
            DatasetSource("tfrecord", FeatureSpecInfo("features", "float32", (4,)), INT_LABELS),
            "EXAMPLE_MISMATCH",
            "header.source.tfrecord",
            "Record 0",
        ),
        (
            tfrecord_bytes(tmp_path, [*float_records(2), example({"features": floats([1, 2, 3])})]),
            TFRECORD,
            "EXAMPLE_MISMATCH",
            "header.source.tfrecord",
            "Record 2",
        ),
        (
            tfrecord_bytes(tmp_path, float_records(4, labels=lambda i: 1 - i)),
            TFRECORD,
            "NEGATIVE_LABEL",
            "chunk",
            "record 2",
        ),
    ]
    for data, source, reason, field, mentions in cases:
        with pytest.raises(InvalidArgument) as raised:
            await upload(store, data, source)
        assert mentions in expect(raised, InvalidArgument, reason, field)
    assert_nothing_created(store)


# --- image folders -----------------------------------------------------------


async def test_image_folder_zip_under_a_top_level_folder(store: DatasetStore) -> None:
    jpeg = tf.io.encode_jpeg(np.full((6, 5, 3), 200, np.uint8), quality=100).numpy()
    archive = zip_bytes(
        [
            ("pets/dog/b.png", png(4, 4, 30)),
            ("pets/cat/a.png", png(8, 6, 10)),
            ("pets/dog/a.jpg", jpeg),
            ("pets/cat/notes.txt", b"ignored"),
            ("pets/cat/.DS_Store", b"ignored"),
            ("__MACOSX/pets/cat/._a.png", b"ignored"),
        ]
    )
    info = await upload(store, archive, IMAGES, "pets")

    assert (info.format, info.example_count, info.class_count) == ("image_folder", 3, 2)
    assert info.class_names == ["cat", "dog"]
    assert (info.features.dtype, info.features.shape) == ("uint8", (4, 4, 3))
    assert (info.labels.dtype, info.labels.shape) == ("int64", ())
    x, y = arrays_of(store.load("pets", "train")[0])
    assert x.dtype == np.uint8 and x.shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(y, [0, 1, 1])  # cat/a.png, dog/a.jpg, dog/b.png
    assert (x[0] == 10).all()  # resized, constant stays constant
    assert abs(int(x[1].mean()) - 200) <= 2  # JPEG
    assert (x[2] == 30).all()  # already 4x4: unchanged


async def test_image_folder_tar_grayscale_with_an_empty_class(store: DatasetStore) -> None:
    bird = tarfile.TarInfo("bird")
    bird.type = tarfile.DIRTYPE
    archive = tar_bytes(
        [bird, ("./cat/1.png", png(4, 4, 90)), ("cat/2.png", png(4, 4, 60)), ("dog/1.png", png(3, 3, 250))]
    )
    source = DatasetSource("image_folder", image_size=(2, 3), channels=1)
    info = await upload(store, archive, source)

    # Empty class folders count, as in keras.utils.image_dataset_from_directory.
    assert info.class_names == ["bird", "cat", "dog"] and info.class_count == 3
    x, y = arrays_of(store.load(info.dataset_id, "train")[0])
    assert x.shape == (3, 2, 3, 1)
    np.testing.assert_array_equal(y, [1, 1, 2])
    assert [int(v) for v in x[:, 0, 0, 0]] == [90, 60, 250]


def _bad_png_header() -> bytes:
    data = bytearray(png(2, 2, 0))
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # claims 100000 x 100000 pixels
    return bytes(data)


@pytest.mark.parametrize(
    ("archive", "kind", "reason", "mentions"),
    [
        (
            zip_bytes([("cat/ok.png", png(2, 2, 1)), ("cat/broken.png", b"not a png")]),
            InvalidArgument,
            "CORRUPT_IMAGE",
            "'cat/broken.png'",
        ),
        (
            zip_bytes([("cat/big.png", _bad_png_header())]),
            ResourceExhausted,
            "IMAGE_TOO_LARGE",
            "'cat/big.png'",
        ),
        (
            zip_bytes([("cat/a.png", png(2, 2, 1)), ("loose.png", png(2, 2, 1))]),
            InvalidArgument,
            "IMAGE_OUTSIDE_CLASS_FOLDER",
            "'loose.png'",
        ),
        (zip_bytes([("cat/readme.txt", b"no images")]), InvalidArgument, "EMPTY_DATASET", "no images"),
        (b"neither zip nor tar" * 50, InvalidArgument, "CORRUPT_DATASET", "neither a zip nor a tar"),
        (
            tar_bytes([("cat/a.png", png(2, 2, 1)), ("cat/b.png", os.urandom(4096))])[:-600],
            InvalidArgument,
            "CORRUPT_DATASET",
            "cannot be read",
        ),
    ],
    ids=["corrupt-image", "image-too-large", "outside-class", "no-images", "not-an-archive", "truncated-tar"],
)
async def test_image_folder_content_errors(
    store: DatasetStore, archive: bytes, kind: type[WeightsmithError], reason: str, mentions: str
) -> None:
    with pytest.raises(kind) as raised:
        await upload(store, archive, IMAGES)
    assert mentions in expect(raised, kind, reason, "chunk")
    assert_nothing_created(store)


@pytest.mark.parametrize(
    ("archive", "entry"),
    [
        (zip_bytes([("cat/a.png", png(2, 2, 1)), ("../evil.png", png(2, 2, 1))]), "../evil.png"),
        (zip_bytes([("cat/a.png", png(2, 2, 1)), ("/abs.png", png(2, 2, 1))]), "/abs.png"),
        (zip_symlink("cat/link.png", "/etc/passwd"), "cat/link.png"),
        (
            zip_bytes([("cat/a.png", png(2, 2, 1)), ("cat\\..\\..\\evil.png", png(2, 2, 1))]),
            "cat\\..\\..\\evil.png",
        ),
        (
            tar_bytes([("cat/a.png", png(2, 2, 1)), ("cat/../../evil.png", png(2, 2, 1))]),
            "cat/../../evil.png",
        ),
        (
            tar_bytes([("cat/a.png", png(2, 2, 1)), tar_link("cat/l.png", "/etc/passwd", tarfile.SYMTYPE)]),
            "cat/l.png",
        ),
        (
            tar_bytes([("cat/a.png", png(2, 2, 1)), tar_link("cat/h.png", "cat/a.png", tarfile.LNKTYPE)]),
            "cat/h.png",
        ),
        (
            tar_bytes([tar_link("cat/dev", "", tarfile.CHRTYPE), ("cat/a.png", png(2, 2, 1))], mode="w"),
            "cat/dev",
        ),
    ],
    ids=[
        "zip-dotdot",
        "zip-absolute",
        "zip-symlink",
        "zip-backslash",
        "tar-dotdot",
        "tar-symlink",
        "tar-hardlink",
        "tar-device",
    ],
)
async def test_unsafe_archive_entries_are_refused_before_anything_is_read(
    store: DatasetStore, tmp_path: Path, archive: bytes, entry: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await upload(store, archive, IMAGES)
    assert repr(entry) in expect(raised, InvalidArgument, "UNSAFE_ARCHIVE_ENTRY", "chunk")
    assert raised.value.metadata["entry"] == entry
    assert_nothing_created(store)
    assert [p.name for p in tmp_path.rglob("evil.png")] == []


async def test_archive_expanding_past_the_limit_is_refused(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    small = DatasetStore(tmp_path / "small", executor, allowed_roots=[], max_upload_bytes=16 << 10)
    bomb = zip_bytes([("cat/a.png", png(2, 2, 1)), ("cat/zeros.txt", bytes(1 << 20))])
    assert len(bomb) < 16 << 10
    with pytest.raises(ResourceExhausted) as raised:
        await upload(small, bomb, IMAGES)
    expect(raised, ResourceExhausted, "ARCHIVE_TOO_LARGE", "chunk")
    assert_nothing_created(small)


# --- CreateDataset -----------------------------------------------------------


async def test_create_copies_a_file_from_an_allowed_root(store: DatasetStore, allowed: Path) -> None:
    source_file = allowed / "sub" / "train.npz"
    source_file.parent.mkdir()
    source_file.write_bytes(npz_bytes(x=X4, y=Y4))
    info = await store.create("copied", NPZ, source_file.as_uri())
    assert info.example_count == 4

    source_file.write_bytes(npz_bytes(x=X4[:1], y=Y4[:1]))  # later changes do not reach the dataset
    assert store.load("copied", "train")[1] == 4
    assert source_file.is_file()

    (store.imports_dir / "imported.npz").write_bytes(npz_bytes(x=X4[:2], y=Y4[:2]))
    imported = await store.create("", NPZ, "imported.npz")  # relative: under the store's imports/
    assert imported.example_count == 2
    assert list(store.tmp_dir.iterdir()) == []


async def test_create_refuses_paths_outside_the_roots(
    store: DatasetStore, allowed: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.npz"
    outside.write_bytes(npz_bytes(x=X4, y=Y4))
    (allowed / "link.npz").symlink_to(outside)
    cases: list[tuple[str, type[WeightsmithError], str]] = [
        (str(outside), InvalidArgument, "PATH_NOT_ALLOWED"),
        (f"{allowed}/../outside.npz", InvalidArgument, "PATH_NOT_ALLOWED"),
        ("../../outside.npz", InvalidArgument, "PATH_NOT_ALLOWED"),
        (str(allowed / "link.npz"), InvalidArgument, "PATH_NOT_ALLOWED"),
        ("gs://bucket/train.npz", InvalidArgument, "UNSUPPORTED_URI"),
        ("https://example.com/train.npz", InvalidArgument, "UNSUPPORTED_URI"),
        ("file://otherhost/train.npz", InvalidArgument, "UNSUPPORTED_URI"),
        ("", InvalidArgument, "INVALID_URI"),
        (str(allowed / "missing.npz"), NotFound, "FILE_NOT_FOUND"),
        (str(allowed), InvalidArgument, "NOT_A_FILE"),
    ]
    for uri, kind, reason in cases:
        with pytest.raises(kind) as raised:
            await store.create("", NPZ, uri)
        expect(raised, kind, reason, "uri")
    (allowed / "corrupt.npz").write_bytes(b"garbage" * 20)
    with pytest.raises(InvalidArgument) as raised_corrupt:
        await store.create("", NPZ, str(allowed / "corrupt.npz"))
    expect(raised_corrupt, InvalidArgument, "CORRUPT_DATASET", "uri")
    assert_nothing_created(store)


# --- listing, deletion, restart ------------------------------------------------


async def test_list_pages_by_id(store: DatasetStore) -> None:
    data = npz_bytes(x=X4, y=Y4)
    for dataset_id in ("c", "a", "b"):
        await upload(store, data, dataset_id=dataset_id)
    first, token = store.list(2, "")
    assert [d.dataset_id for d in first] == ["a", "b"] and token
    second, token = store.list(2, token)
    assert [d.dataset_id for d in second] == ["c"] and token == ""
    with pytest.raises(InvalidArgument) as raised:
        store.list(-1, "")
    expect(raised, InvalidArgument, "INVALID_PAGE_SIZE", "page_size")


async def test_delete_refuses_while_in_use_then_removes(store: DatasetStore) -> None:
    await upload(store, npz_bytes(x=X4, y=Y4), dataset_id="busy")
    with pytest.raises(FailedPrecondition) as raised:
        await store.delete("busy", lambda dataset_id: ["job-2", "job-1"])
    assert "['job-1', 'job-2']" in expect(raised, FailedPrecondition, "DATASET_IN_USE", "dataset_id")
    assert store.get("busy").dataset_id == "busy"

    await store.delete("busy", lambda dataset_id: [])
    with pytest.raises(NotFound):
        store.get("busy")
    assert_nothing_created(store)
    with pytest.raises(NotFound) as raised_missing:
        await store.delete("busy", lambda dataset_id: [])
    expect(raised_missing, NotFound, "DATASET_NOT_FOUND", "dataset_id")
    await upload(store, npz_bytes(x=X4, y=Y4), dataset_id="busy")  # the id is free again


async def test_restore_lists_the_same_datasets_and_drops_leftovers(
    store: DatasetStore, executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    created = [
        await upload(store, npz_bytes(x=X4, y=Y4), dataset_id="arrays"),
        await upload(store, tfrecord_bytes(tmp_path, float_records(3)), TFRECORD, "records"),
        await upload(store, zip_bytes([("cat/a.png", png(2, 2, 7))]), IMAGES, "images"),
    ]
    (store.tmp_dir / "dataset-staging-crashed").mkdir()
    (store.tmp_dir / "dataset-upload-crashed").write_bytes(b"partial")
    (store.datasets_dir / "half").mkdir()  # no dataset.json: never committed
    (store.datasets_dir / "unreadable").mkdir()
    (store.datasets_dir / "unreadable" / "dataset.json").write_text("{")

    again = DatasetStore(store.root, executor, allowed_roots=[], max_upload_bytes=MAX_UPLOAD)
    again.restore()

    assert again.list(0, "")[0] == sorted(created, key=lambda d: d.dataset_id)
    assert [p.name for p in again.tmp_dir.iterdir()] == []
    assert not (again.datasets_dir / "half").exists()
    with pytest.raises(FailedPrecondition) as raised:
        again.get("unreadable")
    expect(raised, FailedPrecondition, "DATASET_UNRESTORABLE", "dataset_id")
    x, y = arrays_of(again.load("records", "train")[0])
    np.testing.assert_array_equal(y, [0, 1, 2])
    x, _ = arrays_of(again.load("images", "train")[0])
    assert (x == 7).all() and x.shape == (1, 4, 4, 3)
    assert sorted(os.listdir(again.datasets_dir / "arrays")) == ["data.npz", "dataset.json"]
