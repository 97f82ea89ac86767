"""Datasets: training data validated on arrival, stored durably, read back through `tf.data`.

A dataset is one file the server received (UploadDataset) or copied from a
folder it may read (CreateDataset), checked completely before the call is
acknowledged: a dataset that exists is one a job can train on.

Formats:

- **NPZ** (`numpy.savez`): arrays `x` (inputs) and `y` (labels), optionally
  `x_val` and `y_val` (both or neither), with one example per entry of the
  first dimension. `x` is numeric (float, int or uint8) and finite; `y` holds
  integer class indices (at least 0; `class_count` is the largest plus one)
  or float targets (`class_count` 0). Pickled (object) arrays are refused.
  Stored as received.
- **TFRecord** of `tf.train.Example`: one feature for the inputs and one for
  the labels, each described by a `FeatureSpecInfo` (FLOAT32 float_list,
  INT64 int64_list, or UINT8 raw bytes in a bytes_list). Every record is
  parsed at validation, so a job never meets a bad one. Stored as received.
- **Image folder**: a zip or tar (optionally gzip, bzip2 or xz compressed)
  archive of `<class>/<image>` files, optionally inside one top-level folder,
  the layout of `keras.utils.image_dataset_from_directory`. Classes are the
  sorted class folder names, labels their indices. BMP, GIF, JPEG and PNG
  files count (Keras's list); other files, hidden files and `__MACOSX/` are
  ignored. Archives are read in memory and never extracted: absolute entries,
  `..`, links and devices are refused before any image is read. Each image is
  decoded, resized (bilinear) to `image_size` and stored as uint8 arrays
  `x` [N, H, W, C] and `y` (int64) in an NPZ, so training reads arrays.

Limits: an upload is at most `max_upload_bytes`; archives (NPZ included) may
expand to at most four times that, and an image folder's decoded arrays too.

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
import lzma
import math
import os
import re
import shutil
import stat
import struct
import tarfile
import threading
import uuid
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlparse

import numpy as np

from weightsmith_server.clock import utc_now
from weightsmith_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from weightsmith_server.naming import new_id, validate_id
from weightsmith_server.numerics import all_finite
from weightsmith_server.paging import decode_page_token, encode_page_token
from weightsmith_server.paging import page_size as _page_size
from weightsmith_server.store import fsync_path, read_json, write_json
from weightsmith_server.tensor_spec import TensorSpecInfo

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

T = TypeVar("T")

FORMATS = ("npz", "tfrecord", "image_folder")
FEATURE_DTYPES = ("float32", "int64", "uint8")
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
MAX_IMAGE_SIDE = 4096
# Decoding allocates height x width x 4 bytes whatever the file size; a
# few-kilobyte PNG may claim 100000 x 100000 pixels.
MAX_IMAGE_PIXELS = 1 << 26
# Each archive entry costs memory while the archive is listed.
MAX_ARCHIVE_ENTRIES = 200_000
# Archives (and NPZ files, which are zip archives) may expand this many times.
EXPANSION_FACTOR = 4

_TMP_PREFIX = "dataset-"
_DATA_FILES = {"npz": "data.npz", "tfrecord": "data.tfrecord", "image_folder": "data.npz"}
_NPZ_ARRAYS = ("x", "y", "x_val", "y_val")
_SCAN_BATCH = 1024
_TAR_HEADER_BYTES = 512
# What reading a damaged zip or (compressed) tar member can raise.
_ARCHIVE_ERRORS = (
    OSError,
    EOFError,
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,
    RuntimeError,
)


@dataclass(frozen=True)
class FeatureSpecInfo:
    """One feature of a TFRecord `tf.train.Example`: its key, dtype and per-example shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DatasetSource:
    """How to read a dataset file: its format and the format's options."""

    format: str
    tfrecord_features: FeatureSpecInfo | None = None
    tfrecord_labels: FeatureSpecInfo | None = None
    image_size: tuple[int, int] | None = None
    channels: int = 3


@dataclass(frozen=True)
class DatasetInfo:
    """Everything GetDataset reports; `features`/`labels` shapes omit the example dimension."""

    dataset_id: str
    format: str
    example_count: int
    validation_example_count: int
    features: TensorSpecInfo
    labels: TensorSpecInfo
    class_count: int
    class_names: list[str]
    size_bytes: int
    create_time: str


@dataclass(frozen=True)
class _Contents:
    """What validation learned about a data file."""

    example_count: int
    validation_example_count: int
    features: TensorSpecInfo
    labels: TensorSpecInfo
    class_count: int
    class_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Stored:
    info: DatasetInfo
    source: DatasetSource


