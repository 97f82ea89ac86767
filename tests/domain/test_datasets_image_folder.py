"""Image folder datasets: class layout, decoding and resizing, and archives read safely."""

from __future__ import annotations

import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from datasets_support import (
    IMAGES,
    arrays_of,
    assert_nothing_created,
    expect,
    png,
    tar_bytes,
    tar_link,
    upload,
    zip_bytes,
    zip_symlink,
)

from weightsmith_server.datasets import DatasetFormat, DatasetSource, DatasetStore
from weightsmith_server.errors import InvalidArgument, ResourceExhausted, WeightsmithError


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
    source = DatasetSource(DatasetFormat.IMAGE_FOLDER, image_size=(2, 3), channels=1)
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
