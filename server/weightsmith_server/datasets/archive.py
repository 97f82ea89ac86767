"""Zip and tar archives read safely in memory, never extracted.

Every entry is listed and checked before any content is read: absolute
paths, `..`, links and devices are refused (UNSAFE_ARCHIVE_ENTRY), and so
are archives with too many entries, members declaring more than the member
limit, and archives declaring more than the expansion limit in all. Content
is then read in pieces and counted as it inflates (a zip's header may lie),
so no member ever takes more memory than its limit.
"""

from __future__ import annotations

import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith_server.datasets.reader import corrupt
from weightsmith_server.errors import InvalidArgument, ResourceExhausted
from weightsmith_server.limits import (
    MAX_ARCHIVE_ENTRIES,
    READ_BYTES,
    archive_too_large,
    check_member_size,
    excerpt,
)

# What reading a damaged zip or (compressed) tar member can raise.
ARCHIVE_ERRORS = (
    OSError,
    EOFError,
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,
    RuntimeError,
)
_TAR_HEADER_BYTES = 512


@dataclass(frozen=True)
class Entry:
    """A regular file in an archive: its name, path components, size and archive handle."""

    name: str
    parts: tuple[str, ...]
    size: int
    handle: Any


class Archive:
    """A zip or tar archive listed safely: every entry checked before any content is read.

    Args:
        path: The archive (zip, or tar optionally gzip, bzip2 or xz compressed).
        data_field: The request field that carried it, for errors.
        max_expanded_bytes: The most its entries may hold in all.
        max_member_bytes: The most one entry may hold.
    """

    def __init__(self, path: Path, data_field: str, max_expanded_bytes: int, max_member_bytes: int) -> None:
        self._field = data_field
        self._limit = max_expanded_bytes
        self._member_limit = max_member_bytes
        # Bytes read out of the archive so far: counted against `max_expanded_bytes` too.
        self._read_bytes = 0
        self._archive: zipfile.ZipFile | tarfile.TarFile | None = None
        # Opens an entry's content: ZipFile.open or TarFile.extractfile.
        self._open: Callable[[Any], Any] = lambda handle: None
        self.files: list[Entry] = []
        self.folders: set[tuple[str, ...]] = set()
        try:
            if zipfile.is_zipfile(path):
                zipped = self._archive = zipfile.ZipFile(path)
                self._open = zipped.open
                self._list_zip(zipped)
            elif tarfile.is_tarfile(path):
                tarred = self._archive = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by `close`)
                self._open = tarred.extractfile
                self._list_tar(tarred)
            else:
                raise InvalidArgument(
                    "The image folder file is neither a zip nor a tar archive; expected a .zip, .tar, "
                    ".tar.gz, .tar.bz2 or .tar.xz of <class>/<image> files.",
                    reason="CORRUPT_DATASET",
                    field=data_field,
                )
        except ARCHIVE_ERRORS as exc:
            self.close()
            raise corrupt("archive", exc, data_field) from exc
        except BaseException:
            self.close()
            raise

    def _add(self, name: str, kind: str, size: int, handle: Any) -> None:
        """Record one entry of `kind` (`file`, `folder`, or what makes it unsafe)."""
        problem = _unsafe_path(name) if kind in ("file", "folder") else kind
        if problem is not None:
            raise InvalidArgument(
                f"The archive entry {excerpt(name)!r} is {problem}; expected only files and folders "
                f"with relative paths inside the archive. Nothing was extracted.",
                reason="UNSAFE_ARCHIVE_ENTRY",
                field=self._field,
                metadata={"entry": excerpt(name)},
            )
        if len(self.files) + len(self.folders) >= MAX_ARCHIVE_ENTRIES:
            raise ResourceExhausted(
                f"The archive has more than {MAX_ARCHIVE_ENTRIES} entries, the server's limit.",
                reason="TOO_MANY_ENTRIES",
                field=self._field,
            )
        parts = _entry_parts(name)
        if not parts:
            return
        if kind == "file":
            check_member_size(name, size, self._member_limit, field=self._field)
            self.files.append(Entry(name, parts, size, handle))
        else:
            self.folders.add(parts)

    def _check_expansion(self, total: int) -> None:
        if total > self._limit:
            raise archive_too_large(total, self._limit, self._field)

    def _list_zip(self, archive: zipfile.ZipFile) -> None:
        total = 0
        for info in archive.infolist():
            mode = stat.S_IFMT(info.external_attr >> 16)
            if stat.S_ISLNK(mode):
                kind = "a symbolic link"
            elif mode not in (0, stat.S_IFREG, stat.S_IFDIR):
                kind = "a device or other special file"
            else:
                kind = "folder" if info.is_dir() else "file"
            self._add(info.filename, kind, info.file_size, info)
            total += info.file_size
            self._check_expansion(total)

    def _list_tar(self, archive: tarfile.TarFile) -> None:
        total = 0
        while (info := archive.next()) is not None:
            if info.issym():
                kind = "a symbolic link"
            elif info.islnk():
                kind = "a hard link"
            elif info.isreg():
                kind = "file"
            elif info.isdir():
                kind = "folder"
            else:
                kind = "a device or other special file"
            self._add(info.name, kind, info.size, info)
            total += info.size + _TAR_HEADER_BYTES
            self._check_expansion(total)

    def read(
        self, entry: Entry, limit: int | None = None, check: Callable[[bytes], None] | None = None
    ) -> bytes:
        """The entry's bytes (CRC-checked for zip), refused past `limit` (the member limit by default).

        `check` sees the first piece read (up to 1 MiB) before the rest is:
        a header can be refused before the body is inflated. Bytes read count
        against the archive's expansion limit, whatever its headers said.
        """
        limit = self._member_limit if limit is None else min(limit, self._member_limit)
        pieces: list[bytes] = []
        held = 0
        try:
            with self._open(entry.handle) as member:
                while piece := member.read(READ_BYTES):
                    if check is not None and not pieces:
                        check(piece)
                    held += len(piece)
                    if held > limit:
                        raise ResourceExhausted(
                            f"The archive member {excerpt(entry.name)!r} holds more than {limit} bytes, "
                            f"the server's limit for it (--max-member-mb, --max-image-pixels).",
                            reason="MEMBER_TOO_LARGE",
                            field=self._field,
                            metadata={"entry": excerpt(entry.name), "limit_bytes": str(limit)},
                        )
                    pieces.append(piece)
        except ARCHIVE_ERRORS as exc:
            raise corrupt(f"archive entry {excerpt(entry.name)!r}", exc, self._field) from exc
        data = b"".join(pieces)
        self._read_bytes += len(data)
        self._check_expansion(self._read_bytes)
        return data

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _entry_parts(name: str) -> tuple[str, ...]:
    """A (safe) entry's path components, without empty and `.` ones."""
    return tuple(p for p in re.split(r"[/\\]", name) if p not in ("", "."))


def _unsafe_path(name: str) -> str | None:
    """Why an entry's path could write outside the folder it is extracted into, if it could."""
    if "\x00" in name:
        return "a path with a NUL character"
    # Backslashes count as separators: some zip tools on Windows write them.
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "a path climbing out with `..`"
    return None