class DatasetStore:
    """The datasets under a store root, their validation on arrival and their loading for jobs.

    Args:
        root: The store root; datasets live in `root/datasets/<dataset_id>/`.
        executor: Runs the blocking work (disk, TensorFlow) off the event loop.
        allowed_roots: Folders CreateDataset may read from, besides `root/imports`.
        max_upload_bytes: The largest UploadDataset file.
    """

    def __init__(
        self,
        root: Path,
        executor: concurrent.futures.Executor,
        *,
        allowed_roots: Sequence[Path],
        max_upload_bytes: int,
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
        self.max_expanded_bytes = EXPANSION_FACTOR * max_upload_bytes
        self._datasets: dict[str, _Stored] = {}
        self._unrestorable: dict[str, str] = {}
        self._reserved: set[str] = set()
        self._lock = threading.Lock()

    # --- start-up ------------------------------------------------------------

    def restore(self) -> None:
        """Load the description of every committed dataset; drop what a crash left half-written.

        A dataset whose `dataset.json` cannot be read is reported on use
        (FAILED_PRECONDITION) instead of keeping the server from starting.
        """
        for entry in self.tmp_dir.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                _remove(entry)
        restored: dict[str, _Stored] = {}
        unrestorable: dict[str, str] = {}
        for folder in sorted(self.datasets_dir.iterdir()):
            if not (folder / "dataset.json").is_file():
                _remove(folder)  # never committed: the rename is the commit
                continue
            try:
                restored[folder.name] = _stored_from_json(read_json(folder / "dataset.json"))
            except Exception as exc:
                log.exception("dataset %s could not be restored", folder.name)
                unrestorable[folder.name] = f"{type(exc).__name__}: {exc}"[:300]
        with self._lock:
            self._datasets, self._unrestorable = restored, unrestorable
        log.info("restored %d dataset(s)", len(restored))

    # --- lookup --------------------------------------------------------------

    def _lookup(self, dataset_id: str, field: str) -> _Stored:
        validate_id(dataset_id, field=field, kind="dataset")
        if dataset_id in self._unrestorable:
            raise FailedPrecondition(
                f"Dataset {dataset_id!r} is in the store but could not be restored at start-up: "
                f"{self._unrestorable[dataset_id]}. The server log has the details.",
                reason="DATASET_UNRESTORABLE",
                field=field,
            )
        stored = self._datasets.get(dataset_id)
        if stored is None:
            raise NotFound(
                f"No dataset with id {dataset_id!r}; ListDatasets shows the datasets on this server.",
                reason="DATASET_NOT_FOUND",
                field=field,
                metadata={"dataset_id": dataset_id},
            )
        return stored

    def get(self, dataset_id: str, field: str = "dataset_id") -> DatasetInfo:
        """The dataset's description, or NotFound (InvalidArgument for a malformed id)."""
        return self._lookup(dataset_id, field).info

    def list(self, page_size: int, page_token: str) -> tuple[list[DatasetInfo], str]:
        """One page of datasets ordered by id, and the token of the next page ("" at the end)."""
        size = _page_size(page_size)
        after = decode_page_token(page_token) if page_token else ""
        datasets = dict(self._datasets)
        ids = [k for k in sorted(datasets) if k > after]
        page = ids[:size]
        next_token = encode_page_token(page[-1]) if len(ids) > size else ""
        return [datasets[k].info for k in page], next_token

    # --- creation ------------------------------------------------------------

    async def upload(
        self, dataset_id: str, source: DatasetSource, size_bytes: int, chunks: AsyncIterator[bytes]
    ) -> DatasetInfo:
        """Receive a dataset file of exactly `size_bytes`, validate it and commit it.

        Args:
            dataset_id: The new id; the server picks one when empty.
            source: The format and its options.
            size_bytes: The exact size announced in the header.
            chunks: The file's bytes, in order.

        Returns:
            The committed dataset's description.
        """
        if dataset_id:
            validate_id(dataset_id, field="header.dataset_id", kind="dataset")
        source = _check_source(source, "header.source")
        if size_bytes <= 0:
            raise InvalidArgument(
                f"Received size_bytes={size_bytes}, expected the exact size of the dataset file in bytes.",
                reason="INVALID_SIZE",
                field="header.size_bytes",
            )
        if size_bytes > self.max_upload_bytes:
            raise ResourceExhausted(
                f"The upload of {size_bytes} bytes exceeds the server's limit of {self.max_upload_bytes} "
                f"bytes; put the file under a dataset root and use CreateDataset, or raise the limit "
                f"(--max-upload-mb).",
                reason="UPLOAD_TOO_LARGE",
                field="header.size_bytes",
            )
        dataset_id = self._reserve(dataset_id, "header.dataset_id")
        path = self.tmp_dir / f"{_TMP_PREFIX}upload-{uuid.uuid4().hex}"
        try:
            await self._receive(path, size_bytes, chunks)
        except BaseException:
            path.unlink(missing_ok=True)
            self._release(dataset_id)
            raise

        def ingest() -> DatasetInfo:
            try:
                return self._ingest(dataset_id, source, path, "chunk", "header.source")
            finally:
                path.unlink(missing_ok=True)

        return await self._run_reserved(dataset_id, ingest)

    async def _receive(self, path: Path, size_bytes: int, chunks: AsyncIterator[bytes]) -> None:
        """Write the stream to `path`, refusing more or fewer bytes than announced."""
        loop = asyncio.get_running_loop()
        received = 0
        handle = await loop.run_in_executor(self.executor, open, path, "wb")
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > size_bytes:
                    raise InvalidArgument(
                        f"Received more than the {size_bytes} bytes announced in `header.size_bytes`; "
                        f"announce the file's exact size.",
                        reason="UPLOAD_SIZE_MISMATCH",
                        field="chunk",
                    )
                await loop.run_in_executor(self.executor, handle.write, chunk)
        finally:
            await loop.run_in_executor(self.executor, handle.close)
        if received != size_bytes:
            raise InvalidArgument(
                f"The upload is truncated: received {received} of the {size_bytes} bytes announced; "
                f"send the whole file.",
                reason="UPLOAD_TRUNCATED",
                field="chunk",
            )

    async def create(self, dataset_id: str, source: DatasetSource, uri: str) -> DatasetInfo:
        """Copy a file the server can read into the store, validate it and commit it.

        Args:
            dataset_id: The new id; the server picks one when empty.
            source: The format and its options.
            uri: A path or `file://` URI under one of `allowed_roots` or the
                store's `imports/` folder (relative paths resolve there).

        Returns:
            The committed dataset's description.
        """
        if dataset_id:
            validate_id(dataset_id, field="dataset_id", kind="dataset")
        source = _check_source(source, "source")
        path = self._resolve_uri(uri)
        _check_readable_file(path, uri)
        dataset_id = self._reserve(dataset_id, "dataset_id")

        def copy_and_ingest() -> DatasetInfo:
            # A private copy: later changes to the source cannot change the dataset.
            copy = self.tmp_dir / f"{_TMP_PREFIX}import-{uuid.uuid4().hex}"
            try:
                try:
                    shutil.copyfile(path, copy)
                except FileNotFoundError as exc:
                    raise _file_not_found(uri) from exc
                except OSError as exc:
                    raise _unreadable(uri, exc) from exc
                return self._ingest(dataset_id, source, copy, "uri", "source")
            finally:
                copy.unlink(missing_ok=True)

        return await self._run_reserved(dataset_id, copy_and_ingest)

    def _resolve_uri(self, uri: str) -> Path:
        """The local file `uri` names, if it lies under a folder this server may read."""
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
        candidate = Path(text) if Path(text).is_absolute() else self.imports_dir / text
        roots = [*self.allowed_roots, self.imports_dir]
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

    def _reserve(self, dataset_id: str, field: str) -> str:
        """Claim an id (a fresh one when empty) until the creation finishes or fails."""
        dataset_id = dataset_id or new_id("dataset")
        with self._lock:
            if (
                dataset_id in self._datasets
                or dataset_id in self._reserved
                or dataset_id in self._unrestorable
                or (self.datasets_dir / dataset_id).exists()
            ):
                raise AlreadyExists(
                    f"A dataset with id {dataset_id!r} exists already; pick another id or delete it first.",
                    reason="DATASET_EXISTS",
                    field=field,
                    metadata={"dataset_id": dataset_id},
                )
            self._reserved.add(dataset_id)
        return dataset_id

    def _release(self, dataset_id: str) -> None:
        with self._lock:
            self._reserved.discard(dataset_id)

    async def _run_reserved(self, dataset_id: str, function: Callable[[], T]) -> T:
        """Run `function` in the executor and release `dataset_id` when the worker is done.

        Released by the worker's completion, not the caller's: a client that
        gives up must not free the id while validation still runs.
        """
        future = self.executor.submit(function)
        future.add_done_callback(lambda _: self._release(dataset_id))
        return await asyncio.wrap_future(future)

    def _ingest(
        self, dataset_id: str, source: DatasetSource, data: Path, data_field: str, source_field: str
    ) -> DatasetInfo:
        """Validate (and convert) a received file, then commit it durably as `dataset_id`.

        `data_field` names the request field that carried the file (`chunk`
        or `uri`), `source_field` the one that described it, for errors.
        """
        staging = self.tmp_dir / f"{_TMP_PREFIX}staging-{uuid.uuid4().hex}"
        staging.mkdir()
        target = self.datasets_dir / dataset_id
        try:
            stored_file = staging / _DATA_FILES[source.format]
            try:
                if source.format == "npz":
                    contents = _validate_npz(data, data_field, self.max_expanded_bytes)
                    os.rename(data, stored_file)
                elif source.format == "tfrecord":
                    contents = _scan_tfrecord(data, source, data_field, source_field)
                    os.rename(data, stored_file)
                else:
                    contents = _convert_image_folder(
                        data, source, stored_file, data_field, self.max_expanded_bytes
                    )
            except MemoryError as exc:
                raise ResourceExhausted(
                    "The server ran out of memory validating the dataset; retry later or send a smaller one.",
                    reason="OUT_OF_MEMORY",
                    field=data_field,
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
            )
            write_json(staging / "dataset.json", {"dataset": asdict(info), "source": asdict(source)})
            fsync_path(staging)
            os.rename(staging, target)
        except BaseException:
            _remove(staging)
            raise
        # Renamed into place: the dataset exists on disk, so it exists in memory too.
        with self._lock:
            self._datasets[dataset_id] = _Stored(info, source)
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
        self._lookup(dataset_id, "dataset_id")
        jobs = users(dataset_id)
        if jobs:
            raise FailedPrecondition(
                f"Dataset {dataset_id!r} is used by queued or running job(s) {sorted(jobs)}; cancel them "
                f"or wait for them to end, then delete it.",
                reason="DATASET_IN_USE",
                field="dataset_id",
                metadata={"dataset_id": dataset_id, "jobs": ",".join(sorted(jobs))},
            )
        with self._lock:
            stored = self._datasets.pop(dataset_id, None)
            if stored is None:
                raise NotFound(
                    f"No dataset with id {dataset_id!r}; it was deleted meanwhile.",
                    reason="DATASET_NOT_FOUND",
                    field="dataset_id",
                )
            # Held until the folder is gone, so the id cannot be taken meanwhile.
            self._reserved.add(dataset_id)

        def remove() -> None:
            trash = self.tmp_dir / f"{_TMP_PREFIX}deleted-{dataset_id}-{uuid.uuid4().hex}"
            try:
                os.rename(self.datasets_dir / dataset_id, trash)
            except BaseException:
                with self._lock:
                    self._datasets[dataset_id] = stored
                raise
            fsync_path(self.datasets_dir)
            _remove(trash)

        await self._run_reserved(dataset_id, remove)
        log.info("deleted dataset %s", dataset_id)

    # --- reading -------------------------------------------------------------

    def load(self, dataset_id: str, split: str, *, field: str = "dataset_id") -> tuple[tf.data.Dataset, int]:
        """An unbatched `tf.data.Dataset` of `(x, y)` pairs of one split, and its example count.

        Values keep their stored dtypes (images stay uint8). Blocking: call it
        from a worker thread.

        Args:
            dataset_id: The dataset.
            split: `"train"` or `"validation"` (the NPZ's `x_val`/`y_val`).
            field: The request field naming the dataset, for errors.
        """
        import tensorflow as tf

        stored = self._lookup(dataset_id, field)
        info, source = stored.info, stored.source
        if split not in ("train", "validation"):
            raise InvalidArgument(
                f"Received split={split!r}, expected 'train' or 'validation'.",
                reason="INVALID_SPLIT",
                field=field,
            )
        if split == "validation" and info.validation_example_count == 0:
            raise InvalidArgument(
                f"Dataset {dataset_id!r} has no validation split (no `x_val`/`y_val` arrays); use a "
                f"validation dataset or a validation split of the training data.",
                reason="NO_VALIDATION_SPLIT",
                field=field,
            )
        path = self.datasets_dir / dataset_id / _DATA_FILES[info.format]
        if info.format == "tfrecord":
            parse = _tfrecord_parser(_require(source.tfrecord_features), _require(source.tfrecord_labels))
            records = tf.data.TFRecordDataset(str(path))
            return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE), info.example_count
        suffix = "" if split == "train" else "_val"
        with np.load(path, allow_pickle=False) as npz:
            x = _native(npz[f"x{suffix}"])
            y = _native(npz[f"y{suffix}"])
        return tf.data.Dataset.from_tensor_slices((x, y)), len(x)


