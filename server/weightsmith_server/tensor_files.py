"""Tensor files: safetensors written by the store itself, read back as memory maps.

A large value gets a file of its own whose header is padded to 4096 bytes,
so its data is block-aligned for `O_DIRECT` writes and zero-copy reads; the
small values of one revision are packed into one file. Layout-1 `.npy`
files are still read.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from weightsmith_server.dtypes import numpy_dtype
from weightsmith_server.durable import write_fully
from weightsmith_server.manifests import VariableRecord

# Values of at least this many bytes get their own block-aligned file (O_DIRECT writes, zero-copy
# mmap reads; 4 KiB of header is under 2% of them); smaller ones are packed into one file per revision.
LARGE_TENSOR_BYTES = 256 * 1024
PACKED_FILE = "tensors.safetensors"

# numpy dtype names as safetensors spells them.
_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
}


def _safetensors_dtype(dtype: np.dtype) -> str:
    """The safetensors dtype code; other dtypes are stored as their bytes (`U8`), the manifest says what."""
    return _SAFETENSORS_DTYPES.get(dtype.name, "U8")


HEADER_BYTES = 4096
# Where packed data starts: a multiple of this, so every packed value is aligned to its itemsize.
PACKED_ALIGNMENT = 64


def safetensors_header(tensors: dict[str, dict[str, Any]], alignment: int) -> bytes:
    """The 8-byte little-endian length and the JSON header, space-padded so the data starts aligned."""
    text = json.dumps(tensors, separators=(",", ":")).encode()
    total = 8 + len(text)
    padded = len(text) + (-total) % alignment
    return padded.to_bytes(8, "little") + text + b" " * (padded - len(text))


def tensor_entry(dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int) -> dict[str, Any]:
    """One tensor's safetensors header entry; a dtype safetensors lacks is stored as its bytes (`U8`)."""
    code = _safetensors_dtype(dtype)
    stored_shape = list(shape) if code != "U8" or dtype.itemsize == 1 else [end - begin]
    return {"dtype": code, "shape": stored_shape, "data_offsets": [begin, end]}


class TensorWriter(Protocol):
    """What `StagedRevision.open_tensor` returns: the caller writes exactly the tensor's bytes."""

    record: VariableRecord

    def write_at(self, offset: int, data: memoryview) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...


class TensorFileWriter:
    """Writes one large tensor's safetensors file by byte ranges, then makes it durable.

    The header is padded to 4096 bytes so the data is block-aligned. Ranges
    that are 4096-byte aligned in memory, offset and length go through an
    `O_DIRECT` descriptor when the file system allows it: they skip the page
    cache, which on these machines is slower than the disk. Other ranges (the
    tail, unaligned arrays) go through an ordinary descriptor.
    """

    def __init__(self, path: Path, record: VariableRecord, dtype: np.dtype) -> None:
        self.record = record
        self._path = path
        self._buffered: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct: int | None = None
        self._direct_tried = False
        header = safetensors_header(
            {record.path: tensor_entry(dtype, record.shape, 0, record.nbytes)}, HEADER_BYTES
        )
        self._data_start = len(header)
        try:
            write_fully(self._buffered, memoryview(header), 0)
        except BaseException:
            self.discard()
            raise

    def _direct_fd(self) -> int | None:
        """The `O_DIRECT` descriptor, opened on first use; None where unsupported."""
        if not self._direct_tried:
            self._direct_tried = True
            flag = getattr(os, "O_DIRECT", 0)
            if flag:
                try:
                    self._direct = os.open(self._path, os.O_WRONLY | flag)
                except OSError:
                    self._direct = None
        return self._direct

    def write_at(self, offset: int, data: memoryview) -> None:
        """Write `data` at byte `offset` of the tensor (not of the file)."""
        view = memoryview(data).cast("B")
        position = self._data_start + offset
        aligned = (
            offset % 4096 == 0
            and len(view) % 4096 == 0
            and np.frombuffer(view, np.uint8).ctypes.data % 4096 == 0
        )
        direct = self._direct_fd() if aligned else None
        if direct is not None:
            try:
                write_fully(direct, view, position)
                return
            except OSError:  # e.g. a file system that accepts O_DIRECT but not these writes
                os.close(direct)
                self._direct = None
        assert self._buffered is not None
        write_fully(self._buffered, view, position)

    def close(self) -> None:
        """fsync and close: the bytes are durable once this returns."""
        try:
            assert self._buffered is not None
            os.fsync(self._buffered)
        finally:
            self.discard()

    def discard(self) -> None:
        """Close the descriptors (idempotent)."""
        direct, buffered = self._direct, self._buffered
        self._direct = self._buffered = None
        for fd in (direct, buffered):
            if fd is not None:
                os.close(fd)


