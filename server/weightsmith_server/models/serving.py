"""A model's serving settings (its Predict batching policy), kept apart from its revisions.

A model's own settings live in `models/<id>/serving.json`: committed with
revision 1 when a model is created with them, written atomically (a
temporary file, fsync, rename, fsync of the folder) before an update is
acknowledged, read lazily on a model's first use after start-up (plain JSON,
no TensorFlow), and gone with the model's folder when it is deleted. A policy
change is no weight revision: it neither creates one nor follows RevertModel.
Fields the model does not set follow the server's defaults (`--batch-max-size`,
`--batch-wait-ms`), including defaults changed by a restart.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from weightsmith_server.durable import fsync_path, read_json, write_compact_json
from weightsmith_server.errors import InvalidArgument, NotFound
from weightsmith_server.limits import excerpt
from weightsmith_server.models.batching import BatchingPolicy

log = logging.getLogger(__name__)

FILE_NAME = "serving.json"
# Bounds of a model's own fields: the flags' bounds (`--batch-max-size` at least 1,
# `--batch-wait-ms` 0 to 1000), and at most 65536 rows so a typo cannot ask for a giant batch.
MAX_BATCH_SIZE = 65536
MAX_WAIT_MS = 1000.0
# UpdateModel's `update_mask` paths and the fields each one sets.
MASK_PATHS: dict[str, tuple[str, ...]] = {
    "*": ("max_batch_size", "max_wait_ms"),
    "batching": ("max_batch_size", "max_wait_ms"),
    "batching.max_batch_size": ("max_batch_size",),
    "batching.max_wait_seconds": ("max_wait_ms",),
}


@dataclass(frozen=True)
class BatchingOverrides:
    """A model's own batching fields; None: the server's default."""

    max_batch_size: int | None = None
    max_wait_ms: float | None = None

    def effective(self, default: BatchingPolicy) -> BatchingPolicy:
        """The policy in effect: the model's own fields, the server's defaults for the others."""
        return BatchingPolicy(
            default.max_batch_size if self.max_batch_size is None else self.max_batch_size,
            default.max_wait_ms if self.max_wait_ms is None else self.max_wait_ms,
        )

    def merged(self, update: BatchingOverrides, fields: tuple[str, ...] | None) -> BatchingOverrides:
        """These fields updated: `fields` named (unset in `update`: back to the default), or, for None,
        the fields set in `update`."""
        size, wait = self.max_batch_size, self.max_wait_ms
        if fields is None:
            fields = tuple(
                name for name in ("max_batch_size", "max_wait_ms") if getattr(update, name) is not None
            )
        if "max_batch_size" in fields:
            size = update.max_batch_size
        if "max_wait_ms" in fields:
            wait = update.max_wait_ms
        return BatchingOverrides(size, wait)


def validate(overrides: BatchingOverrides, field: str = "batching") -> BatchingOverrides:
    """The overrides if in range, else INVALID_ARGUMENT naming the field (nothing is changed)."""
    size, wait = overrides.max_batch_size, overrides.max_wait_ms
    if size is not None and not 1 <= size <= MAX_BATCH_SIZE:
        raise InvalidArgument(
            f"max_batch_size must be 1 to {MAX_BATCH_SIZE} (1 turns batching off), received {size}.",
            reason="INVALID_BATCHING_POLICY",
            field=f"{field}.max_batch_size",
        )
    if wait is not None and not (0 <= wait <= MAX_WAIT_MS):  # also refuses NaN
        raise InvalidArgument(
            f"max_wait_seconds must be 0 to {MAX_WAIT_MS / 1000:g}, received {wait / 1000!r}.",
            reason="INVALID_BATCHING_POLICY",
            field=f"{field}.max_wait_seconds",
        )
    return overrides


def _is_model(folder: Path) -> bool:
    """Whether `folder` holds a committed model; False for any name the file system refuses."""
    try:
        return (folder / "model.json").is_file()
    except OSError:  # e.g. a name too long for the file system: no such model
        return False


def _payload(overrides: BatchingOverrides) -> dict[str, float | int | None]:
    """What `serving.json` holds: the model's own fields, null for those it leaves to the defaults."""
    return {"max_batch_size": overrides.max_batch_size, "max_wait_ms": overrides.max_wait_ms}


