"""The durable store: plain files a person can read, committed by atomic renames.

Layout under the store root::

    imports/                       weight files users drop in for CreateModel
    tmp/                           uploads, exports, staged models and datasets,
                                   deleted folders; emptied of everything at start-up
    models/<model_id>/
        model.json                 identity: architecture name, source, time
        revisions/<NNNNNN>/        one folder per committed revision
            revision.json          the record (author, time, message, kind, what
                                   changed) and the manifest: full, or a delta
            architecture.json      the Keras model config, when it changed
            tensors.safetensors    the small values this revision wrote, packed
            <iiii>.safetensors     each large value it wrote, data 4096-aligned

A manifest names, for every variable, where its value lives (a file and the
tensor's name in it, `NNNNNN/tensors.safetensors#dense/bias`), which may be
an earlier revision's file: a revision stores only what it changed. Its
`revision.json` holds a *delta* manifest (the parent's number and the changed
entries) or, every `FULL_MANIFEST_EVERY` revisions, after an architecture
change, or once a chain's entries pass the variable count, a *full* one; a
revision's manifest resolves by walking back to the nearest full one.
Tensor files are safetensors, readable by any framework. Layout "1" stores
(a full pretty `manifest.json` per revision, `tensors/<iiii>.npy` files)
still open; new revisions of their models are written as above.

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

import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith_server.durable import fsync_path, read_json, write_compact_json, write_json
from weightsmith_server.manifests import (
    ROW_FIELDS,
    SAFETENSORS_SUFFIX,
    Manifest,
    VariableRecord,
    apply_delta,
    delta_rows,
    full_payload,
    record_of,
)
from weightsmith_server.revisions.record import RevisionRecord
from weightsmith_server.tensor_files import (
    LARGE_TENSOR_BYTES,
    PACKED_FILE,
    PackedTensor,
    TensorFileWriter,
    TensorHeaders,
    TensorWriter,
    read_tensor,
    write_packed,
)
from weightsmith_server.variables import VariableEntry

# "2": revision.json carries the manifest (full or delta), tensors are safetensors files.
_LAYOUT_VERSION = 2
_STAGING_PREFIX = ".staging-"
# The folders of the store the server writes with scratch names (never `imports/`, the user's).
_SCRATCH_TREES = ("models", "datasets", "jobs")

# A full manifest at least every this many revisions, so a manifest resolves in a bounded number of reads.
FULL_MANIFEST_EVERY = 32


@dataclass(frozen=True)
class ModelRecord:
    """What `model.json` holds."""

    model_id: str
    architecture: str
    source: str
    create_time: str


def _is_staged(location: str) -> bool:
    """Whether a manifest entry points into the revision being staged (no `NNNNNN/` folder yet)."""
    return "/" not in location.partition("#")[0]


class StagedRevision:
    """A revision being written; invisible until `commit` renames it into place."""

    def __init__(self, revisions_dir: Path) -> None:
        self._revisions_dir = revisions_dir
        self.dir = revisions_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        # No `parents`: a model deleted meanwhile must not be recreated here.
        self.dir.mkdir()
        self._count = 0
        self._packed: dict[str, PackedTensor] = {}
        self.renamed = False
        self.stored_bytes = 0

    def open_tensor(self, entry: VariableEntry, dtype: np.dtype, shape: tuple[int, ...]) -> TensorWriter:
        """Start a variable's value; the caller writes exactly its bytes, then closes the writer.

        A large value gets its own file, written and fsync'd as it comes; a
        small one is kept in memory and packed with the others at commit.
        """
        record = VariableRecord(
            path=entry.path,
            dtype=dtype.name,
            shape=tuple(shape),
            file="",
            layer=entry.layer,
            layer_index=entry.layer_index,
            trainable=entry.trainable,
        )
        if record.nbytes >= LARGE_TENSOR_BYTES:
            name = f"{self._count:04d}{SAFETENSORS_SUFFIX}"
            self._count += 1
            record = replace(record, file=f"{name}#{entry.path}")
            writer: TensorWriter = TensorFileWriter(self.dir / name, record, dtype)
        else:
            if entry.path in self._packed:
                raise ValueError(f"variable {entry.path!r} staged twice")
            record = replace(record, file=f"{PACKED_FILE}#{entry.path}")
            writer = self._packed[entry.path] = PackedTensor(record, dtype)
        self.stored_bytes += record.nbytes
        return writer

    def add_tensor(self, entry: VariableEntry, array: np.ndarray) -> VariableRecord:
        """Write a whole array (durable at commit) and return its (staged) manifest entry."""
        shape = np.shape(array)  # `ascontiguousarray` makes a 0-d array 1-d
        array = np.ascontiguousarray(array)
        writer = self.open_tensor(entry, array.dtype, shape)
        if array.size:
            writer.write_at(0, memoryview(array.reshape(-1).view(np.uint8)))
        writer.close()
        return writer.record

    def commit(
        self,
        record: RevisionRecord,
        manifest: Manifest,
        architecture_json: str | None,
        parent: Manifest | None = None,
    ) -> Manifest:
        """Make the revision durable and visible under its number.

        `manifest` mixes entries of earlier revisions (their `file` already
        `NNNNNN/...`) and entries staged here, which get this revision's
        folder prefixed; the committed manifest is returned. With `parent`
        (the previous revision's committed manifest) the revision stores a
        delta manifest when it can. Once `renamed` is set the revision
        exists, even if a later step fails.
        """
        folder = f"{record.revision:06d}"
        variables = tuple(
            replace(v, file=f"{folder}/{v.file}") if _is_staged(v.file) else v for v in manifest.variables
        )
        rows = None
        if (
            parent is not None
            and architecture_json is None
            and not record.architecture_changed
            and parent.revision == record.revision - 1
            and parent.layer_count == manifest.layer_count
        ):
            rows = delta_rows(parent, variables)
        if (
            rows is not None
            and parent is not None
            and parent.chain_depth + 1 < FULL_MANIFEST_EVERY
            and parent.chain_entries + len(rows) <= len(variables)
        ):
            payload: dict[str, Any] = {
                "kind": "delta",
                "parent": parent.revision,
                "layer_count": manifest.layer_count,
                "count": len(variables),
                "fields": ["index", *ROW_FIELDS],
                "changed": rows,
            }
            committed = Manifest(
                manifest.layer_count,
                variables,
                revision=record.revision,
                chain_depth=parent.chain_depth + 1,
                chain_entries=parent.chain_entries + len(rows),
            )
        else:
            payload = full_payload(manifest.layer_count, variables)
            committed = Manifest(manifest.layer_count, variables, revision=record.revision)
        if self._packed:
            write_packed(self.dir / PACKED_FILE, list(self._packed.values()))
        if architecture_json is not None:
            with open(self.dir / "architecture.json", "w", encoding="utf-8") as handle:
                handle.write(architecture_json)
                handle.flush()
                os.fsync(handle.fileno())
        write_compact_json(self.dir / "revision.json", record.to_dict() | {"manifest": payload})
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

    Layout-1 tensor folders are not descended into: only the server's own
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
        self._check_layout()
        self._headers = TensorHeaders()
        self._remove_leftovers()

    def _check_layout(self) -> None:
        """Refuse a store a newer server wrote; mark an older one as (from now on) holding this layout."""
        version_file = self.root / "LAYOUT_VERSION"
        found = version_file.read_text().strip() if version_file.exists() else ""
        if found.isdigit() and int(found) > _LAYOUT_VERSION:
            raise RuntimeError(
                f"The store at {self.root} has layout {found}; this server reads layouts up to "
                f"{_LAYOUT_VERSION}. Run a newer server."
            )
        if found != str(_LAYOUT_VERSION):
            version_file.write_text(f"{_LAYOUT_VERSION}\n")

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

    def _stored_manifest(self, model_id: str, revision: int) -> dict[str, Any]:
        """Revision `revision`'s manifest as stored: `{"kind": "full" | "delta", ...}`."""
        folder = self._revision_dir(model_id, revision)
        payload = read_json(folder / "revision.json").get("manifest")
        if payload is None:  # layout 1: a full manifest of its own, one object per variable
            raw = read_json(folder / "manifest.json")
            rows = [[v[name] for name in ROW_FIELDS] for v in raw["variables"]]
            payload = {"kind": "full", "layer_count": raw["layer_count"], "variables": rows}
        return payload

    def _resolve(
        self, model_id: str, revision: int, payload: dict[str, Any], parent: Manifest | None
    ) -> Manifest:
        """A stored manifest made whole: a delta applies to `parent` (resolved here when None)."""
        if payload["kind"] == "full":
            return Manifest(
                layer_count=payload["layer_count"],
                variables=tuple(record_of(row) for row in payload["variables"]),
                revision=revision,
            )
        if parent is None or parent.revision != payload["parent"]:
            parent = self.read_manifest(model_id, payload["parent"])
        return apply_delta(parent, payload, revision)

    def read_manifest(self, model_id: str, revision: int) -> Manifest:
        """Every variable of a revision: deltas applied back to the nearest full manifest."""
        deltas: list[tuple[int, dict[str, Any]]] = []
        number = revision
        payload = self._stored_manifest(model_id, number)
        while payload["kind"] != "full":
            deltas.append((number, payload))
            if payload["parent"] >= number or len(deltas) > 10 * FULL_MANIFEST_EVERY:
                raise ValueError(f"model {model_id!r}: revision {number}'s delta chain does not end")
            number = payload["parent"]
            payload = self._stored_manifest(model_id, number)
        manifest = self._resolve(model_id, number, payload, None)
        for number, payload in reversed(deltas):
            manifest = apply_delta(manifest, payload, number)
        return manifest

    def read_architecture(self, model_id: str, revision: int) -> str:
        """The Keras config JSON in force at `revision`."""
        record = self.read_revision(model_id, revision)
        path = self._revision_dir(model_id, record.architecture_revision) / "architecture.json"
        return path.read_text(encoding="utf-8")

    def load_tensor(self, model_id: str, record: VariableRecord) -> np.ndarray:
        """A read-only, memory-mapped view of a stored value."""
        location = record.file.partition("#")[0]
        return read_tensor(self.model_dir(model_id) / "revisions" / location, record, self._headers)

    # --- writing -------------------------------------------------------------

    def stage_revision(self, model_id: str) -> StagedRevision:
        """Start a new revision of an existing model."""
        return StagedRevision(self.model_dir(model_id) / "revisions")

    def stage_model(self) -> tuple[Path, StagedRevision]:
        """Start a new model in `tmp/`; returns its folder and its revision 1."""
        folder = self.tmp_dir / uuid.uuid4().hex
        (folder / "revisions").mkdir(parents=True)
        return folder, StagedRevision(folder / "revisions")

    def commit_model(self, folder: Path, record: ModelRecord, files: Mapping[str, Any] | None = None) -> None:
        """Move a staged model (revision 1 committed inside, and `files`: name -> JSON) to its final place."""
        for name, payload in (files or {}).items():
            write_compact_json(folder / name, payload)
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

        Three steps, each leaving every kept revision restorable if a crash
        ends the work there: (1) the oldest kept revision's manifest is
        rewritten as a full one when it is a delta (atomically), so no kept
        manifest refers to a dropped one; (2) each dropped revision loses
        its `revision.json`, newest first (it stops existing at that
        instant, and one that survives a crash still has its parents); (3)
        every file no kept revision refers to goes, with folders left empty.
        Step 3 also sweeps folders older than the kept ones that a crash left.
        """
        numbers = self.revision_numbers(model_id)
        if keep <= 0 or len(numbers) <= keep:
            return []
        dropped, kept = numbers[:-keep], numbers[-keep:]
        manifests = self._kept_manifests(model_id, kept)
        self._make_full(model_id, manifests[0])
        self._unlink_records(model_id, dropped)
        self._remove_unreferenced(model_id, kept, manifests)
        return dropped

    def _kept_manifests(self, model_id: str, kept: list[int]) -> list[Manifest]:
        """The kept revisions' manifests, each delta applied to the one before (one read per revision)."""
        manifests: list[Manifest] = []
        for number in kept:
            payload = self._stored_manifest(model_id, number)
            if not manifests:
                manifests.append(self._resolve(model_id, number, payload, None))
            else:
                manifests.append(self._resolve(model_id, number, payload, manifests[-1]))
        return manifests

    def _make_full(self, model_id: str, manifest: Manifest) -> None:
        """Retention step 1: store `manifest` as its revision's full manifest (temp, fsync, rename, fsync)."""
        folder = self._revision_dir(model_id, manifest.revision)
        raw = read_json(folder / "revision.json")
        if raw.get("manifest", {"kind": "full"})["kind"] == "full":
            return
        temporary = folder / ".revision.json"
        write_compact_json(
            temporary, raw | {"manifest": full_payload(manifest.layer_count, manifest.variables)}
        )
        os.rename(temporary, folder / "revision.json")
        fsync_path(folder)

    def _unlink_records(self, model_id: str, dropped: list[int]) -> None:
        """Retention step 2: the dropped revisions stop existing, newest first.

        Each unlink is made durable (its folder fsync'd) before the next, so
        a crash never keeps a revision whose newer sibling's record is gone
        yet whose own parent is.
        """
        revisions = self.model_dir(model_id) / "revisions"
        for number in reversed(dropped):
            folder = revisions / f"{number:06d}"
            (folder / "revision.json").unlink(missing_ok=True)
            if folder.is_dir():
                fsync_path(folder)
        fsync_path(revisions)

    def _remove_unreferenced(self, model_id: str, kept: list[int], manifests: list[Manifest]) -> None:
        """Retention step 3: remove the files of revisions before `kept` that no kept revision uses."""
        revisions = self.model_dir(model_id) / "revisions"
        referenced = {v.file.partition("#")[0] for m in manifests for v in m.variables}
        architectures = {self.read_revision(model_id, n).architecture_revision for n in kept}
        for folder in revisions.iterdir():
            if not folder.name.isdigit() or int(folder.name) >= kept[0]:
                continue
            if (folder / "revision.json").exists():
                continue  # not dropped: a retain that crashed in step 2 left it, the next one drops it
            (folder / "manifest.json").unlink(missing_ok=True)
            if int(folder.name) not in architectures:
                (folder / "architecture.json").unlink(missing_ok=True)
            for file in [*folder.glob(f"*{SAFETENSORS_SUFFIX}"), *folder.glob("tensors/*.npy")]:
                if str(file.relative_to(revisions)) not in referenced:
                    file.unlink()
            remaining = [p for p in folder.rglob("*") if not p.is_dir()]
            if not remaining:
                shutil.rmtree(folder, ignore_errors=True)

    def resolve_import(self, relative: str) -> Path | None:
        """A file under `imports/`, or None when there is none or the path would escape that folder."""
        try:
            candidate = (self.imports_dir / relative).resolve()
            found = candidate.is_relative_to(self.imports_dir) and candidate.is_file()
        except (OSError, ValueError):  # a NUL byte, a name too long for the file system
            return None
        return candidate if found else None
