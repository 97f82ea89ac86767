"""Bounds on what one input may make the server spend, and the checks that apply them.

`InputLimits` carries the configured bounds (built once from the flags in
`app`); the helpers here refuse an input before anything large is
allocated: config JSON by size and nesting depth, zip members by their
declared and their actual sizes, image sizes by pixel count, seeds by range.
Echoes of inputs in messages go through `excerpt`, so no error grows with
its input.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from weightsmith_server.errors import InvalidArgument, ResourceExhausted

MIB = 1024 * 1024
# Deepest nesting of lists and objects a model config may have. Real Keras
# configs stay under 30 even with nested models; Keras and `json` recurse.
MAX_CONFIG_DEPTH = 100
# How much of an input an error message may quote.
EXCERPT_CHARS = 200
# Entries an archive (image folder, `.keras`) may list: each costs memory while listed.
MAX_ARCHIVE_ENTRIES = 200_000
# Bytes read at a time while inflating a member.
READ_BYTES = MIB


@dataclass(frozen=True)
class InputLimits:
    """The configured bounds on inputs (see `Config`, whose flags set them)."""

    max_decompressed_bytes: int = 8192 * MIB
    max_member_bytes: int = 4096 * MIB
    max_config_bytes: int = 16 * MIB
    max_image_pixels: int = 4_194_304
    max_string_bytes: int = 4096

    def image_file_bytes(self) -> int:
        """The largest image file worth reading: raw RGBA at the pixel limit, twice, plus headroom."""
        return min(self.max_member_bytes, 8 * self.max_image_pixels + MIB)


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """`value` as text, cut to `limit` characters with a marker: what an error may quote of an input."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}…(truncated, {len(text)} characters)"


# --- config JSON -------------------------------------------------------------


def json_depth(value: Any) -> int:
    """The nesting depth of parsed JSON (a scalar is 0), computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in node)
    return deepest


def check_depth(value: Any, *, field: str, what: str = "model config") -> None:
    """INVALID_ARGUMENT (CONFIG_TOO_DEEP) when `value` nests deeper than MAX_CONFIG_DEPTH."""
    depth = json_depth(value)
    if depth > MAX_CONFIG_DEPTH:
        raise _too_deep(what, field, depth)


def _too_deep(what: str, field: str, depth: int | None) -> InvalidArgument:
    found = f"{depth} levels" if depth is not None else "too many levels"
    return InvalidArgument(
        f"The {what} nests {found} of lists and objects; the server accepts at most {MAX_CONFIG_DEPTH}.",
        reason="CONFIG_TOO_DEEP",
        field=field,
        metadata={"limit": str(MAX_CONFIG_DEPTH)},
    )


def check_config_size(size: int, limit: int, *, field: str, what: str = "model config") -> None:
    """RESOURCE_EXHAUSTED (CONFIG_TOO_LARGE) when a config of `size` bytes is over `limit`."""
    if size > limit:
        raise ResourceExhausted(
            f"The {what} takes {size} bytes or more; the server accepts at most {limit} (--max-config-mb).",
            reason="CONFIG_TOO_LARGE",
            field=field,
            metadata={"size_bytes": str(size), "limit_bytes": str(limit)},
        )


def parse_config_json(
    text: str | bytes, limits: InputLimits, *, field: str, reason: str, what: str = "model config"
) -> Any:
    """Parse a config within the size and depth limits; `reason` names malformed JSON."""
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    check_config_size(size, limits.max_config_bytes, field=field, what=what)
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise _too_deep(what, field, None) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"The {what} is not valid JSON: {excerpt(exc)}.", reason=reason, field=field
        ) from exc
    check_depth(value, field=field, what=what)
    return value


# --- zip members -------------------------------------------------------------


def _member_too_large(name: str, size: int, limit: int, field: str, flag: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"The archive member {excerpt(name)!r} expands to more than {limit} bytes, the server's "
        f"limit ({flag}).",
        reason="MEMBER_TOO_LARGE",
        field=field,
        metadata={"entry": excerpt(name), "size_bytes": str(size), "limit_bytes": str(limit)},
    )


def archive_too_large(total: int, limit: int, field: str) -> ResourceExhausted:
    """RESOURCE_EXHAUSTED (ARCHIVE_TOO_LARGE): an archive's members expand to more than `limit`."""
    return ResourceExhausted(
        f"The archive expands to more than {limit} bytes, the server's limit (--max-decompressed-mb; "
        f"for a dataset also four times --max-upload-mb); split it into smaller ones.",
        reason="ARCHIVE_TOO_LARGE",
        field=field,
        metadata={"size_bytes": str(total), "limit_bytes": str(limit)},
    )


def check_member_size(name: str, size: int, limit: int, *, field: str, flag: str = "--max-member-mb") -> None:
    """RESOURCE_EXHAUSTED (MEMBER_TOO_LARGE) when one member of `size` bytes is over `limit`."""
    if size > limit:
        raise _member_too_large(name, size, limit, field, flag)


def check_zip_listing(archive: zipfile.ZipFile, limits: InputLimits, *, field: str, reason: str) -> None:
    """Every member's declared size, their count and their total, from the headers alone.

    `reason` names a member whose headers contradict each other.
    """
    infos = archive.infolist()
    if len(infos) > MAX_ARCHIVE_ENTRIES:
        raise ResourceExhausted(
            f"The archive has more than {MAX_ARCHIVE_ENTRIES} entries, the server's limit.",
            reason="TOO_MANY_ENTRIES",
            field=field,
        )
    total = 0
    for info in infos:
        check_member_size(info.filename, info.file_size, limits.max_member_bytes, field=field)
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise InvalidArgument(
                f"The archive member {excerpt(info.filename)!r} is stored uncompressed but declares "
                f"{info.file_size} bytes for {info.compress_size} stored; the archive is corrupt.",
                reason=reason,
                field=field,
            )
        total += info.file_size
        if total > limits.max_decompressed_bytes:
            raise archive_too_large(total, limits.max_decompressed_bytes, field)


def iter_member(
    stream: IO[bytes], name: str, limit: int, *, field: str, flag: str = "--max-member-mb"
) -> Iterator[bytes]:
    """A member's bytes in pieces, counted as they inflate: never more than `limit` in all."""
    seen = 0
    while piece := stream.read(READ_BYTES):
        seen += len(piece)
        if seen > limit:
            raise _member_too_large(name, seen, limit, field, flag)
        yield piece


def read_member(
    stream: IO[bytes], name: str, limit: int, *, field: str, flag: str = "--max-member-mb"
) -> bytes:
    """A member's bytes, read in pieces and refused as soon as they pass `limit`."""
    return b"".join(iter_member(stream, name, limit, field=field, flag=flag))


# --- seeds -------------------------------------------------------------------

# `numpy.random.seed` (which `keras.utils.set_random_seed` calls) takes 0 to 2**32 - 1.
MAX_GLOBAL_SEED = 2**32 - 1
MAX_SEED = 2**63 - 1


def check_seed(seed: int | None, *, field: str, maximum: int = MAX_SEED) -> None:
    """INVALID_ARGUMENT (INVALID_SEED) unless `seed` is unset or 0 to `maximum`."""
    if seed is not None and not 0 <= seed <= maximum:
        raise InvalidArgument(
            f"Received {field}={seed}, expected a seed from 0 to {maximum} (or none for a random one).",
            reason="INVALID_SEED",
            field=field,
            metadata={"maximum": str(maximum)},
        )