class PackedTensor:
    """A small tensor held in memory until the commit packs it into the revision's one small-tensor file."""

    def __init__(self, record: VariableRecord, dtype: np.dtype) -> None:
        self.record = record
        self.dtype = dtype
        self.data = bytearray(record.nbytes)

    def write_at(self, offset: int, data: memoryview) -> None:
        view = memoryview(data).cast("B")
        self.data[offset : offset + len(view)] = view

    def close(self) -> None:
        """Nothing to do: the commit writes and fsyncs the packed file."""

    def discard(self) -> None:
        """Nothing to do: the bytes are garbage once the staged revision is."""


class TensorHeaders:
    """Parsed safetensors headers by file, so reading many values of one file parses it once.

    Committed files never change, but a deleted model's id (and so its
    paths) can be reused: an entry is valid only for the same inode, size
    and modification time.
    """

    _LIMIT = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[tuple[int, int, int], int, dict[str, Any]]] = {}

    def get(self, path: Path) -> tuple[int, dict[str, Any]]:
        """The offset where the data starts and the header's tensor entries."""
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            key = str(path)
            with self._lock:
                cached = self._entries.get(key)
            if cached is not None and cached[0] == identity:
                return cached[1], cached[2]
            length = int.from_bytes(handle.read(8), "little")
            if length > stat.st_size - 8:
                raise ValueError(f"{path}: not a safetensors file (header length {length})")
            header = json.loads(handle.read(length))
        with self._lock:
            if len(self._entries) >= self._LIMIT:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (identity, 8 + length, header)
        return 8 + length, header


def write_packed(path: Path, tensors: list[PackedTensor]) -> None:
    """Write small tensors into one safetensors file and fsync it (widest items first: each stays aligned)."""
    ordered = sorted(tensors, key=lambda t: -t.dtype.itemsize)
    header: dict[str, dict[str, Any]] = {}
    position = 0
    for tensor in ordered:
        size = len(tensor.data)
        header[tensor.record.path] = tensor_entry(
            tensor.dtype, tensor.record.shape, position, position + size
        )
        position += size
    with open(path, "wb") as handle:
        handle.write(safetensors_header(header, PACKED_ALIGNMENT))
        for tensor in ordered:
            handle.write(tensor.data)
        handle.flush()
        os.fsync(handle.fileno())


def read_tensor(path: Path, record: VariableRecord, headers: TensorHeaders) -> np.ndarray:
    """A read-only, memory-mapped view of the value `record` locates in `path`."""
    _, _, key = record.file.partition("#")
    wanted = numpy_dtype(record.dtype)
    if not key:  # layout 1: a `.npy` file of its own
        array = np.load(path, mmap_mode="r") if record.nbytes else np.load(path)
        return array if array.dtype == wanted else array.view(wanted)
    start, header = headers.get(path)
    begin, end = header[key]["data_offsets"]
    if end - begin != record.nbytes:
        raise ValueError(f"{path.name}: tensor {key!r} holds {end - begin} bytes, expected {record.nbytes}")
    if not record.nbytes:
        empty = np.empty(record.shape, wanted)
        empty.flags.writeable = False
        return empty
    mapped = np.memmap(
        path, dtype=wanted, mode="r", offset=start + begin, shape=(record.nbytes // wanted.itemsize,)
    )
    return mapped.reshape(record.shape)