# --- helpers: paths, files, JSON --------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _require(spec: FeatureSpecInfo | None) -> FeatureSpecInfo:
    if spec is None:
        raise ValueError("a stored TFRecord dataset lacks its feature spec")
    return spec


def _native(array: np.ndarray) -> np.ndarray:
    """The array in native byte order (TensorFlow takes no big-endian data)."""
    return array.astype(array.dtype.newbyteorder("="), copy=False)


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


def _tensor_spec_from_json(raw: dict[str, Any]) -> TensorSpecInfo:
    return TensorSpecInfo(raw["name"], raw["dtype"], tuple(raw["shape"]))


def _feature_from_json(raw: dict[str, Any] | None) -> FeatureSpecInfo | None:
    return None if raw is None else FeatureSpecInfo(raw["name"], raw["dtype"], tuple(raw["shape"]))


def _stored_from_json(raw: dict[str, Any]) -> _Stored:
    """Rebuild a dataset's description and source from its `dataset.json`."""
    info = raw["dataset"]
    source = raw["source"]
    return _Stored(
        info=DatasetInfo(
            **info
            | {
                "features": _tensor_spec_from_json(info["features"]),
                "labels": _tensor_spec_from_json(info["labels"]),
                "class_names": list(info["class_names"]),
            }
        ),
        source=DatasetSource(
            format=source["format"],
            tfrecord_features=_feature_from_json(source["tfrecord_features"]),
            tfrecord_labels=_feature_from_json(source["tfrecord_labels"]),
            image_size=None if source["image_size"] is None else tuple(source["image_size"]),
            channels=source["channels"],
        ),
    )


