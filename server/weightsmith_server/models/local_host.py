"""`LocalModelHost`: the models of this process, resident within a memory budget, backed by the store.

Each device holds at most its memory budget of resident models' variables
(`MemoryBudget`); where a model goes and which idle models are unloaded for
it is `Placement` (models/placement.py). An unloaded model stays listed with
the description it had, and its next use reloads it from the store,
bit-exactly. Start-up lists the stored models without loading them, then
loads them in the background (`StoredModels`, models/restore.py).

`_lock` guards which models are resident, their users, the use order and
the bytes promised to placements under way; it is held briefly and never
while a model is built nor while TensorFlow imports. `_loading` serializes
loads (background and on demand), so one model is never loaded twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from weightsmith_server.devices import Devices
from weightsmith_server.dtypes import numpy_dtype
from weightsmith_server.errors import NotFound, Unavailable
from weightsmith_server.manifests import Manifest
from weightsmith_server.models.budget import MemoryBudget
from weightsmith_server.models.creation import NewModel, materialize
from weightsmith_server.models.description import ModelInfo, describe
from weightsmith_server.models.host import ModelHost
from weightsmith_server.models.placement import Promise
from weightsmith_server.models.resident import ModelState, ResidentModel, manifest_bytes
from weightsmith_server.models.restore import StoredModels
from weightsmith_server.paging import page_after
from weightsmith_server.resources import ResourceTable
from weightsmith_server.revisions.commit import Change, ModelUnloaded, commit_change
from weightsmith_server.revisions.record import RevisionRecord
from weightsmith_server.staging import trim_soon
from weightsmith_server.store import ModelRecord, StagedRevision, Store
from weightsmith_server.variables import model_variables

log = logging.getLogger(__name__)

T = TypeVar("T")


class LocalModelHost(StoredModels, ModelHost):
    """All models of a server, resident in this process within each device's memory budget.

    Args:
        store: The durable store every revision is committed to.
        devices: Where models can be placed, or their future while TensorFlow imports.
        start_devices: Starts what resolves that future (called on the first need of it).
        retain_revisions: Keep only this many revisions per model (0: all).
        memory_budget_bytes: Bytes of variables each device may hold (0: automatic, see `Devices.budgets`).
        device_wait_seconds: How long a call that needs TensorFlow waits for it to finish
            importing before it fails with UNAVAILABLE (STARTING).
    """

    def __init__(
        self,
        store: Store,
        devices: Devices | Future[Devices],
        retain_revisions: int = 0,
        memory_budget_bytes: int = 0,
        *,
        start_devices: Callable[[], None] | None = None,
        device_wait_seconds: float = 300.0,
    ) -> None:
        self.store = store
        if not isinstance(devices, Future):
            known: Future[Devices] = Future()
            known.set_result(devices)
            devices = known
        self._devices = devices
        self._start_devices = start_devices
        self._device_wait = device_wait_seconds
        self._memory_budget_bytes = memory_budget_bytes
        self._budgets_known = False
        self.retain_revisions = retain_revisions
        self.budget = MemoryBudget({})
        self._models: ResourceTable[ResidentModel] = ResourceTable(
            "model", "ListModels", lambda model_id: self.store.model_dir(model_id).exists()
        )
        # Stored models not in memory, with what GetModel says of them: loaded again on their next use.
        self._unloaded: dict[str, ModelInfo] = {}
        # Unloaded models described without inputs, outputs and layers (no cached signature):
        # completed by one build on the CPU when GetModel or ListModels first shows them.
        self._undescribed: set[str] = set()
        # Bytes promised to placements under way, per device.
        self._pending: dict[str, int] = {}
        self._lock = threading.RLock()
        self._loading = threading.Lock()
        self.ready = False

    @property
    def devices(self) -> Devices:
        """The devices, once TensorFlow has imported (waits up to `device_wait_seconds`).

        Never called under `_lock`: the wait would stall every lookup.
        """
        if self._start_devices is not None and not self._devices.done():
            self._start_devices()
        try:
            devices = self._devices.result(timeout=self._device_wait)
        except TimeoutError:
            raise Unavailable(
                "The server is still starting TensorFlow; retry in a moment.", reason="STARTING"
            ) from None
        except Exception as exc:
            raise Unavailable(
                f"The server's devices could not be initialized: {type(exc).__name__}: {exc}",
                reason="STARTING",
            ) from None
        if not self._budgets_known:
            with self._lock:
                if not self._budgets_known:
                    self.budget.configure(devices.budgets(self._memory_budget_bytes))
                    self._budgets_known = True
        return devices

    @property
    def devices_future(self) -> Future[Devices]:
        """The devices as they become known (an exception if TensorFlow or the policy failed)."""
        return self._devices

    @property
    def tensorflow_ready(self) -> bool:
        """Whether the devices are known (TensorFlow imported), without waiting."""
        return self._devices.done() and self._devices.exception() is None

    # --- lookup ----------------------------------------------------------------

    def _require_ready(self) -> None:
        if not self.ready:
            raise Unavailable(
                "The server is still restoring its models; retry in a moment.", reason="STARTING"
            )

    def _acquire(self, model_id: str, field: str) -> ResidentModel:
        """The resident model, in use until `_release` (loaded again if it was unloaded), or NotFound."""
        self._require_ready()
        while True:
            with self._lock:
                resident = self._models.find(model_id)
                if resident is not None:
                    resident.users += 1
                    self.budget.touch(model_id)
                    return resident
                if model_id not in self._unloaded:
                    self._models.get(model_id, field)  # raises: NOT_FOUND or UNRESTORABLE
                    continue
            loaded = self._reload(model_id)
            if loaded is not None:
                return loaded

    def _release(self, resident: ResidentModel) -> None:
        with self._lock:
            resident.users -= 1

    @contextlib.contextmanager
    def _using(self, model_id: str, field: str = "model_id") -> Iterator[ResidentModel]:
        """The resident model, never unloaded by the budget while this block runs."""
        resident = self._acquire(model_id, field)
        try:
            yield resident
        finally:
            self._release(resident)

    def exists(self, model_id: str) -> bool:
        self._require_ready()
        return self._models.find(model_id) is not None or model_id in self._unloaded

    def _lookup(self, model_id: str, field: str) -> ResidentModel | ModelInfo:
        """The resident model, or an unloaded one's description: neither loaded nor counted as a use."""
        self._require_ready()
        with self._lock:
            resident = self._models.find(model_id)
            if resident is not None:
                return resident
            info = self._unloaded.get(model_id)
            if info is not None:
                return info
            return self._models.get(model_id, field)  # raises: NOT_FOUND or UNRESTORABLE

    def describe(self, model_id: str, field: str = "model_id") -> ModelInfo:
        # Metadata only: GetModel neither reloads a model nor keeps it resident.
        found = self._lookup(model_id, field)
        if isinstance(found, ResidentModel):
            return describe(found)
        return self._complete(found)

        """The CPU device name, once TensorFlow has imported (a build before would skip `--device`)."""
        self.devices  # noqa: B018 - waits for TensorFlow and the device policy
        return "/device:CPU:0"

    def list(
        self, page_size: int, page_token: str, visible: Callable[[str], bool] | None = None
    ) -> tuple[list[ModelInfo], str]:
        self._require_ready()
        with self._lock:
            ids = sorted({*(m.model_id for m in self._models.values()), *self._unloaded})
        if visible is not None:
            ids = [model_id for model_id in ids if visible(model_id)]
        page, token = page_after(ids, lambda k: k, page_size, page_token)
        found: list[ModelInfo] = []
        for model_id in page:
            with self._lock:
                resident = self._models.find(model_id)
                info = self._unloaded.get(model_id)
            # A model deleted since the ids were taken is left out, not an error.
            if resident is not None:
                found.append(describe(resident))
            elif info is not None:
                # Never waits for TensorFlow: an uncached signature is completed once it is up.
                found.append(self._complete(info) if self.tensorflow_ready else info)
        return found, token

    def placements(self) -> dict[str, list[str]]:
        placed: dict[str, list[str]] = {}
        for resident in self._models.values():
            placed.setdefault(resident.device, []).append(resident.model_id)
        return placed

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of weights held per device."""
        totals: dict[str, int] = {}
        for resident in self._models.values():
            totals[resident.device] = totals.get(resident.device, 0) + resident.nbytes
        return totals

    def memory_budgets(self) -> dict[str, int]:
        """Each device's memory budget in bytes (0: none)."""
        devices = self.devices.devices
        return {d.name: self.budget.budget(d.name) for d in devices}

    def run(self, model_id: str, function: Callable[[ResidentModel], T], *, field: str = "model_id") -> T:
        with self._using(model_id, field) as resident:
            return function(resident)

    def revision(
        self, model_id: str, revision: int, field: str = "revision", model_field: str = "model_id"
    ) -> tuple[int, Manifest]:
        found = self._lookup(model_id, model_field)
        if isinstance(found, ResidentModel):
            state = found.state
            current = state.revision.revision
            if revision in (0, current):
                return current, state.manifest
        else:
            current = found.revision  # unloaded: its latest stored revision, read without a reload
        number = revision or current
        if number < 0 or not self.store.has_revision(model_id, number):
            raise NotFound(
                f"Model {model_id!r} has no revision {revision}; it is at revision "
                f"{current}. ListRevisions shows the retained ones.",
                reason="REVISION_NOT_FOUND",
                field=field,
                metadata={"model_id": model_id, "revision": str(revision)},
            )
        return number, self.store.read_manifest(model_id, number)

    def materialize(self, model_id: str, revision: int, device: str) -> ModelState:
        self.devices  # noqa: B018 - waits for TensorFlow and the device policy
        return materialize(self.store, model_id, revision, device)

    # --- lifecycle -------------------------------------------------------------

    def reserve(self, model_id: str, field: str) -> str:
        self._require_ready()
        return self._models.reserve(model_id, field)

    def release(self, model_id: str) -> None:
        self._models.release(model_id)

    def create(
        self, model_id: str, new: NewModel, *, field: str = "model_id", reserved: bool = False
    ) -> ModelInfo:
        if not reserved:
            model_id = self.reserve(model_id, field)
        try:
            # What the config declares is checked before anything is allocated; the
            # model is built where the most budget is free, and placed by its real size.
            names = [d.name for d in self.devices.devices]  # first: waits for TensorFlow and the policy
            self.budget.refuse_oversized(new.declared_bytes(), names)
            with self._lock:
                device = self.budget.roomiest(
                    {d: n + self._pending.get(d, 0) for d, n in self.resident_bytes().items()},
                    names,
                )
            keras_model = new.build(device)
            promise = self._place(_variable_bytes(keras_model), [device])
            try:
                resident = self._commit_new(model_id, new, keras_model, promise)
            finally:
                self._settle(promise)
            return describe(resident)
        finally:
            self.release(model_id)

    def _commit_new(self, model_id: str, new: NewModel, keras_model: Any, promise: Promise) -> ResidentModel:
        """Write revision 1 durably, then make the model resident."""
        entries = model_variables(keras_model)
        architecture = new.architecture or type(keras_model).__name__
        folder, staged = self.store.stage_model()
        try:
            records = tuple(staged.add_tensor(entry, np.asarray(v.numpy())) for entry, v in entries)
            manifest = Manifest(layer_count=len(keras_model.layers), variables=records)
            draft = dataclasses.replace(
                new.draft,
                summary=f"{new.draft.kind} {architecture}: {len(records)} variables, "
                f"{sum(r.nbytes for r in records)} bytes",
                changed_variables=[r.path for r in records],
                architecture_changed=True,
            )
            revision = draft.record(model_id, 1, None, staged.stored_bytes)
            committed = staged.commit(revision, manifest, keras_model.to_json())
            record = ModelRecord(model_id, architecture, str(new.source), revision.create_time)
            self.store.commit_model(folder, record, new.files)
        except BaseException:
            if not (self.store.model_dir(model_id) / "model.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                raise
            # Renamed into place before the failure: the model exists on disk, so
            # it must exist in memory too; then report the failure.
            state = ModelState.of(revision, committed, keras_model)
            self._register(ResidentModel(record, promise.device, state), promise)
            raise
        state = ModelState.of(revision, committed, keras_model)
        resident = self._register(ResidentModel(record, promise.device, state), promise)
        self._cache_signature(model_id, state)
        trim_soon()
        log.info("created model %s (%s) on %s", model_id, architecture, promise.device)
        return resident

    def delete(self, model_id: str) -> None:
        self._require_ready()
        with self._loading:  # an unloaded model is deleted as it is: no reload meanwhile
            with self._lock:
                info = self._unloaded.pop(model_id, None)
                undescribed = model_id in self._undescribed
                self._undescribed.discard(model_id)
            if info is not None:
                try:
                    self.store.delete_model(model_id)
                except BaseException:
                    with self._lock:
                        self._unloaded[model_id] = info
                        if undescribed:
                            self._undescribed.add(model_id)
                    raise
                with self._lock:
                    self.budget.forget(model_id)
                log.info("deleted model %s (not resident)", model_id)
                return
        with self._using(model_id) as resident, resident.commit_lock:
            resident.check_not_busy()
            resident.deleted = True
            with self._lock:
                removed = self._models.remove(model_id, resident)
                self.budget.forget(model_id)
            if not removed:
                raise NotFound(f"No model with id {model_id!r}.", reason="MODEL_NOT_FOUND", field="model_id")
            self.store.delete_model(model_id)
        log.info("deleted model %s", model_id)

    def unload(self, model_id: str) -> None:
        self._require_ready()
        with self._lock:
            resident = self._models.find(model_id)
            if resident is None:
                if model_id in self._unloaded:
                    return
                resident = self._models.get(model_id, "model_id")  # raises: NOT_FOUND or UNRESTORABLE
        with resident.commit_lock, self._lock:
            resident.check_not_busy()
            self._drop(resident)
        gc.collect()
        log.info("unloaded model %s", model_id)

    # --- committing --------------------------------------------------------------

    def stage(self, model_id: str, field: str = "model_id") -> StagedRevision:
        try:
            return self.store.stage_revision(model_id)
        except FileNotFoundError:
            raise NotFound(
                f"Model {model_id!r} was deleted.", reason="MODEL_NOT_FOUND", field=field
            ) from None

    def commit(
        self,
        model_id: str,
        staged: StagedRevision,
        prepare: Callable[[ResidentModel], Change],
        *,
        expected_revision: int | None,
        field_prefix: str = "",
        job_id: str | None = None,
    ) -> RevisionRecord:
        while True:
            try:
                resident = self._acquire(model_id, f"{field_prefix}model_id")
            except BaseException:
                staged.discard()
                raise
            try:
                return self._commit_within_budget(
                    resident,
                    staged,
                    prepare,
                    expected_revision=expected_revision,
                    field_prefix=field_prefix,
                    job_id=job_id,
                )
            except ModelUnloaded:
                continue  # unloaded while this waited for its lock: commit to the reloaded model
            finally:
                self._release(resident)

    def _commit_within_budget(
        self,
        resident: ResidentModel,
        staged: StagedRevision,
        prepare: Callable[[ResidentModel], Change],
        *,
        expected_revision: int | None,
        field_prefix: str,
        job_id: str | None,
    ) -> RevisionRecord:
        """`commit_change`, where a change that grows the model (surgery) first makes room for it.

        The room is made before the commit's point of no return: without it
        the call fails with RESOURCE_EXHAUSTED and nothing is committed.
        """
        grown: Promise | None = None

        def within_budget(current: ResidentModel) -> Change:
            nonlocal grown
            change = prepare(current)
            if change.keras_model is None:
                return change  # values only: every shape and dtype, so the size, is unchanged
            growth = manifest_bytes(change.manifest) - current.nbytes
            if growth > 0:
                grown = self._place(growth, [current.device])
            return change

        try:
            committed = commit_change(
                resident,
                staged,
                within_budget,
                store=self.store,
                reload=self._rebuild,
                expected_revision=expected_revision,
                field_prefix=field_prefix,
                job_id=job_id,
                retain_revisions=self.retain_revisions,
            )
        finally:
            self._settle(grown)
        if committed.architecture_revision == committed.revision:  # surgery: cache the new signature now
            state = resident.state
            if state.revision.revision == committed.revision:
                self._cache_signature(resident.model_id, state)
        return committed

    def _rebuild(self, resident: ResidentModel, revision: int) -> None:
        """Rebuild a model's state from the store at `revision` (after a failed install)."""
        resident.replace_state(materialize(self.store, resident.model_id, revision, resident.device))

    def reserve_for_job(self, model_id: str, job_id: str) -> bool:
        # Held by a job, a model is never unloaded by the memory budget.
        with self._using(model_id) as resident:
            return resident.reserve_for_job(job_id)

    def release_job(self, model_id: str, job_id: str) -> None:
        found = self._lookup(model_id, "model_id")
        if isinstance(found, ResidentModel):  # an unloaded model is held by no job
            found.release_job(job_id)


def _variable_bytes(keras_model: Any) -> int:
    """Bytes of a built model's variables, as its manifest will count them."""
    return sum(
        int(np.prod(variable.shape, dtype=np.int64)) * numpy_dtype(str(variable.dtype)).itemsize
        for _, variable in model_variables(keras_model)
    )
