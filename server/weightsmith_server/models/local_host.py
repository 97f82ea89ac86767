"""`LocalModelHost`: every model resident in this process, backed by the store."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from weightsmith_server.devices import Devices
from weightsmith_server.errors import NotFound, Unavailable
from weightsmith_server.models.creation import NewModel, materialize
from weightsmith_server.models.description import ModelInfo, describe
from weightsmith_server.models.host import ModelHost
from weightsmith_server.models.resident import ModelState, ResidentModel
from weightsmith_server.paging import page_after
from weightsmith_server.resources import ResourceTable
from weightsmith_server.revisions.commit import Change, ModelUnloaded, commit_change
from weightsmith_server.revisions.record import RevisionRecord
from weightsmith_server.store import Manifest, ModelRecord, StagedRevision, Store
from weightsmith_server.variables import model_variables

log = logging.getLogger(__name__)

T = TypeVar("T")


class LocalModelHost(ModelHost):
    """All models of a server, resident in this process.

    Args:
        store: The durable store every revision is committed to.
        devices: Where models can be placed.
        retain_revisions: Keep only this many revisions per model (0: all).
    """

    def __init__(self, store: Store, devices: Devices, retain_revisions: int = 0) -> None:
        self.store = store
        self.devices = devices
        self.retain_revisions = retain_revisions
        self._models: ResourceTable[ResidentModel] = ResourceTable(
            "model", "ListModels", lambda model_id: self.store.model_dir(model_id).exists()
        )
        # Stored models not in memory: loaded again on their next use.
        self._unloaded: set[str] = set()
        self._loading = threading.Lock()
        self.ready = False

    # --- lookup ----------------------------------------------------------------

    def _require_ready(self) -> None:
        if not self.ready:
            raise Unavailable(
                "The server is still restoring its models; retry in a moment.", reason="STARTING"
            )

    def _resident(self, model_id: str, field: str = "model_id") -> ResidentModel:
        """The resident model (loaded again if it was unloaded), or NotFound."""
        self._require_ready()
        resident = self._models.find(model_id)
        if resident is not None:
            return resident
        with self._loading:
            if model_id in self._unloaded:
                self._models.put(model_id, self._load(model_id))
                self._unloaded.discard(model_id)
        return self._models.get(model_id, field)

    def exists(self, model_id: str) -> bool:
        self._require_ready()
        return self._models.find(model_id) is not None or model_id in self._unloaded

    def describe(self, model_id: str, field: str = "model_id") -> ModelInfo:
        return describe(self._resident(model_id, field))

    def list(self, page_size: int, page_token: str) -> tuple[list[ModelInfo], str]:
        self._require_ready()
        ids = sorted({*(m.model_id for m in self._models.values()), *self._unloaded})
        page, token = page_after(ids, lambda k: k, page_size, page_token)
        # A model deleted since the ids were taken is left out, not an error.
        found = [self._models.find(k) or (self._resident(k) if k in self._unloaded else None) for k in page]
        return [describe(resident) for resident in found if resident is not None], token

    def placements(self) -> dict[str, list[str]]:
        placed: dict[str, list[str]] = {}
        for resident in self._models.values():
            placed.setdefault(resident.device, []).append(resident.model_id)
        return placed

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of weights held per device."""
        totals: dict[str, int] = {}
        for resident in self._models.values():
            totals[resident.device] = totals.get(resident.device, 0) + sum(
                v.nbytes for v in resident.state.manifest.variables
            )
        return totals

    def run(self, model_id: str, function: Callable[[ResidentModel], T], *, field: str = "model_id") -> T:
        return function(self._resident(model_id, field))

    def revision(
        self, model_id: str, revision: int, field: str = "revision", model_field: str = "model_id"
    ) -> tuple[int, Manifest]:
        state = self._resident(model_id, model_field).state
        if revision == 0 or revision == state.revision.revision:
            return state.revision.revision, state.manifest
        if revision < 0 or not self.store.has_revision(model_id, revision):
            raise NotFound(
                f"Model {model_id!r} has no revision {revision}; it is at revision "
                f"{state.revision.revision}. ListRevisions shows the retained ones.",
                reason="REVISION_NOT_FOUND",
                field=field,
                metadata={"model_id": model_id, "revision": str(revision)},
            )
        return revision, self.store.read_manifest(model_id, revision)

    def materialize(self, model_id: str, revision: int, device: str) -> ModelState:
        return materialize(self.store, model_id, revision, device)

    # --- lifecycle -------------------------------------------------------------

    def restore(self) -> None:
        """Load every stored model at its latest revision.

        A model that fails to load is reported (FAILED_PRECONDITION on use)
        rather than keeping the whole server from starting.
        """
        ids = self.store.model_ids()
        for model_id in ids:
            try:
                # Registered one by one: placement sees the models restored before this one.
                self._models.put(model_id, self._load(model_id))
            except Exception as exc:
                log.exception("model %s could not be restored", model_id)
                self._models.mark_unrestorable(model_id, f"{type(exc).__name__}: {exc}")
        self.ready = True
        log.info("restored %d of %d model(s)", len(self._models.values()), len(ids))

    def _load(self, model_id: str) -> ResidentModel:
        record = self.store.read_model(model_id)
        latest = self.store.revision_numbers(model_id)[-1]
        device = self.devices.choose(self.resident_bytes())
        return ResidentModel(record, device, materialize(self.store, model_id, latest, device))

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
            device = self.devices.choose(self.resident_bytes())
            keras_model = new.build(device)
            return describe(self._commit_new(model_id, new, keras_model, device))
        finally:
            self.release(model_id)

    def _commit_new(self, model_id: str, new: NewModel, keras_model: Any, device: str) -> ResidentModel:
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
            self.store.commit_model(folder, record)
        except BaseException:
            if not (self.store.model_dir(model_id) / "model.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                raise
            # Renamed into place before the failure: the model exists on disk, so
            # it must exist in memory too; then report the failure.
            self._register(record, device, ModelState.of(revision, committed, keras_model))
            raise
        resident = self._register(record, device, ModelState.of(revision, committed, keras_model))
        log.info("created model %s (%s) on %s", model_id, architecture, device)
        return resident

    def _register(self, record: ModelRecord, device: str, state: ModelState) -> ResidentModel:
        resident = ResidentModel(record, device, state)
        self._models.put(record.model_id, resident)
        return resident

    def delete(self, model_id: str) -> None:
        resident = self._resident(model_id)
        with resident.commit_lock:
            resident.check_not_busy()
            resident.deleted = True
            if not self._models.remove(model_id, resident):
                raise NotFound(f"No model with id {model_id!r}.", reason="MODEL_NOT_FOUND", field="model_id")
            self.store.delete_model(model_id)
        log.info("deleted model %s", model_id)

    def unload(self, model_id: str) -> None:
        resident = self._resident(model_id)
        with resident.commit_lock, self._loading:
            resident.check_not_busy()
            if self._models.remove(model_id, resident):
                resident.unloaded = True
                self._unloaded.add(model_id)
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
                resident = self._resident(model_id, f"{field_prefix}model_id")
            except BaseException:
                staged.discard()
                raise
            try:
                return commit_change(
                    resident,
                    staged,
                    prepare,
                    store=self.store,
                    reload=self._reload,
                    expected_revision=expected_revision,
                    field_prefix=field_prefix,
                    job_id=job_id,
                    retain_revisions=self.retain_revisions,
                )
            except ModelUnloaded:
                continue  # unloaded while this waited for its lock: commit to the reloaded model

    def _reload(self, resident: ResidentModel, revision: int) -> None:
        """Rebuild a model's state from the store at `revision` (after a failed install)."""
        resident.replace_state(materialize(self.store, resident.model_id, revision, resident.device))

    def reserve_for_job(self, model_id: str, job_id: str) -> bool:
        return self._resident(model_id).reserve_for_job(job_id)

    def release_job(self, model_id: str, job_id: str) -> None:
        self._resident(model_id).release_job(job_id)