# --- the source --------------------------------------------------------------


def _check_source(source: DatasetSource, prefix: str) -> DatasetSource:
    """Check a source's format and options; returns it with defaults filled in."""
    if source.format not in FORMATS:
        raise InvalidArgument(
            f"Received format={source.format!r}, expected one of {list(FORMATS)}.",
            reason="UNSUPPORTED_FORMAT",
            field=f"{prefix}.format",
        )
    has_tfrecord = source.tfrecord_features is not None or source.tfrecord_labels is not None
    if source.format != "tfrecord" and has_tfrecord:
        raise InvalidArgument(
            f"Received TFRecord options for a {source.format} dataset; set the format to TFRecord or "
            f"leave the options out.",
            reason="OPTIONS_MISMATCH",
            field=f"{prefix}.tfrecord",
        )
    if source.format != "image_folder" and source.image_size is not None:
        raise InvalidArgument(
            f"Received image folder options for a {source.format} dataset; set the format to image "
            f"folder or leave the options out.",
            reason="OPTIONS_MISMATCH",
            field=f"{prefix}.image_folder",
        )
    if source.format == "tfrecord":
        if source.tfrecord_features is None or source.tfrecord_labels is None:
            raise InvalidArgument(
                "A TFRecord dataset needs `tfrecord.features` and `tfrecord.labels`: the key, dtype and "
                "per-example shape of the input and label features.",
                reason="MISSING_TFRECORD_OPTIONS",
                field=f"{prefix}.tfrecord",
            )
        _check_feature(source.tfrecord_features, f"{prefix}.tfrecord.features")
        _check_feature(source.tfrecord_labels, f"{prefix}.tfrecord.labels")
    if source.format == "image_folder":
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
    return source