def mask_fields(paths: list[str]) -> tuple[str, ...] | None:
    """The fields an `update_mask` names (None for an empty mask), or INVALID_ARGUMENT for an unknown path."""
    if not paths:
        return None
    fields: list[str] = []
    for index, path in enumerate(paths):
        named = MASK_PATHS.get(path)
        if named is None:
            raise InvalidArgument(
                f"Unknown update_mask path {excerpt(path)!r}; updatable: {', '.join(sorted(MASK_PATHS))}.",
                reason="INVALID_UPDATE_MASK",
                field=f"update_mask.paths[{index}]",
            )
        fields.extend(f for f in named if f not in fields)
    return tuple(fields)


class ServingSettings:
    """Every model's own batching fields: cached in memory, one durable file per model.

    Thread-safe. `get` caches what it reads; `put` writes then caches; `forget`
    drops a deleted model's entry (a generation counter keeps a read racing a
    delete from caching the deleted model's settings).
    """

    def __init__(self, model_dir: Callable[[str], Path]) -> None:
        self._model_dir = model_dir
        self._lock = threading.Lock()
        self._updating = threading.Lock()  # serializes read-merge-write of UpdateModel
        self._cache: dict[str, BatchingOverrides] = {}
        self._generation: dict[str, int] = {}

    def cached(self, model_id: str) -> BatchingOverrides | None:
        """The cached settings, without touching the disk (for the event loop)."""
        return self._cache.get(model_id)

    def get(self, model_id: str) -> BatchingOverrides:
        """The model's own settings (none set: all None), read from its folder on first use."""
        found = self._cache.get(model_id)
        if found is not None:
            return found
        with self._lock:
            generation = self._generation.get(model_id, 0)
        folder = self._model_dir(model_id)
        try:
            payload = read_json(folder / FILE_NAME)
            size, wait = payload.get("max_batch_size"), payload.get("max_wait_ms")
            if (size is not None and type(size) is not int) or (
                wait is not None and type(wait) not in (int, float)
            ):
                raise ValueError(f"{FILE_NAME} of {model_id!r} holds {payload!r}")
            found = validate(BatchingOverrides(size, None if wait is None else float(wait)))
            exists = True
        except FileNotFoundError:
            found = BatchingOverrides()
            exists = _is_model(folder)  # unknown ids are not cached
        except (OSError, ValueError, TypeError, AttributeError, InvalidArgument):
            # Unreadable or out of range (edited by hand): the defaults, not an outage, and cached.
            log.warning("model %s: ignoring an unreadable %s", model_id, FILE_NAME, exc_info=True)
            found = BatchingOverrides()
            exists = _is_model(folder)
        if exists:
            with self._lock:
                if self._generation.get(model_id, 0) == generation:
                    self._cache.setdefault(model_id, found)
        return found

    @staticmethod
    def files(overrides: BatchingOverrides | None) -> dict[str, dict[str, float | int | None]]:
        """The files a new model's folder starts with (committed with its revision 1): its own settings."""
        if overrides is None or overrides == BatchingOverrides():
            return {}
        return {FILE_NAME: _payload(overrides)}

    def remember(self, model_id: str, overrides: BatchingOverrides | None) -> None:
        """Cache a just-created model's settings (what `files` gave its folder)."""
        with self._lock:
            self._cache[model_id] = overrides or BatchingOverrides()

    def put(self, model_id: str, overrides: BatchingOverrides) -> None:
        """Write the model's settings durably, then cache them; NOT_FOUND if its folder is gone."""
        folder = self._model_dir(model_id)
        with self._lock:
            if overrides == BatchingOverrides() and not (folder / FILE_NAME).exists():
                self._cache[model_id] = overrides  # nothing to write: the defaults are the default
                return
            temp = folder / f".serving-{uuid.uuid4().hex}.json"  # a scratch name the store cleans up
            payload = _payload(overrides)
            try:
                write_compact_json(temp, payload)
                os.rename(temp, folder / FILE_NAME)
                fsync_path(folder)
            except FileNotFoundError as exc:  # deleted meanwhile
                temp.unlink(missing_ok=True)
                raise NotFound(
                    f"No model with id {model_id!r}.", reason="MODEL_NOT_FOUND", field="model_id"
                ) from exc
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            self._cache[model_id] = overrides

    def update(
        self, model_id: str, update: BatchingOverrides, fields: tuple[str, ...] | None
    ) -> BatchingOverrides:
        """Merge `update` into the model's settings and write them; two updates never lose a field."""
        with self._updating:
            merged = self.get(model_id).merged(update, fields)
            self.put(model_id, merged)
            return merged

    def forget(self, model_id: str) -> None:
        """Drop a deleted model's cached settings (its file went with its folder)."""
        with self._lock:
            self._cache.pop(model_id, None)
            self._generation[model_id] = self._generation.get(model_id, 0) + 1
