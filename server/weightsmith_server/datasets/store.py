"""DatasetStore: the datasets under a store root, their creation, deletion and loading for jobs.

Limits: an upload is at most `max_upload_bytes`; archives (NPZ included) may
expand to at most four times that and at most `limits.max_decompressed_bytes`,
and an image folder's decoded arrays too; members and images have their own
bounds (`InputLimits`).

Layout under the store root::

    datasets/<dataset_id>/
        dataset.json        the DatasetInfo and the DatasetSource it was read with
        data.npz            NPZ and image folder datasets
        data.tfrecord       TFRecord datasets
    imports/                files CreateDataset may read (relative paths resolve here)
    tmp/dataset-*           uploads and staging folders; removed at start-up

Commit protocol (as in `store`): the data file and `dataset.json` are written
and fsync'd in a staging folder under `tmp/`, which is renamed to
`datasets/<dataset_id>` and the parent fsync'd, so a crash leaves the
dataset either whole or absent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from weightsmith_server.clock import utc_now
from weightsmith_server.datasets.formats import get_format
from weightsmith_server.datasets.image_folder import check_image_size
from weightsmith_server.datasets.reader import Received
from weightsmith_server.datasets.records import DatasetInfo, DatasetSource, DatasetSplit, StoredDataset
from weightsmith_server.durable import fsync_path, read_json, write_json
from weightsmith_server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from weightsmith_server.limits import InputLimits
from weightsmith_server.naming import validate_id
from weightsmith_server.paging import page_after
from weightsmith_server.resources import ResourceTable, check_upload_size, receive_file

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

# Archives (and NPZ files, which are zip archives) may expand this many times.
EXPANSION_FACTOR = 4

_TMP_PREFIX = "dataset-"


class DatasetStore:
    """The datasets under a store root, their validation on arrival and their loading for jobs.

    Args:
        root: The store root; datasets live in `root/datasets/<dataset_id>/`.
        executor: Runs the blocking work (disk, TensorFlow) off the event loop.
        allowed_roots: Folders CreateDataset may read from, besides `root/imports`.
        max_upload_bytes: The largest UploadDataset file.
        limits: The bounds on what a file may expand to (members, images, totals).
    """

    def __init__(
        self,
        root: Path,
        executor: concurrent.futures.Executor,
        *,
        allowed_roots: Sequence[Path],
        max_upload_bytes: int,
        limits: InputLimits | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.datasets_dir = self.root / "datasets"
        self.imports_dir = self.root / "imports"
        self.tmp_dir = self.root / "tmp"
        for folder in (self.datasets_dir, self.imports_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.executor = executor
        self.allowed_roots = [Path(p).resolve() for p in allowed_roots]
        self.max_upload_bytes = max_upload_bytes
        self.limits = limits or InputLimits()
        self.max_expanded_bytes = min(EXPANSION_FACTOR * max_upload_bytes, self.limits.max_decompressed_bytes)
        self._table: ResourceTable[StoredDataset] = ResourceTable(
            "dataset", "ListDatasets", lambda dataset_id: (self.datasets_dir / dataset_id).exists()
        )

    # --- start-up ------------------------------------------------------------

    def restore(self) -> None:
        """Load the description of every committed dataset; drop what a crash left half-written.

        A dataset whose `dataset.json` cannot be read (or names a format this
        server does not know) is reported on use (FAILED_PRECONDITION) instead
        of keeping the server from starting.
        """
        for entry in self.tmp_dir.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                _remove(entry)
        restored: dict[str, StoredDataset] = {}
        unrestorable: dict[str, str] = {}
        for folder in sorted(self.datasets_dir.iterdir()):
            if not (folder / "dataset.json").is_file():
                _remove(folder)  # never committed: the rename is the commit
                continue
            try:
                restored[folder.name] = StoredDataset.from_json(read_json(folder / "dataset.json"))
            except Exception as exc:
                log.exception("dataset %s could not be restored", folder.name)
                unrestorable[folder.name] = f"{type(exc).__name__}: {exc}"
        self._table.replace_all(restored, unrestorable)
        log.info("restored %d dataset(s)", len(restored))

    # --- lookup --------------------------------------------------------------

    def get(self, dataset_id: str, field: str = "dataset_id") -> DatasetInfo:
        """The dataset's description, or NotFound (InvalidArgument for a malformed id)."""
        return self._table.get(dataset_id, field).info

    def list(
        self, page_size: int, page_token: str, where: Callable[[DatasetInfo], bool] | None = None
    ) -> tuple[list[DatasetInfo], str]:
        """One page of datasets ordered by id (those `where` accepts), and the next page's token."""
        infos = [stored.info for stored in self._table.values()]
        if where is not None:  # before paging: pages stay full and tokens valid
            infos = [info for info in infos if where(info)]
        return page_after(infos, lambda info: info.dataset_id, page_size, page_token)

    # --- creation ------------------------------------------------------------

    async def upload(
        self,
        dataset_id: str,
        source: DatasetSource,
        size_bytes: int,
        chunks: AsyncIterator[bytes],
        owner: str = "",
    ) -> DatasetInfo:
        """Receive a dataset file of exactly `size_bytes`, validate it and commit it.

        Args:
            dataset_id: The new id; the server picks one when empty.
            source: The format and its options.
            size_bytes: The exact size announced in the header.
            chunks: The file's bytes, in order.
            owner: The principal creating it ("" without authentication).

        Returns:
            The committed dataset's description.
        """
        if dataset_id:
            validate_id(dataset_id, field="header.dataset_id", kind="dataset")
        source = _check_source(source, "header.source")
        check_image_size(source.image_size, self.limits, "header.source.image_folder.image_size")
        check_upload_size(
            size_bytes,
            self.max_upload_bytes,
            field="header.size_bytes",
            what="dataset file",
            hint="put the file under a dataset root and use CreateDataset, or raise the limit",
        )
        dataset_id = await self._table.claim(self.executor, dataset_id, "header.dataset_id")
        path = self.tmp_dir / f"{_TMP_PREFIX}upload-{uuid.uuid4().hex}"
        try:
            await receive_file(path, size_bytes, chunks, self.executor, field="chunk")
        except BaseException:
            self._table.release(dataset_id)
            raise

        def ingest() -> DatasetInfo:
            try:
                return self._ingest(dataset_id, source, path, "chunk", "header.source", owner)
            finally:
                path.unlink(missing_ok=True)

        return await self._table.run_reserved(self.executor, dataset_id, ingest, leftover=path)

    async def create(self, dataset_id: str, source: DatasetSource, uri: str, owner: str = "") -> DatasetInfo:
        """Copy a file the server can read into the store, validate it and commit it.

        Args:
            dataset_id: The new id; the server picks one when empty.
            source: The format and its options.
            uri: A path or `file://` URI under one of `allowed_roots` or the
                store's `imports/` folder (relative paths resolve there).
            owner: The principal creating it ("" without authentication).

        Returns:
            The committed dataset's description.
        """
        if dataset_id:
            validate_id(dataset_id, field="dataset_id", kind="dataset")
        source = _check_source(source, "source")
        check_image_size(source.image_size, self.limits, "source.image_folder.image_size")
        roots = [*self.allowed_roots, self.imports_dir]

        def copy_and_ingest() -> DatasetInfo:
            path = _resolve_uri(uri, roots, self.imports_dir)
            _check_readable_file(path, uri)
            with self._table.reservation(dataset_id, "dataset_id") as reserved:
                # A private copy: later changes to the source cannot change the dataset.
                copy = self.tmp_dir / f"{_TMP_PREFIX}import-{uuid.uuid4().hex}"
                try:
                    try:
                        shutil.copyfile(path, copy)
                    except FileNotFoundError as exc:
                        raise _file_not_found(uri) from exc
                    except OSError as exc:
                        raise _unreadable(uri, exc) from exc
                    return self._ingest(reserved, source, copy, "uri", "source", owner)
                finally:
                    copy.unlink(missing_ok=True)

        # Resolving, reserving and copying all touch the disk: one worker does them, in that order.
        return await asyncio.get_running_loop().run_in_executor(self.executor, copy_and_ingest)

    def _ingest(
        self,
        dataset_id: str,
        source: DatasetSource,
        data: Path,
        data_field: str,
        source_field: str,
        owner: str = "",
    ) -> DatasetInfo:
        """Validate (and convert) a received file, then commit it durably as `dataset_id`.

        `data_field` names the request field that carried the file (`chunk`
        or `uri`), `source_field` the one that described it, for errors.
        """
        received = Received(data, data_field, source_field, self.max_expanded_bytes, self.limits)
        reader = get_format(source.format)
        staging = self.tmp_dir / f"{_TMP_PREFIX}staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            stored_file = staging / reader.data_file
            try:
                contents = reader.ingest(received, source, stored_file)
            except MemoryError as exc:
                raise ResourceExhausted(
                    "The server ran out of memory validating the dataset; retry later or send a smaller one.",
                    reason="OUT_OF_MEMORY",
                    field=received.data_field,
                ) from exc
            fsync_path(stored_file)
            info = DatasetInfo(
                dataset_id=dataset_id,
                format=source.format,
                example_count=contents.example_count,
                validation_example_count=contents.validation_example_count,
                features=contents.features,
                labels=contents.labels,
                class_count=contents.class_count,
                class_names=contents.class_names,
                size_bytes=stored_file.stat().st_size,
                create_time=utc_now(),
                owner=owner,
            )
            stored = StoredDataset(info, source)
            write_json(staging / "dataset.json", stored.to_json())
            fsync_path(staging)
            os.rename(staging, self.datasets_dir / dataset_id)
        except BaseException:
            _remove(staging)
            raise
        # Renamed into place: the dataset exists on disk, so it exists in memory too.
        self._table.put(dataset_id, stored)
        fsync_path(self.datasets_dir)
        log.info(
            "created dataset %s (%s, %d examples, %d bytes)",
            dataset_id,
            source.format,
            info.example_count,
            info.size_bytes,
        )
        return info

    # --- deletion ------------------------------------------------------------

    async def delete(self, dataset_id: str, users: Callable[[str], list[str]]) -> None:
        """Remove a dataset durably, unless a queued or running job uses it.

        Args:
            dataset_id: The dataset.
            users: Returns the ids of the queued or running jobs using a dataset.
        """
        stored = self._table.get(dataset_id, "dataset_id")
        jobs = users(dataset_id)
        if jobs:
            raise FailedPrecondition(
                f"Dataset {dataset_id!r} is used by queued or running job(s) {sorted(jobs)}; cancel them "
                f"or wait for them to end, then delete it.",
                reason="DATASET_IN_USE",
                field="dataset_id",
                metadata={"dataset_id": dataset_id, "jobs": ",".join(sorted(jobs))},
            )
        # The folder stays until renamed away, so the id cannot be taken meanwhile.
        if not self._table.remove(dataset_id, stored):
            raise NotFound(
                f"No dataset with id {dataset_id!r}; it was deleted meanwhile.",
                reason="DATASET_NOT_FOUND",
                field="dataset_id",
            )

        def remove() -> None:
            trash = self.tmp_dir / f"{_TMP_PREFIX}deleted-{dataset_id}-{uuid.uuid4().hex}"
            try:
                os.rename(self.datasets_dir / dataset_id, trash)
            except BaseException:
                self._table.put(dataset_id, stored)
                raise
            fsync_path(self.datasets_dir)
            _remove(trash)

        await asyncio.get_running_loop().run_in_executor(self.executor, remove)
        log.info("deleted dataset %s", dataset_id)

    # --- reading -------------------------------------------------------------

    def load(
        self, dataset_id: str, split: DatasetSplit | str, *, field: str = "dataset_id"
    ) -> tuple[tf.data.Dataset, int]:
        """An unbatched `tf.data.Dataset` of `(x, y)` pairs of one split, and its example count.

        Values keep their stored dtypes (images stay uint8). Blocking: call it
        from a worker thread.

        Args:
            dataset_id: The dataset.
            split: `train`, or `validation` (the NPZ's `x_val`/`y_val`).
            field: The request field naming the dataset, for errors.
        """
        stored = self._table.get(dataset_id, field)
        split = DatasetSplit.parse(split, field=field)
        if split is DatasetSplit.VALIDATION and stored.info.validation_example_count == 0:
            raise InvalidArgument(
                f"Dataset {dataset_id!r} has no validation split (no `x_val`/`y_val` arrays); use a "
                f"validation dataset or a validation split of the training data.",
                reason="NO_VALIDATION_SPLIT",
                field=field,
            )
        reader = get_format(stored.info.format)
        return reader.load(self.datasets_dir / dataset_id / reader.data_file, stored, split)


