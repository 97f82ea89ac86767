"""The durable store: plain files a person can read, committed by atomic renames.

Layout under the store root::

    imports/                       weight files users drop in for CreateModel
    tmp/                           uploads, exports, staged models and datasets,
                                   deleted folders; emptied of everything at start-up
    models/<model_id>/
        model.json                 identity: architecture name, source, time
        revisions/<NNNNNN>/        one folder per committed revision
            revision.json          author, time, message, kind, what changed
            manifest.json          every variable: path, dtype, shape, file
            architecture.json      the Keras model config, when it changed
            tensors/<iiii>.npy     the values this revision wrote

A manifest names, for every variable, the `.npy` file holding its value, which
may belong to an earlier revision: a revision stores only what it changed,
yet any revision restores exactly from its own manifest alone.

Commit protocol: everything is written and fsync'd in a staging folder, which
is then renamed to its final name and the parent folder fsync'd. A crash at
any point leaves either the old state or the new one, never a mix; staging
leftovers are removed at start-up. The latest revision is the highest
committed folder, so there is no separate pointer to keep in step.

Crash hygiene: at start-up `tmp/` is emptied of everything in it (files,
links and folders), and scratch entries under `models/`, `datasets/` and
`jobs/` are removed: `.staging-*` folders (revisions, jobs, checkpoints)
and `.<name>.json` files (a JSON file being replaced). A model folder
without `model.json` was never committed and goes too.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith_server.dtypes import numpy_dtype
from weightsmith_server.revisions.record import RevisionRecord
from weightsmith_server.variables import VariableEntry

_LAYOUT_VERSION = "1"
_STAGING_PREFIX = ".staging-"
# The folders of the store the server writes with scratch names (never `imports/`, the user's).
_SCRATCH_TREES = ("models", "datasets", "jobs")


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype written into `.npy` files: numpy-native types only."""
    return dtype if dtype.kind in "fiub" and dtype.name != "bfloat16" else np.dtype(f"<u{dtype.itemsize}")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder, so that its content or entries are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON and fsync it; callers fsync the folder once all files are in."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@dataclass(frozen=True)
