"""Image folder datasets: an archive of `<class>/<image>` files, stored as decoded uint8 arrays.

The archive is a zip or tar (optionally gzip, bzip2 or xz compressed) in the
layout of `keras.utils.image_dataset_from_directory`, optionally inside one
top-level folder. Classes are the sorted class folder names (empty ones
included), labels their indices. BMP, GIF, JPEG and PNG files count; other
files, hidden files and `__MACOSX/` are ignored. Each image is decoded,
resized (bilinear) to `image_size` and stored as `x` [N, H, W, C] (uint8) and
`y` (int64) in an NPZ, so training reads arrays.

Bounds, all checked before anything they bound is allocated: `image_size`
at most `max_image_pixels` (height x width); every image file at most
`InputLimits.image_file_bytes()` and its header's pixels at most
`max_image_pixels`; the decoded arrays (count x height x width x channels)
at most the server's expansion limit.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from weightsmith_server.datasets.archive import Archive, Entry
from weightsmith_server.datasets.images import IMAGE_EXTENSIONS, check_image_header, decode_image
from weightsmith_server.datasets.npz import load_arrays
from weightsmith_server.datasets.reader import Contents, DatasetFormatReader, Received
from weightsmith_server.datasets.records import DatasetFormat, DatasetSource, DatasetSplit, StoredDataset
from weightsmith_server.errors import InvalidArgument, ResourceExhausted
from weightsmith_server.limits import InputLimits, check_member_size, excerpt
from weightsmith_server.tensor_spec import TensorSpecInfo

if TYPE_CHECKING:
    import tensorflow as tf

MAX_IMAGE_SIDE = 4096


def check_image_size(size: tuple[int, ...] | None, limits: InputLimits, field: str) -> None:
    """RESOURCE_EXHAUSTED (IMAGE_SIZE_TOO_LARGE) when the resize target has too many pixels."""
    if size is None or len(size) != 2:
        return
    pixels = int(size[0]) * int(size[1])
    if pixels > limits.max_image_pixels:
        raise ResourceExhausted(
            f"Received image_size={list(size)}: {pixels} pixels per image, more than the server's limit "
            f"of {limits.max_image_pixels} (--max-image-pixels); use a smaller image_size.",
            reason="IMAGE_SIZE_TOO_LARGE",
            field=field,
            metadata={"pixels": str(pixels), "limit_pixels": str(limits.max_image_pixels)},
        )


class ImageFolderReader(DatasetFormatReader):
    """Archives of class folders, decoded into arrays on arrival."""

    format = DatasetFormat.IMAGE_FOLDER
    data_file = "data.npz"
    option_group = "image_folder"

    def check_options(self, source: DatasetSource, prefix: str) -> DatasetSource:
        size = source.image_size
        if (
            size is None
            or len(size) != 2
            or not all(isinstance(s, int) and 1 <= s <= MAX_IMAGE_SIDE for s in size)
        ):
            raise InvalidArgument(
                f"Received image_size={None if size is None else list(size)}, expected [height, width] "
                f"with each side from 1 to {MAX_IMAGE_SIDE}.",
                reason="INVALID_IMAGE_SIZE",
                field=f"{prefix}.image_folder.image_size",
            )
        # 0 is the wire's "unset", which means RGB.
        channels = source.channels or 3
        if channels not in (1, 3):
            raise InvalidArgument(
                f"Received channels={source.channels}, expected 1 (grayscale) or 3 (RGB).",
                reason="INVALID_CHANNELS",
                field=f"{prefix}.image_folder.channels",
            )
        return replace(source, image_size=(int(size[0]), int(size[1])), channels=channels)

    def ingest(self, received: Received, source: DatasetSource, target: Path) -> Contents:
        height, width = source.image_size or (0, 0)
        channels = source.channels
        check_image_size(
            source.image_size, received.limits, f"{received.source_field}.image_folder.image_size"
        )
        with Archive(
            received.path, received.data_field, received.max_expanded_bytes, received.limits.max_member_bytes
        ) as archive:
            class_names, labelled = _class_layout(archive, received.data_field)
            for entry, _ in labelled:  # declared sizes first: nothing read yet
                check_member_size(
                    entry.name,
                    entry.size,
                    received.limits.image_file_bytes(),
                    field=received.data_field,
                    flag="--max-image-pixels",
                )
            decoded_bytes = len(labelled) * height * width * channels
            if decoded_bytes > received.max_expanded_bytes:
                raise ResourceExhausted(
                    f"{len(labelled)} images of {height}x{width}x{channels} take {decoded_bytes} bytes, "
                    f"more than the server's limit of {received.max_expanded_bytes}; use a smaller "
                    f"image_size or fewer images.",
                    reason="DATASET_TOO_LARGE",
                    field=received.data_field,
                    metadata={
                        "size_bytes": str(decoded_bytes),
                        "limit_bytes": str(received.max_expanded_bytes),
                    },
                )
            x = _decode_all(archive, [entry for entry, _ in labelled], (height, width), channels, received)
        np.savez(target, x=x, y=np.array([label for _, label in labelled], np.int64))
        return Contents(
            example_count=len(x),
            validation_example_count=0,
            features=TensorSpecInfo("x", "uint8", (height, width, channels)),
            labels=TensorSpecInfo("y", "int64", ()),
            class_count=len(class_names),
            class_names=class_names,
        )

    def load(self, path: Path, stored: StoredDataset, split: DatasetSplit) -> tuple[tf.data.Dataset, int]:
        return load_arrays(path, split)


def _decode_all(
    archive: Archive, images: list[Entry], size: tuple[int, int], channels: int, received: Received
) -> np.ndarray:
    """The images decoded into one uint8 array, in the order of `images`."""
    x = np.empty((len(images), *size, channels), np.uint8)
    position = {id(entry): i for i, entry in enumerate(images)}
    limits = received.limits
    # In archive order: a compressed tar is then read once, front to back.
    for entry in archive.files:
        if id(entry) in position:

            def header(head: bytes, name: str = entry.name) -> None:
                check_image_header(head, name, limits.max_image_pixels, received.data_field)

            data = archive.read(entry, limits.image_file_bytes(), check=header)
            x[position[id(entry)]] = decode_image(
                data, entry.name, size, channels, received.data_field, limits.max_image_pixels
            )
    return x


def _ignored(parts: tuple[str, ...]) -> bool:
    """Hidden files and macOS resource forks are not part of the data."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _class_layout(archive: Archive, data_field: str) -> tuple[list[str], list[tuple[Entry, int]]]:
    """Class names and the images with their labels, in (class, path) order."""
    files = [e for e in archive.files if not _ignored(e.parts)]
    images = [e for e in files if PurePosixPath(e.parts[-1]).suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise InvalidArgument(
            f"The archive holds no images ({', '.join(IMAGE_EXTENSIONS)} files); expected "
            f"<class>/<image> entries.",
            reason="EMPTY_DATASET",
            field=data_field,
        )
    folders = {p for p in archive.folders if not _ignored(p)}
    folders |= {e.parts[:i] for e in files for i in range(1, len(e.parts))}
    tops = {p[0] for p in folders} | {e.parts[0] for e in files}
    # One top-level folder holding the class folders (how most archives are made) is unwrapped.
    strip = 1 if len(tops) == 1 and all(len(e.parts) >= 3 for e in images) else 0
    for entry in images:
        if len(entry.parts) - strip < 2:
            raise InvalidArgument(
                f"The image {excerpt(entry.name)!r} is not inside a class folder; expected "
                f"<class>/<image> entries (optionally under one top-level folder).",
                reason="IMAGE_OUTSIDE_CLASS_FOLDER",
                field=data_field,
            )
    # Empty class folders count, as in keras.utils.image_dataset_from_directory.
    class_names = sorted({p[strip] for p in folders if len(p) > strip})
    for name in class_names:
        if not name.isprintable() or name != name.encode("utf-8", "replace").decode("utf-8"):
            raise InvalidArgument(
                f"The class folder name {excerpt(name)!r} is not printable UTF-8; rename the folder.",
                reason="INVALID_CLASS_NAME",
                field=data_field,
            )
    index = {name: i for i, name in enumerate(class_names)}
    labelled = sorted(((e, index[e.parts[strip]]) for e in images), key=lambda item: (item[1], item[0].parts))
    return class_names, labelled
