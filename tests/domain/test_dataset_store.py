"""DatasetStore without gRPC: sources, uploads, ids, CreateDataset paths, listing, deletion, restore."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from datasets_support import (
    FLOAT_FEATURES,
    IMAGES,
    INT_LABELS,
    MAX_UPLOAD,
    NPZ,
    TFRECORD,
    X4,
    Y4,
    arrays_of,
    assert_nothing_created,
    expect,
    float_records,
    npz_bytes,
    png,
    tfrecord_bytes,
    upload,
    zip_bytes,
)

from weightsmith_server.datasets import (
    DatasetFormat,
    DatasetSource,
    DatasetSplit,
    DatasetStore,
    FeatureSpecInfo,
    get_format,
)
from weightsmith_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    WeightsmithError,
)

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
        # Strings the enum does not know: the domain refuses them, whatever the caller typed.
        (DatasetSource(""), "UNSUPPORTED_FORMAT", "header.source.format"),  # type: ignore[arg-type]
        (DatasetSource("csv"), "UNSUPPORTED_FORMAT", "header.source.format"),  # type: ignore[arg-type]
        (DatasetSource(DatasetFormat.TFRECORD), "MISSING_TFRECORD_OPTIONS", "header.source.tfrecord"),
        (
            DatasetSource(DatasetFormat.TFRECORD, FeatureSpecInfo("f", "float64", (2,)), INT_LABELS),
            "UNSUPPORTED_DTYPE",
            "header.source.tfrecord.features.dtype",
        ),
        (
            DatasetSource(DatasetFormat.TFRECORD, FLOAT_FEATURES, FeatureSpecInfo("", "int64", ())),
            "INVALID_FEATURE_SPEC",
            "header.source.tfrecord.labels.name",
        ),
        (
            DatasetSource(DatasetFormat.TFRECORD, FeatureSpecInfo("f", "float32", (2, 0)), INT_LABELS),
            "INVALID_SHAPE",
            "header.source.tfrecord.features.shape",
        ),
        (
            DatasetSource(DatasetFormat.IMAGE_FOLDER),
            "INVALID_IMAGE_SIZE",
            "header.source.image_folder.image_size",
        ),
        (
            DatasetSource(DatasetFormat.IMAGE_FOLDER, image_size=(0, 4)),
            "INVALID_IMAGE_SIZE",
            "header.source.image_folder.image_size",
        ),
        (
            DatasetSource(DatasetFormat.IMAGE_FOLDER, image_size=(5000, 4)),
            "INVALID_IMAGE_SIZE",
            "header.source.image_folder.image_size",
        ),
        (
            DatasetSource(DatasetFormat.IMAGE_FOLDER, image_size=(4, 4), channels=4),
            "INVALID_CHANNELS",
            "header.source.image_folder.channels",
        ),
        (
            DatasetSource(DatasetFormat.NPZ, image_size=(4, 4)),
            "OPTIONS_MISMATCH",
            "header.source.image_folder",
        ),
        (
            DatasetSource(DatasetFormat.NPZ, tfrecord_features=FLOAT_FEATURES),
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


# --- the domain's enums --------------------------------------------------------


def test_format_and_split_enums_refuse_unknown_values() -> None:
    assert DatasetFormat.parse("tfrecord", field="f") is DatasetFormat.TFRECORD
    assert get_format("image_folder").format is DatasetFormat.IMAGE_FOLDER
    assert DatasetSplit.parse("validation", field="f") is DatasetSplit.VALIDATION
    with pytest.raises(InvalidArgument) as raised:
        DatasetFormat.parse("parquet", field="source.format")
    assert "'parquet'" in expect(raised, InvalidArgument, "UNSUPPORTED_FORMAT", "source.format")
    with pytest.raises(InvalidArgument) as raised:
        get_format("NPZ", field="header.source.format")  # values are lower case, as stored
    expect(raised, InvalidArgument, "UNSUPPORTED_FORMAT", "header.source.format")
    with pytest.raises(InvalidArgument) as raised:
        DatasetSplit.parse("test", field="split")
    expect(raised, InvalidArgument, "INVALID_SPLIT", "split")


async def test_store_entries_keep_string_values_and_unknown_formats_are_unrestorable(
    store: DatasetStore, executor: ThreadPoolExecutor
) -> None:
    await upload(store, npz_bytes(x=X4, y=Y4), dataset_id="arrays")
    document = json.loads((store.datasets_dir / "arrays" / "dataset.json").read_text())
    assert (document["dataset"]["format"], document["source"]["format"]) == ("npz", "npz")
    with pytest.raises(InvalidArgument) as raised:
        store.load("arrays", "test")
    expect(raised, InvalidArgument, "INVALID_SPLIT", "dataset_id")

    document["dataset"]["format"] = document["source"]["format"] = "parquet"
    (store.datasets_dir / "future").mkdir()
    (store.datasets_dir / "future" / "dataset.json").write_text(json.dumps(document))
    again = DatasetStore(store.root, executor, allowed_roots=[], max_upload_bytes=MAX_UPLOAD)
    again.restore()

    assert again.get("arrays").format is DatasetFormat.NPZ
    with pytest.raises(FailedPrecondition) as raised_future:
        again.get("future")
    assert "'parquet'" in expect(raised_future, FailedPrecondition, "DATASET_UNRESTORABLE", "dataset_id")