# --- the source --------------------------------------------------------------


def _check_source(source: DatasetSource, prefix: str) -> DatasetSource:
    """Check a source's format and options; returns it with the format parsed and defaults filled in."""
    reader = get_format(source.format, field=f"{prefix}.format")
    return reader.check_source(replace(source, format=reader.format), prefix)


# --- CreateDataset's files ---------------------------------------------------


def _resolve_uri(uri: str, roots: list[Path], imports_dir: Path) -> Path:
    """The local file `uri` names, if it lies under one of `roots` (relative paths: in `imports_dir`)."""
    if not uri:
        raise InvalidArgument(
            "Received an empty uri, expected a path or `file://` URI of the dataset file.",
            reason="INVALID_URI",
            field="uri",
        )
    text = uri
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if scheme and (scheme.group(1).lower() == "file" or uri[scheme.end() :].startswith("//")):
        parsed = urlparse(uri)
        if parsed.scheme.lower() != "file" or parsed.netloc not in ("", "localhost"):
            raise InvalidArgument(
                f"Received uri={uri[:200]!r}, expected a local path or a `file://` URI: this server "
                f"reads no remote storage. Copy the file under a dataset root, or upload it with "
                f"UploadDataset.",
                reason="UNSUPPORTED_URI",
                field="uri",
            )
        text = unquote(parsed.path)
    candidate = Path(text) if Path(text).is_absolute() else imports_dir / text
    try:
        # resolve() follows links and `..`, so neither can lead outside the roots.
        resolved = candidate.resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise InvalidArgument(
            f"Received uri={uri[:200]!r}, which is not a usable path: {exc}.",
            reason="INVALID_URI",
            field="uri",
        ) from exc
    if not any(resolved.is_relative_to(root) for root in roots):
        raise InvalidArgument(
            f"Received uri={uri[:200]!r}, which lies outside the folders this server may read: "
            f"{[str(r) for r in roots]}. Put the file under one of them (`--dataset-roots` "
            f"configures them).",
            reason="PATH_NOT_ALLOWED",
            field="uri",
        )
    return resolved


def _check_readable_file(path: Path, uri: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise _file_not_found(uri) from exc
    except OSError as exc:
        raise _unreadable(uri, exc) from exc
    if not stat.S_ISREG(mode):
        raise InvalidArgument(
            f"Received uri={uri[:200]!r}, which is not a regular file; name the dataset file itself "
            f"(an image folder must be a zip or tar archive).",
            reason="NOT_A_FILE",
            field="uri",
        )


def _file_not_found(uri: str) -> NotFound:
    return NotFound(
        f"Received uri={uri[:200]!r}, but no such file exists on the server.",
        reason="FILE_NOT_FOUND",
        field="uri",
    )


def _unreadable(uri: str, exc: OSError) -> InvalidArgument:
    return InvalidArgument(
        f"Received uri={uri[:200]!r}, which the server cannot read: {exc.strerror or exc}.",
        reason="UNREADABLE_FILE",
        field="uri",
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
