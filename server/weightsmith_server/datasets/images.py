"""Image files: header sniffing (to refuse huge images before decoding them) and decoding.

Decoding allocates height x width x channels bytes (all frames of a GIF)
whatever the file size: a few-kilobyte PNG may claim 100000 x 100000
pixels. So an image's size is read from its header first and refused past
`max_image_pixels`, and an image without a recognised header is refused
before TensorFlow sees it. A GIF is cut after its first frame, which is all
`decode_image(expand_animations=False)` keeps anyway.
"""

from __future__ import annotations

import struct

import numpy as np

from weightsmith_server.datasets.reader import tf_message
from weightsmith_server.errors import InvalidArgument, ResourceExhausted
from weightsmith_server.limits import excerpt

# The extensions that count as images (Keras's list).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
_GIF_TRAILER = b"\x3b"


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


def check_image_header(data: bytes, name: str, max_pixels: int, data_field: str) -> None:
    """IMAGE_TOO_LARGE when the header (the first bytes of the file suffice) claims too many pixels."""
    dimensions = image_dimensions(data)
    if dimensions is not None and dimensions[0] * dimensions[1] > max_pixels:
        raise ResourceExhausted(
            f"The image {excerpt(name)!r} claims {dimensions[0]}x{dimensions[1]} pixels, more than the "
            f"server's limit of {max_pixels} pixels per image (--max-image-pixels).",
            reason="IMAGE_TOO_LARGE",
            field=data_field,
            metadata={
                "entry": excerpt(name),
                "pixels": str(dimensions[0] * dimensions[1]),
                "limit_pixels": str(max_pixels),
            },
        )


def _skip_sub_blocks(data: bytes, position: int) -> int:
    """The position after a GIF's data sub-blocks starting at `position` (len(data) if cut short)."""
    while position < len(data):
        size = data[position]
        position += 1 + size
        if size == 0:
            return position
    return len(data)


def first_gif_frame(data: bytes) -> bytes:
    """The GIF up to the end of its first image, then the trailer: one frame to decode, not all."""
    if len(data) < 13:
        return data
    position = 13
    if data[10] & 0x80:  # global color table
        position += 3 * (2 ** ((data[10] & 0x07) + 1))
    while position < len(data):
        block = data[position]
        if block == 0x21:  # extension: label, then sub-blocks
            position = _skip_sub_blocks(data, position + 2)
        elif block == 0x2C:  # image descriptor, local color table, LZW size, sub-blocks
            if position + 10 > len(data):
                return data
            flags = data[position + 9]
            position += 10
            if flags & 0x80:
                position += 3 * (2 ** ((flags & 0x07) + 1))
            end = _skip_sub_blocks(data, position + 1)
            return data[:end] + _GIF_TRAILER
        else:
            return data
    return data


def decode_image(
    data: bytes, name: str, size: tuple[int, int], channels: int, data_field: str, max_pixels: int
) -> np.ndarray:
    """One image as uint8 [height, width, channels], resized (bilinear) when it differs."""
    import tensorflow as tf

    dimensions = image_dimensions(data)
    if dimensions is None:
        raise _corrupt(name, "its header is not that of a BMP, GIF, JPEG or PNG file", data_field)
    check_image_header(data, name, max_pixels, data_field)
    if data[:3] == b"GIF":
        data = first_gif_frame(data)
    try:
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    except tf.errors.OpError as exc:
        raise _corrupt(name, tf_message(exc), data_field) from exc
    if tuple(image.shape[:2]) != size:
        resized = tf.image.resize(image, size, method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return image.numpy()


def _corrupt(name: str, detail: str, data_field: str) -> InvalidArgument:
    return InvalidArgument(
        f"The image {excerpt(name)!r} cannot be decoded: {detail}. Expected a valid BMP, GIF, JPEG or "
        f"PNG file.",
        reason="CORRUPT_IMAGE",
        field=data_field,
        metadata={"entry": excerpt(name)},
    )
