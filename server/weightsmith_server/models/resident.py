"""One model in memory: its committed state, and the locks that keep revisions whole.

Each model's committed state is an immutable `ModelState` that a commit
swaps in whole, so readers that take `resident.state` once see one revision
throughout. Variable values change in place on commit, under the write side
of the model's readers-writer lock; Predict holds the read side. Mutations of
one model are serialized by its commit lock, and each is durable on disk
before it becomes visible.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from weightsmith_server.errors import FailedPrecondition
from weightsmith_server.manifests import Manifest
from weightsmith_server.revisions.record import RevisionRecord
from weightsmith_server.rwlock import ReadWriteLock
from weightsmith_server.store import ModelRecord
from weightsmith_server.variables import model_variables
from weightsmith_server.zerocopy import adopt

if TYPE_CHECKING:
    from weightsmith_server.revisions.commit import Change


def manifest_bytes(manifest: Manifest) -> int:
    """Bytes of every variable a manifest lists."""
    return sum(v.nbytes for v in manifest.variables)


@dataclass(frozen=True)
class ModelState:
    """One committed revision of a resident model; swapped in whole on commit."""

    revision: RevisionRecord
    manifest: Manifest
    keras_model: Any
    variables: dict[str, Any]
    # Compiled runners (models/inference.py) by `output_layers` names, () for the
    # model alone; built on demand, kept across value-only commits (same variables).
    feature_models: dict[tuple[str, ...], Any] = field(default_factory=dict)

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of the revision's variables (computed once per state: a commit makes a new one)."""
        return manifest_bytes(self.manifest)

    @classmethod
    def of(cls, revision: RevisionRecord, manifest: Manifest, keras_model: Any) -> ModelState:
        """The state of a freshly built model whose variables hold `revision`'s values."""
        variables = {entry.path: v for entry, v in model_variables(keras_model)}
        return cls(revision, manifest, keras_model, variables)


class ResidentModel:
    """A model in memory, with the locks that keep its revisions whole."""

    def __init__(self, record: ModelRecord, device: str, state: ModelState) -> None:
        self.record = record
        self.model_id = record.model_id
        self.device = device
        self.state = state
        self.lock = ReadWriteLock()
        self.commit_lock = threading.Lock()
        # Set under `commit_lock`: a deleted model accepts no more commits, and an
        # unloaded one hands them to the model loaded in its place.
        self.deleted = False
        self.unloaded = False
        # The in-place job training this model, which alone may commit meanwhile.
        self.job: str | None = None
        # Calls using the model now (counted by the host under its lock): the
        # memory budget never unloads a model while this is above 0.
        self.users = 0
        self._warm(state)

    @property
    def revision(self) -> int:
        return self.state.revision.revision

    @property
    def nbytes(self) -> int:
        """Bytes of the committed revision's variables: what the memory budget counts."""
        return self.state.nbytes

    @property
    def idle(self) -> bool:
        """No call uses the model, no job holds it and no commit is under way: it may be unloaded."""
        return self.users == 0 and self.job is None and not self.commit_lock.locked()

    def reserve_for_job(self, job_id: str) -> bool:
        """Lock the model for an in-place job; False if another job holds it."""
        with self.commit_lock:
            if self.job not in (None, job_id):
                return False
            self.job = job_id
            return True

    def release_job(self, job_id: str) -> None:
        with self.commit_lock:
            if self.job == job_id:
                self.job = None

    def check_not_busy(self, field: str = "model_id", job_id: str | None = None) -> None:
        """FAILED_PRECONDITION while an in-place job (other than `job_id`) trains the model."""
        if self.job is not None and self.job != job_id:
            raise FailedPrecondition(
                f"Model {self.model_id!r} is being trained in place by job {self.job!r}; mutations wait "
                "until it ends (CancelJob stops it). Predict and ReadWeights keep working.",
                reason="MODEL_BUSY",
                field=field,
                metadata={"job_id": self.job},
            )

    def install(self, record: RevisionRecord, change: Change, manifest: Manifest) -> None:
        """Make a committed revision the resident state, atomically for readers.

        A rebuilt model gets its values before it becomes visible; otherwise
        the new values go into the live variables under the write lock.
        """
        if change.keras_model is not None:
            state = ModelState.of(record, manifest, change.keras_model)
            for path, value in change.values.items():
                adopt(state.variables[path], value)
            with self.lock.write():
                self.state = state
            self._warm(state)
            return
        state = self.state
        with self.lock.write():
            for path, value in change.values.items():
                adopt(state.variables[path], value)
            installed = ModelState(record, manifest, state.keras_model, state.variables, state.feature_models)
            if "nbytes" in state.__dict__:  # same shapes and dtypes: the cached size holds
                installed.__dict__["nbytes"] = state.__dict__["nbytes"]
            self.state = installed

    def replace_state(self, state: ModelState) -> None:
        """Install a state rebuilt from the store (after a failed install)."""
        with self.lock.write():
            self.state = state
        self._warm(state)

    def _warm(self, state: ModelState) -> None:
        """Queue the state's compiled Predict for the background warm-up, outside any request."""
        from weightsmith_server.models.warmup import WARM_UPS

        WARM_UPS.submit(self, state)