class VariableRecord:
    """A manifest entry: one variable's identity and the file holding its value."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    layer: str
    layer_index: int
    trainable: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(self.dtype).itemsize

    @property
    def entry(self) -> VariableEntry:
        return VariableEntry(self.path, self.layer, self.layer_index, self.trainable)


@dataclass(frozen=True)
class Manifest:
    """Every variable of one revision, in model order, and the layer count."""

    layer_count: int
    variables: tuple[VariableRecord, ...]

    def by_path(self) -> dict[str, VariableRecord]:
        return {v.path: v for v in self.variables}


@dataclass(frozen=True)
class ModelRecord:
    """What `model.json` holds."""

    model_id: str
    architecture: str
    source: str
    create_time: str


HEADER_BYTES = 4096


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A `.npy` v1.0 header padded to 4096 bytes, so the data is block-aligned."""
    fields = {
        "descr": np.lib.format.dtype_to_descr(_storage_dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    text = repr(fields).encode("latin1")
    padding = HEADER_BYTES - len(np.lib.format.MAGIC_PREFIX) - 2 - 2 - len(text) - 1
    return (
        np.lib.format.MAGIC_PREFIX
        + bytes([1, 0])
        + (len(text) + padding + 1).to_bytes(2, "little")
        + text
        + b" " * padding
        + b"\n"
    )


class TensorFileWriter:
    """Writes one tensor's `.npy` file by byte ranges, then makes it durable.

    Ranges that are 4096-byte aligned in memory, offset and length go through
    an `O_DIRECT` descriptor when the file system allows it: they skip the
    page cache, which on these machines is slower than the disk. Other
    ranges (the tail, unaligned arrays) go through an ordinary descriptor.
    """

    def __init__(self, path: Path, record: VariableRecord, dtype: np.dtype) -> None:
        self.record = record
        self._path = path
        self._buffered: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct: int | None = None
        self._direct_tried = False
        try:
            _write_fully(self._buffered, memoryview(_npy_header(dtype, record.shape)), 0)
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
        position = HEADER_BYTES + offset
        aligned = (
            offset % 4096 == 0
            and len(view) % 4096 == 0
            and np.frombuffer(view, np.uint8).ctypes.data % 4096 == 0
        )
        direct = self._direct_fd() if aligned else None
        if direct is not None:
            try:
                _write_fully(direct, view, position)
                return
            except OSError:  # e.g. a file system that accepts O_DIRECT but not these writes
                os.close(direct)
                self._direct = None
        assert self._buffered is not None
        _write_fully(self._buffered, view, position)

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


def _write_fully(fd: int, view: memoryview, position: int) -> None:
    while len(view):
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


class StagedRevision:
    """A revision being written; invisible until `commit` renames it into place."""

    def __init__(self, revisions_dir: Path) -> None:
        self._revisions_dir = revisions_dir
        self.dir = revisions_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        # No `parents`: a model deleted meanwhile must not be recreated here.
        self.dir.mkdir()
        (self.dir / "tensors").mkdir()
        self._count = 0
        self.renamed = False
        self.stored_bytes = 0

    def _next_file(self) -> str:
        name = f"tensors/{self._count:04d}.npy"
        self._count += 1
        return name

    def open_tensor(self, entry: VariableEntry, dtype: np.dtype, shape: tuple[int, ...]) -> TensorFileWriter:
        """Start a `.npy` file for a variable; the caller writes exactly its bytes."""
        relative = self._next_file()
        record = VariableRecord(
            path=entry.path,
            dtype=dtype.name,
            shape=tuple(shape),
            file=relative,
            layer=entry.layer,
            layer_index=entry.layer_index,
            trainable=entry.trainable,
        )
        self.stored_bytes += record.nbytes
        return TensorFileWriter(self.dir / relative, record, dtype)

    def add_tensor(self, entry: VariableEntry, array: np.ndarray) -> VariableRecord:
        """Write a whole array durably and return its (staged) manifest entry."""
        array = np.ascontiguousarray(array)
        writer = self.open_tensor(entry, array.dtype, array.shape)
        if array.size:
            writer.write_at(0, memoryview(array.reshape(-1).view(np.uint8)))
        writer.close()
        return writer.record

    def commit(
        self,
        record: RevisionRecord,
        manifest: Manifest,
        architecture_json: str | None,
    ) -> Manifest:
        """Make the revision durable and visible under its number.

        `manifest` mixes entries of earlier revisions (their `file` already
        `NNNNNN/...`) and entries staged here (`tensors/...`), which get this
        revision's folder prefixed; the committed manifest is returned. Once
        `renamed` is set the revision exists, even if a later step fails.
        """
        folder = f"{record.revision:06d}"
        committed = Manifest(
            layer_count=manifest.layer_count,
            variables=tuple(
                replace(v, file=f"{folder}/{v.file}") if v.file.startswith("tensors/") else v
                for v in manifest.variables
            ),
        )
        write_json(
            self.dir / "manifest.json",
            {"layer_count": committed.layer_count, "variables": [asdict(v) for v in committed.variables]},
        )
        if architecture_json is not None:
            with open(self.dir / "architecture.json", "w", encoding="utf-8") as handle:
                handle.write(architecture_json)
                handle.flush()
                os.fsync(handle.fileno())
        write_json(self.dir / "revision.json", record.to_dict())
        fsync_path(self.dir / "tensors")
        fsync_path(self.dir)
        os.rename(self.dir, self._revisions_dir / folder)
        self.renamed = True
        fsync_path(self._revisions_dir)
        return committed

    def discard(self) -> None:
        """Remove the staging folder; a no-op once the revision is committed."""
        if not self.renamed:
            shutil.rmtree(self.dir, ignore_errors=True)


def is_scratch(name: str) -> bool:
    """Whether a file or folder name is one the server only uses while writing something else."""
    return name.startswith(_STAGING_PREFIX) or (name.startswith(".") and name.endswith(".json"))


def remove_entry(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder with its contents."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_scratch(folder: Path) -> None:
    """Remove every scratch entry (`is_scratch`) under `folder`.

    Committed tensor folders are not descended into: only the server's own
    staging names appear above them.
    """
    pending = [folder]
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                path = Path(entry.path)
                if is_scratch(entry.name):
                    remove_entry(path)
                elif entry.is_dir(follow_symlinks=False) and entry.name != "tensors":
                    pending.append(path)


class Store:
    """The files of every model, revision and tensor under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.models_dir = self.root / "models"
        self.imports_dir = self.root / "imports"
        self.tmp_dir = self.root / "tmp"
        for folder in (self.models_dir, self.imports_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        version_file = self.root / "LAYOUT_VERSION"
        if not version_file.exists():
            version_file.write_text(_LAYOUT_VERSION + "\n")
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Drop what a crash left half-written: it was never acknowledged."""
        for entry in self.tmp_dir.iterdir():
            remove_entry(entry)
        for model_dir in self.models_dir.iterdir():
            if not (model_dir / "model.json").is_file():
                # Never committed (or recreated by a write racing a delete).
                remove_entry(model_dir)
        for tree in _SCRATCH_TREES:
            if (self.root / tree).is_dir():
                remove_scratch(self.root / tree)

    # --- reading -------------------------------------------------------------

    def model_dir(self, model_id: str) -> Path:
        return self.models_dir / model_id

    def model_ids(self) -> list[str]:
        """Ids of all committed models, sorted."""
        return sorted(p.name for p in self.models_dir.iterdir() if (p / "model.json").is_file())

    def read_model(self, model_id: str) -> ModelRecord:
        return ModelRecord(**read_json(self.model_dir(model_id) / "model.json"))

    def revision_numbers(self, model_id: str) -> list[int]:
        """Committed revision numbers of a model, ascending."""
        revisions = self.model_dir(model_id) / "revisions"
        return sorted(
            int(p.name) for p in revisions.iterdir() if p.name.isdigit() and (p / "revision.json").is_file()
        )

    def _revision_dir(self, model_id: str, revision: int) -> Path:
        return self.model_dir(model_id) / "revisions" / f"{revision:06d}"

    def has_revision(self, model_id: str, revision: int) -> bool:
        return (self._revision_dir(model_id, revision) / "revision.json").is_file()

    def read_revision(self, model_id: str, revision: int) -> RevisionRecord:
        return RevisionRecord.from_dict(read_json(self._revision_dir(model_id, revision) / "revision.json"))

    def read_manifest(self, model_id: str, revision: int) -> Manifest:
        raw = read_json(self._revision_dir(model_id, revision) / "manifest.json")
        return Manifest(
            layer_count=raw["layer_count"],
            variables=tuple(VariableRecord(**v | {"shape": tuple(v["shape"])}) for v in raw["variables"]),
        )

    def read_architecture(self, model_id: str, revision: int) -> str:
        """The Keras config JSON in force at `revision`."""
        record = self.read_revision(model_id, revision)
        path = self._revision_dir(model_id, record.architecture_revision) / "architecture.json"
        return path.read_text(encoding="utf-8")

    def load_tensor(self, model_id: str, record: VariableRecord) -> np.ndarray:
        """A read-only, memory-mapped view of a stored value."""
        path = self.model_dir(model_id) / "revisions" / record.file
        array = np.load(path, mmap_mode="r") if record.nbytes else np.load(path)
        wanted = numpy_dtype(record.dtype)
        return array if array.dtype == wanted else array.view(wanted)

    # --- writing -------------------------------------------------------------

    def stage_revision(self, model_id: str) -> StagedRevision:
        """Start a new revision of an existing model."""
        return StagedRevision(self.model_dir(model_id) / "revisions")

    def stage_model(self) -> tuple[Path, StagedRevision]:
        """Start a new model in `tmp/`; returns its folder and its revision 1."""
        folder = self.tmp_dir / uuid.uuid4().hex
        (folder / "revisions").mkdir(parents=True)
        return folder, StagedRevision(folder / "revisions")

    def commit_model(self, folder: Path, record: ModelRecord) -> None:
        """Move a staged model (revision 1 committed inside) to its final place."""
        write_json(folder / "model.json", asdict(record))
        fsync_path(folder)
        os.rename(folder, self.model_dir(record.model_id))
        fsync_path(self.models_dir)

    def delete_model(self, model_id: str) -> None:
        """Remove a model durably: one rename out of `models/`, then the files."""
        trash = self.tmp_dir / f"deleted-{model_id}-{uuid.uuid4().hex}"
        os.rename(self.model_dir(model_id), trash)
        fsync_path(self.models_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def retain(self, model_id: str, keep: int) -> list[int]:
        """Drop all but the last `keep` revisions; returns the numbers dropped.

        A dropped revision loses its `revision.json` first (it stops existing
        at that instant), then its manifest and every file no retained
        revision refers to; files that retained manifests still point at stay
        where they are.
        """
        numbers = self.revision_numbers(model_id)
        if keep <= 0 or len(numbers) <= keep:
            return []
        dropped, kept = numbers[:-keep], numbers[-keep:]
        revisions = self.model_dir(model_id) / "revisions"
        referenced = {v.file for n in kept for v in self.read_manifest(model_id, n).variables}
        architectures = {self.read_revision(model_id, n).architecture_revision for n in kept}
        for number in dropped:
            folder = revisions / f"{number:06d}"
            (folder / "revision.json").unlink()
        fsync_path(revisions)
        for number in dropped:
            folder = revisions / f"{number:06d}"
            (folder / "manifest.json").unlink(missing_ok=True)
            if number not in architectures:
                (folder / "architecture.json").unlink(missing_ok=True)
            for tensor in (folder / "tensors").glob("*.npy"):
                if f"{folder.name}/tensors/{tensor.name}" not in referenced:
                    tensor.unlink()
            if not any((folder / "tensors").iterdir()) and not (folder / "architecture.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
        return dropped

    def resolve_import(self, relative: str) -> Path | None:
        """A file under `imports/`, or None when there is none or the path would escape that folder."""
        try:
            candidate = (self.imports_dir / relative).resolve()
            found = candidate.is_relative_to(self.imports_dir) and candidate.is_file()
        except (OSError, ValueError):  # a NUL byte, a name too long for the file system
            return None
        return candidate if found else None