def _check_feature(spec: FeatureSpecInfo, field: str) -> None:
    if not spec.name:
        raise InvalidArgument(
            "Received an empty feature name, expected the feature's key in the `tf.train.Example`.",
            reason="INVALID_FEATURE_SPEC",
            field=f"{field}.name",
        )
    if spec.dtype not in FEATURE_DTYPES:
        raise InvalidArgument(
            f"Received dtype {spec.dtype!r} for feature {spec.name!r}, expected FLOAT32 (float_list), "
            f"INT64 (int64_list) or UINT8 (raw bytes in a bytes_list).",
            reason="UNSUPPORTED_DTYPE",
            field=f"{field}.dtype",
        )
    if not all(isinstance(d, int) and d >= 1 for d in spec.shape):
        raise InvalidArgument(
            f"Received shape {list(spec.shape)} for feature {spec.name!r}, expected positive dimensions "
            f"(empty for a scalar).",
            reason="INVALID_SHAPE",
            field=f"{field}.shape",
        )


# --- NPZ ---------------------------------------------------------------------


def _corrupt(what: str, detail: object, data_field: str) -> InvalidArgument:
    return InvalidArgument(
        f"The {what} cannot be read: {detail}.", reason="CORRUPT_DATASET", field=data_field
    )


def _validate_npz(path: Path, data_field: str, max_expanded_bytes: int) -> _Contents:
    """Check an NPZ's arrays against the rules in the module docstring."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    # Checked first: np.load would take any other file for a pickle and say so.
    if magic.startswith(b"\x93NUMPY"):
        raise InvalidArgument(
            "Received a single .npy array, expected an .npz archive with arrays `x` and `y`; write it "
            "with numpy.savez(path, x=..., y=...).",
            reason="CORRUPT_DATASET",
            field=data_field,
        )
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise _corrupt(
            "NPZ file", "it is not a zip archive; expected a file written by numpy.savez", data_field
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, *_ARCHIVE_ERRORS) as exc:
        raise _corrupt("NPZ file", f"{exc}; expected a file written by numpy.savez", data_field) from exc
    with loaded as npz:
        names = list(npz.files)
        expanded = sum(info.file_size for info in npz.zip.infolist())
        if expanded > max_expanded_bytes:
            raise ResourceExhausted(
                f"The NPZ file's arrays take {expanded} bytes, more than the server's limit of "
                f"{max_expanded_bytes} bytes for a dataset held in memory.",
                reason="ARCHIVE_TOO_LARGE",
                field=data_field,
            )
        unknown = [n for n in names if n not in _NPZ_ARRAYS]
        if unknown:
            raise InvalidArgument(
                f"Received arrays {unknown} in the NPZ file, expected only `x`, `y` and optionally "
                f"`x_val` and `y_val`.",
                reason="UNKNOWN_ARRAY",
                field=data_field,
            )
        for required in ("x", "y"):
            if required not in names:
                raise InvalidArgument(
                    f"The NPZ file has no array `{required}`; expected arrays `x` and `y` (optionally "
                    f"`x_val` and `y_val`). Received arrays: {names}.",
                    reason="MISSING_ARRAY",
                    field=data_field,
                )
        if ("x_val" in names) != ("y_val" in names):
            present, missing = ("x_val", "y_val") if "x_val" in names else ("y_val", "x_val")
            raise InvalidArgument(
                f"The NPZ file has `{present}` but no `{missing}`; give both validation arrays or neither.",
                reason="MISSING_ARRAY",
                field=data_field,
            )
        arrays = {name: _read_array(npz, name, data_field) for name in names}
    x, y = arrays["x"], arrays["y"]
    _check_examples("x", x, "y", y, data_field)
    _check_values("x", x, "y", y, data_field)
    validation_count = 0
    labels = [y]
    if "x_val" in arrays:
        x_val, y_val = arrays["x_val"], arrays["y_val"]
        _check_examples("x_val", x_val, "y_val", y_val, data_field)
        for train_name, train, val_name, val in (("x", x, "x_val", x_val), ("y", y, "y_val", y_val)):
            if val.dtype != train.dtype:
                raise InvalidArgument(
                    f"Received `{val_name}` of dtype {val.dtype.name}, expected the dtype of "
                    f"`{train_name}`: {train.dtype.name}.",
                    reason="DTYPE_MISMATCH",
                    field=data_field,
                )
            if val.shape[1:] != train.shape[1:]:
                raise InvalidArgument(
                    f"Received `{val_name}` with examples of shape {list(val.shape[1:])}, expected the "
                    f"example shape of `{train_name}`: {list(train.shape[1:])}.",
                    reason="SHAPE_MISMATCH",
                    field=data_field,
                )
        _check_values("x_val", x_val, "y_val", y_val, data_field)
        validation_count = len(x_val)
        labels.append(y_val)
    return _Contents(
        example_count=len(x),
        validation_example_count=validation_count,
        features=TensorSpecInfo("x", x.dtype.name, tuple(int(d) for d in x.shape[1:])),
        labels=TensorSpecInfo("y", y.dtype.name, tuple(int(d) for d in y.shape[1:])),
        class_count=max(int(a.max()) if a.size else -1 for a in labels) + 1 if y.dtype.kind in "iu" else 0,
    )


def _read_array(npz: Any, name: str, data_field: str) -> np.ndarray:
    """One NPZ array, after checking its header.

    The header is read first because numpy allocates what it claims before
    reading any data: a few bytes could otherwise ask for terabytes.
    """
    member = f"{name}.npy" if f"{name}.npy" in npz.zip.namelist() else name
    try:
        with npz.zip.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except (ValueError, *_ARCHIVE_ERRORS) as exc:
        raise _corrupt(f"NPZ array `{name}`", exc, data_field) from exc
    if dtype.hasobject:
        raise InvalidArgument(
            f"Array `{name}` holds Python objects (pickled), which the server never loads; expected a "
            f"numeric array.",
            reason="UNSUPPORTED_DTYPE",
            field=data_field,
        )
    claimed = math.prod(shape) * dtype.itemsize
    held = npz.zip.getinfo(member).file_size
    if claimed > held:
        raise _corrupt(
            f"NPZ array `{name}`",
            f"its header claims {claimed} bytes of data, the file holds {held}",
            data_field,
        )
    try:
        array = npz[name]
    except (ValueError, *_ARCHIVE_ERRORS) as exc:
        raise _corrupt(f"NPZ array `{name}`", exc, data_field) from exc
    if not isinstance(array, np.ndarray):
        raise _corrupt(f"NPZ member `{member}`", "it is not a .npy array", data_field)
    return array


def _check_examples(x_name: str, x: np.ndarray, y_name: str, y: np.ndarray, data_field: str) -> None:
    """Both arrays have an example dimension of the same, non-zero length."""
    for name, array in ((x_name, x), (y_name, y)):
        if array.ndim == 0:
            raise InvalidArgument(
                f"Received a scalar `{name}`, expected an array whose first dimension indexes examples.",
                reason="INVALID_SHAPE",
                field=data_field,
            )
    if len(x) != len(y):
        raise InvalidArgument(
            f"Received {len(x)} examples in `{x_name}` but {len(y)} labels in `{y_name}`, expected the "
            f"same first dimension.",
            reason="LENGTH_MISMATCH",
            field=data_field,
        )
    if len(x) == 0:
        raise InvalidArgument(
            f"Received 0 examples in `{x_name}`, expected at least 1"
            + ("; leave out `x_val` and `y_val` instead." if x_name == "x_val" else "."),
            reason="EMPTY_DATASET",
            field=data_field,
        )


def _check_values(x_name: str, x: np.ndarray, y_name: str, y: np.ndarray, data_field: str) -> None:
    """Numeric dtypes, finite floats and non-negative integer labels."""
    if x.dtype.kind not in "fiu":
        raise InvalidArgument(
            f"Received `{x_name}` of dtype {x.dtype.name}, expected a numeric array (float, int or uint8).",
            reason="UNSUPPORTED_DTYPE",
            field=data_field,
        )
    if y.dtype.kind not in "fiu":
        raise InvalidArgument(
            f"Received `{y_name}` of dtype {y.dtype.name}, expected integer class indices or float targets.",
            reason="UNSUPPORTED_DTYPE",
            field=data_field,
        )
    for name, array in ((x_name, x), (y_name, y)):
        if array.dtype.kind == "f" and not all_finite(array):
            bad = int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0])
            raise InvalidArgument(
                f"Array `{name}` holds NaN or infinite values (first in example {bad}), expected finite "
                f"values.",
                reason="NON_FINITE_VALUES",
                field=data_field,
            )
    if y.dtype.kind == "i" and y.size and (lowest := int(y.min())) < 0:
        bad = int(np.flatnonzero((y.reshape(len(y), -1) < 0).any(axis=1))[0])
        raise InvalidArgument(
            f"Array `{y_name}` holds the negative label {lowest} (first in example {bad}), expected class "
            f"indices of at least 0.",
            reason="NEGATIVE_LABEL",
            field=data_field,
        )


# --- TFRecord ----------------------------------------------------------------


def _tf_message(exc: Exception) -> str:
    """A TensorFlow error's message without its op and function decorations."""
    text = getattr(exc, "message", None) or str(exc)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*(\[\[|\[Op:).*$", "", text, flags=re.DOTALL)
    return text.strip().rstrip(".")[:300]


def _tfrecord_parser(features: FeatureSpecInfo, labels: FeatureSpecInfo) -> Callable[[Any], Any]:
    """A function from one serialized `tf.train.Example` to its `(x, y)` tensors."""
    import tensorflow as tf

    specs = (features, labels)

    def parsing(spec: FeatureSpecInfo) -> Any:
        if spec.dtype == "uint8":
            return tf.io.FixedLenFeature([], tf.string)
        return tf.io.FixedLenFeature(list(spec.shape), tf.float32 if spec.dtype == "float32" else tf.int64)

    description = {spec.name: parsing(spec) for spec in specs}

    def decode(value: Any, spec: FeatureSpecInfo) -> Any:
        if spec.dtype != "uint8":
            return value
        return tf.reshape(tf.io.decode_raw(value, tf.uint8), list(spec.shape))

    def parse(serialized: Any) -> tuple[Any, Any]:
        parsed = tf.io.parse_single_example(serialized, description)
        return decode(parsed[features.name], features), decode(parsed[labels.name], labels)

    return parse


def _scan_tfrecord(path: Path, source: DatasetSource, data_field: str, source_field: str) -> _Contents:
    """Parse every record with the source's specs; count them and check their values."""
    import tensorflow as tf

    features, labels = _require(source.tfrecord_features), _require(source.tfrecord_labels)
    parse = _tfrecord_parser(features, labels)
    records = tf.data.TFRecordDataset(str(path))
    batches = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(_SCAN_BATCH)
    count = 0
    largest_label = -1
    iterator = iter(batches)
    while True:
        try:
            x, y = next(iterator)
        except StopIteration:
            break
        except tf.errors.DataLossError as exc:
            with open(path, "rb") as handle:
                gzipped = handle.read(2) == b"\x1f\x8b"
            hint = "; compressed TFRecord files are not supported, write them uncompressed" if gzipped else ""
            raise _corrupt("TFRecord file", f"{_tf_message(exc)}{hint}", data_field) from exc
        except tf.errors.OpError as exc:
            index, message = _first_bad_record(records, parse, count, exc)
            raise InvalidArgument(
                f"Record {index} does not match `{source_field}.tfrecord`: {message}. Expected feature "
                f"{features.name!r} ({features.dtype}, shape {list(features.shape)}) and label "
                f"{labels.name!r} ({labels.dtype}, shape {list(labels.shape)}); fix the specs or the file.",
                reason="EXAMPLE_MISMATCH",
                field=f"{source_field}.tfrecord",
            ) from exc
        x_array, y_array = x.numpy(), y.numpy()
        for name, array in ((features.name, x_array), (labels.name, y_array)):
            if array.dtype.kind == "f" and not all_finite(array):
                bad = count + int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0])
                raise InvalidArgument(
                    f"Feature {name!r} of record {bad} holds NaN or infinite values, expected finite values.",
                    reason="NON_FINITE_VALUES",
                    field=data_field,
                )
        if labels.dtype != "float32" and y_array.size:
            if labels.dtype == "int64" and int(y_array.min()) < 0:
                bad = count + int(np.flatnonzero((y_array.reshape(len(y_array), -1) < 0).any(axis=1))[0])
                raise InvalidArgument(
                    f"Label {labels.name!r} of record {bad} is negative ({int(y_array.min())} in this "
                    f"batch), expected class indices of at least 0.",
                    reason="NEGATIVE_LABEL",
                    field=data_field,
                )
            largest_label = max(largest_label, int(y_array.max()))
        count += len(x_array)
    if count == 0:
        raise InvalidArgument(
            "The TFRecord file holds no records, expected at least 1 `tf.train.Example`.",
            reason="EMPTY_DATASET",
            field=data_field,
        )
    return _Contents(
        example_count=count,
        validation_example_count=0,
        features=TensorSpecInfo(features.name, features.dtype, features.shape),
        labels=TensorSpecInfo(labels.name, labels.dtype, labels.shape),
        class_count=largest_label + 1 if labels.dtype != "float32" else 0,
    )


def _first_bad_record(
    records: tf.data.Dataset, parse: Callable[[Any], Any], start: int, error: Exception
) -> tuple[int, str]:
    """Find which record of the failing batch does not parse, to name it in the error."""
    for offset, serialized in enumerate(records.skip(start).take(_SCAN_BATCH)):
        try:
            parse(serialized)
        except Exception as exc:
            return start + offset, _tf_message(exc)
    return start, _tf_message(error)


# --- image folders -----------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """A regular file in an archive: its name, path components, size and archive handle."""

    name: str
    parts: tuple[str, ...]
    size: int
    handle: Any


class _Archive:
    """A zip or tar archive listed safely: every entry checked before any content is read."""

    def __init__(self, path: Path, data_field: str, max_expanded_bytes: int) -> None:
        self._field = data_field
        self._limit = max_expanded_bytes
        self._archive: zipfile.ZipFile | tarfile.TarFile | None = None
        # Opens an entry's content: ZipFile.open or TarFile.extractfile.
        self._open: Callable[[Any], Any] = lambda handle: None
        self.files: list[_Entry] = []
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
        except _ARCHIVE_ERRORS as exc:
            self.close()
            raise _corrupt("archive", exc, data_field) from exc
        except BaseException:
            self.close()
            raise

    def _add(self, name: str, kind: str, size: int, handle: Any) -> None:
        """Record one entry of `kind` (`file`, `folder`, or what makes it unsafe)."""
        problem = _unsafe_path(name) if kind in ("file", "folder") else kind
        if problem is not None:
            raise InvalidArgument(
                f"The archive entry {name[:200]!r} is {problem}; expected only files and folders with "
                f"relative paths inside the archive. Nothing was extracted.",
                reason="UNSAFE_ARCHIVE_ENTRY",
                field=self._field,
                metadata={"entry": name[:200]},
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
            self.files.append(_Entry(name, parts, size, handle))
        else:
            self.folders.add(parts)

    def _check_expansion(self, total: int) -> None:
        if total > self._limit:
            raise ResourceExhausted(
                f"The archive expands to more than {self._limit} bytes, the server's limit (four times "
                f"the upload limit); split the dataset or raise --max-upload-mb.",
                reason="ARCHIVE_TOO_LARGE",
                field=self._field,
            )

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

    def read(self, entry: _Entry) -> bytes:
        """The entry's bytes (CRC-checked for zip)."""
        try:
            with self._open(entry.handle) as member:
                return member.read()
        except _ARCHIVE_ERRORS as exc:
            raise _corrupt(f"archive entry {entry.name[:200]!r}", exc, self._field) from exc

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()


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


def _ignored(parts: tuple[str, ...]) -> bool:
    """Hidden files and macOS resource forks are not part of the data."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _image_dimensions(data: bytes) -> tuple[int, int] | None:
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


def _class_layout(archive: _Archive, data_field: str) -> tuple[list[str], list[tuple[_Entry, int]]]:
    """Class names and the images with their labels, in (class, path) order."""
    images = [
        e
        for e in archive.files
        if not _ignored(e.parts) and PurePosixPath(e.parts[-1]).suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not images:
        raise InvalidArgument(
            f"The archive holds no images ({', '.join(IMAGE_EXTENSIONS)} files); expected "
            f"<class>/<image> entries.",
            reason="EMPTY_DATASET",
            field=data_field,
        )
    folders = {p for p in archive.folders if not _ignored(p)}
    folders |= {e.parts[:i] for e in archive.files if not _ignored(e.parts) for i in range(1, len(e.parts))}
    tops = {p[0] for p in folders} | {e.parts[0] for e in archive.files if not _ignored(e.parts)}
    # One top-level folder holding the class folders (how most archives are made) is unwrapped.
    strip = 1 if len(tops) == 1 and all(len(e.parts) >= 3 for e in images) else 0
    for entry in images:
        if len(entry.parts) - strip < 2:
            raise InvalidArgument(
                f"The image {entry.name[:200]!r} is not inside a class folder; expected "
                f"<class>/<image> entries (optionally under one top-level folder).",
                reason="IMAGE_OUTSIDE_CLASS_FOLDER",
                field=data_field,
            )
    # Empty class folders count, as in keras.utils.image_dataset_from_directory.
    class_names = sorted({p[strip] for p in folders if len(p) > strip})
    for name in class_names:
        if not name.isprintable() or name != name.encode("utf-8", "replace").decode("utf-8"):
            raise InvalidArgument(
                f"The class folder name {name[:200]!r} is not printable UTF-8; rename the folder.",
                reason="INVALID_CLASS_NAME",
                field=data_field,
            )
    index = {name: i for i, name in enumerate(class_names)}
    labelled = sorted(((e, index[e.parts[strip]]) for e in images), key=lambda item: (item[1], item[0].parts))
    return class_names, labelled


def _convert_image_folder(
    path: Path, source: DatasetSource, target: Path, data_field: str, max_expanded_bytes: int
) -> _Contents:
    """Decode and resize every image of an archive into `x`/`y` arrays saved at `target`."""
    height, width = source.image_size or (0, 0)
    channels = source.channels
    archive = _Archive(path, data_field, max_expanded_bytes)
    try:
        class_names, labelled = _class_layout(archive, data_field)
        decoded_bytes = len(labelled) * height * width * channels
        if decoded_bytes > max_expanded_bytes:
            raise ResourceExhausted(
                f"{len(labelled)} images of {height}x{width}x{channels} take {decoded_bytes} bytes, more "
                f"than the server's limit of {max_expanded_bytes}; use a smaller image_size or fewer images.",
                reason="DATASET_TOO_LARGE",
                field=data_field,
            )
        x = np.empty((len(labelled), height, width, channels), np.uint8)
        y = np.array([label for _, label in labelled], np.int64)
        position = {id(entry): i for i, (entry, _) in enumerate(labelled)}
        # In archive order: a compressed tar is then read once, front to back.
        for entry in archive.files:
            if id(entry) in position:
                image = archive.read(entry)
                x[position[id(entry)]] = _decode_image(
                    image, entry.name, (height, width), channels, data_field
                )
    finally:
        archive.close()
    np.savez(target, x=x, y=y)
    return _Contents(
        example_count=len(x),
        validation_example_count=0,
        features=TensorSpecInfo("x", "uint8", (height, width, channels)),
        labels=TensorSpecInfo("y", "int64", ()),
        class_count=len(class_names),
        class_names=class_names,
    )


def _decode_image(
    data: bytes, name: str, size: tuple[int, int], channels: int, data_field: str
) -> np.ndarray:
    """One image as uint8 [height, width, channels], resized when it differs."""
    import tensorflow as tf

    dimensions = _image_dimensions(data)
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
            f"The image {name[:200]!r} cannot be decoded: {_tf_message(exc)}. Expected a valid BMP, "
            f"GIF, JPEG or PNG file.",
            reason="CORRUPT_IMAGE",
            field=data_field,
            metadata={"entry": name[:200]},
        ) from exc
    if tuple(image.shape[:2]) != size:
        resized = tf.image.resize(image, size, method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return image.numpy()
