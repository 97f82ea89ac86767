"""Image files: header sniffing (to refuse huge images before decoding them) and decoding."""

from __future__ import annotations

import struct

import numpy as np

from weightsmith_server.datasets.reader import tf_message
from weightsmith_server.errors import InvalidArgument, ResourceExhausted

# The extensions that count as images (Keras's list).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# Decoding allocates height x width x 4 bytes whatever the file size; a
# few-kilobyte PNG may claim 100000 x 100000 pixels.
MAX_IMAGE_PIXELS = 1 << 26


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(height, width) read from a BMP, GIF, JPEG or PNG header; None when unrecognised."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return height, width
    if data[:2] == b"BM" and len(data) >= 26:
        if int.from_bytes(data[14:18], "little") == 12:
            width, height = struct.unpack("<HH", data[18:22])
        else:
            width, height = struct.unpack("<ii", data[18:26])
        return abs(height), abs(width)
    if data[:2] == b"\xff\xd8":
        return _jpeg_dimensions(data)
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's first start-of-frame marker."""
    position = 2
    while position + 9 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return height, width
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def decode_image(data: bytes, name: str, size: tuple[int, int], channels: int, data_field: str) -> np.ndarray:
    """One image as uint8 [height, width, channels], resized (bilinear) when it differs."""
    import tensorflow as tf

    dimensions = image_dimensions(data)
    if dimensions is not None and dimensions[0] * dimensions[1] > MAX_IMAGE_PIXELS:
        raise ResourceExhausted(
            f"The image {name[:200]!r} claims {dimensions[0]}x{dimensions[1]} pixels, more than the "
            f"server's limit of {MAX_IMAGE_PIXELS} pixels per image.",
            reason="IMAGE_TOO_LARGE",
            field=data_field,
        )
    try:
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    except tf.errors.OpError as exc:
        raise InvalidArgument(
            f"The image {name[:200]!r} cannot be decoded: {tf_message(exc)}. Expected a valid BMP, "
            f"GIF, JPEG or PNG file.",
            reason="CORRUPT_IMAGE",
            field=data_field,
            metadata={"entry": name[:200]},
        ) from exc
    if tuple(image.shape[:2]) != size:
        resized = tf.image.resize(image, size, method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return image.numpy()
