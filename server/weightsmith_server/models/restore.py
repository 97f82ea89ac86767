"""Stored models into memory: the listing at start-up, the background restore, reloads.

Start-up never waits for the models, nor for TensorFlow: `index` lists
every stored model from its files alone (manifest, revision, the cached
signature; no TensorFlow), and from then on calls are answered. TensorFlow
imports in the background; `restore_stored` then loads the stored models,
most recently committed first, while they fit in the budget without
unloading anything. Meanwhile a call that needs a model not yet resident
loads it first through `_reload`, the same path as a model the budget
unloaded, waiting for TensorFlow if it must. `_loading` serializes loads
(background and on demand), so one model is never loaded twice.

`StoredModels` is a part of `LocalModelHost` (models/local_host.py), which
owns the attributes declared here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from weightsmith_server.errors import ResourceExhausted, Unavailable
from weightsmith_server.models.architecture import rebuild
from weightsmith_server.models.budget import MemoryBudget
from weightsmith_server.models.creation import materialize
from weightsmith_server.models.description import (
    ModelInfo,
    describe_stored,
    read_signature,
    signature_of,
    write_signature,
)
from weightsmith_server.models.placement import Placement
from weightsmith_server.models.resident import ModelState, ResidentModel
from weightsmith_server.resources import ResourceTable
from weightsmith_server.staging import trim_soon
from weightsmith_server.store import Store

log = logging.getLogger(__name__)


class StoredModels(Placement):
    """Listing, restoring and reloading stored models (a part of `LocalModelHost`)."""

    store: Store
    budget: MemoryBudget
    ready: bool
    _lock: threading.RLock
    _loading: threading.Lock
    _models: ResourceTable[ResidentModel]
    _unloaded: dict[str, ModelInfo]
    _undescribed: set[str]

    def _cpu(self) -> str:
        """The CPU device name, once TensorFlow has imported (a build before would skip `--device`)."""
        self.devices  # noqa: B018 - waits for TensorFlow and the device policy
        return "/device:CPU:0"

    def _complete(self, info: ModelInfo) -> ModelInfo:
        """An unloaded model's description with its inputs, outputs and layers (built once if not cached)."""
        if info.model_id not in self._undescribed:
            return info
        try:
            revision = self.store.read_revision(info.model_id, info.revision)
            signature = signature_of(
                rebuild(
                    self.store.read_architecture(info.model_id, info.revision),
                    device=self._cpu(),
                    initialize=False,  # described, never run: no variable allocated
                )
            )
        except FileNotFoundError:  # deleted meanwhile: describe it as it was
            return info
        write_signature(self.store.model_dir(info.model_id), revision.architecture_revision, signature)
        complete = dataclasses.replace(
            info, inputs=signature.inputs, outputs=signature.outputs, layers=signature.layers
        )
        with self._lock:
            if self._unloaded.get(info.model_id) is info:
                self._unloaded[info.model_id] = complete
                self._undescribed.discard(info.model_id)
        return complete

    def _reload(self, model_id: str) -> ResidentModel | None:
        """Load an unloaded model again at its latest revision, making room for it first.

        Returns it in use by the caller (see `_acquire`), or None if it was
        loaded or deleted while this waited.
        """
        with self._loading:
            with self._lock:
                info = self._unloaded.get(model_id)
            if info is None:
                return None
            promise = self._place(info.weight_bytes)
            try:
                resident = self._register(self._load(model_id, promise.device), promise, users=1)
            finally:
                self._settle(promise)
        log.info("reloaded model %s on %s", model_id, promise.device)
        return resident

    def restore(self) -> None:
        """`index` then `restore_stored`: every stored model listed, then loaded as the budget allows."""
        self.index()
        self.restore_stored()

    def index(self) -> None:
        """List every stored model from its files, none loaded, no TensorFlow: then calls are answered.

        Each is described from its manifest, revision and cached signature
        (`describe_stored`), and placed in the use order by its last commit.
        A model whose files cannot be read is reported (FAILED_PRECONDITION on
        use) rather than keeping the whole server from starting.
        """
        ids = self.store.model_ids()
        found: list[tuple[ModelInfo, bool]] = []
        for model_id in ids:
            try:
                found.append(self._index_one(model_id))
            except Exception as exc:
                log.exception("model %s could not be restored", model_id)
                self._models.mark_unrestorable(model_id, f"{type(exc).__name__}: {exc}")
        found.sort(key=lambda item: item[0].update_time)  # oldest first: the newest is the most recent use
        with self._lock:
            for info, described in found:
                self._unloaded[info.model_id] = info
                if not described:
                    self._undescribed.add(info.model_id)
                self.budget.touch(info.model_id)
        self.ready = True
        log.info("listed %d stored model(s), %d unreadable", len(found), len(ids) - len(found))

    def _index_one(self, model_id: str) -> tuple[ModelInfo, bool]:
        """A stored model's description, and whether its signature was cached."""
        record = self.store.read_model(model_id)
        latest = self.store.revision_numbers(model_id)[-1]
        revision = self.store.read_revision(model_id, latest)
        manifest = self.store.read_manifest(model_id, latest)
        signature = read_signature(self.store.model_dir(model_id), revision.architecture_revision)
        return describe_stored(record, revision, manifest, signature), signature is not None

    def restore_stored(self, stopping: threading.Event | None = None) -> None:
        """Load the listed models not yet resident, most recently committed first, in the background.

        Each is loaded only if it fits without unloading anything (the others
        stay listed and load on their first use); the loop yields `_loading`
        between models, so a call's on-demand load waits for one load at most.
        A model that fails to load is reported (FAILED_PRECONDITION on use).
        It first waits for TensorFlow, so that its end (`weightsmith.models`
        SERVING) means calls wait for nothing, even with no model stored.
        """
        self.devices  # noqa: B018  # starts and waits for the import; Unavailable if it failed
        with self._lock:
            order = sorted(self._unloaded, key=self.budget.last_use, reverse=True)
        loaded = 0
        for model_id in order:
            if stopping is not None and stopping.is_set():
                return
            try:
                loaded += self._restore_one(model_id)
            except ResourceExhausted:
                continue
            except Unavailable:
                raise  # TensorFlow failed: nothing can load
            except Exception as exc:
                log.exception("model %s could not be restored", model_id)
                with self._lock:
                    if self._unloaded.pop(model_id, None) is not None:
                        self._undescribed.discard(model_id)
                        self._models.mark_unrestorable(model_id, f"{type(exc).__name__}: {exc}")
        for model_id in sorted(self._undescribed):  # left unloaded by the budget, signature not cached
            if stopping is not None and stopping.is_set():
                return
            with self._lock:
                info = self._unloaded.get(model_id)
            if info is not None:
                self._complete(info)
        log.info(
            "restored %d model(s) in the background; %d left unloaded by the memory budget",
            loaded,
            len(self._unloaded),
        )

    def _restore_one(self, model_id: str) -> bool:
        """Load one listed model if it is still unloaded and fits without unloading others."""
        with self._loading:
            with self._lock:
                info = self._unloaded.get(model_id)
            if info is None:
                return False  # loaded on demand or deleted meanwhile
            promise = self._place(info.weight_bytes, unload=False)
            try:
                self._register(self._load(model_id, promise.device), promise, touch=False)
            finally:
                self._settle(promise)
        return True

    def _load(self, model_id: str, device: str) -> ResidentModel:
        record = self.store.read_model(model_id)
        latest = self.store.revision_numbers(model_id)[-1]
        state = materialize(self.store, model_id, latest, device)
        self._cache_signature(model_id, state)
        trim_soon()  # the build's and the load's temporary copies: back to the system
        return ResidentModel(record, device, state)

    def _cache_signature(self, model_id: str, state: ModelState) -> None:
        """Write the signature of a state's architecture if it is not cached yet (see `description`)."""
        folder = self.store.model_dir(model_id)
        number = state.revision.architecture_revision
        if read_signature(folder, number) is None:
            write_signature(folder, number, signature_of(state.keras_model))
