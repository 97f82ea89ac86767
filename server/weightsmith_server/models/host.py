"""The model host seam: the one interface through which anything reaches a resident model.

Operations, edits, jobs and revisions never hold a model themselves; they
ask a host to look one up, create or delete it, run a function on it where
it lives, or commit a change to it. `LocalModelHost` keeps models in this
process; a cluster host keeps each in its own remote owner. Every method
blocks (TensorFlow and disk work) and is called from worker threads, never
from the event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

from weightsmith_server.devices import Devices
from weightsmith_server.manifests import Manifest
from weightsmith_server.models.creation import NewModel
from weightsmith_server.models.description import ModelInfo
from weightsmith_server.models.resident import ModelState, ResidentModel
from weightsmith_server.revisions.commit import Change
from weightsmith_server.revisions.record import RevisionRecord
from weightsmith_server.store import StagedRevision, Store

T = TypeVar("T")


class ModelHost(ABC):
    """Where models live: lookup, lifecycle, functions run on them, and commits.

    `store` is the durable store every host commits to and anyone may read
    committed revisions from (in a cluster, a volume shared by all nodes);
    only a model's host commits to it.
    """

    store: Store
    devices: Devices

    # --- lifecycle -------------------------------------------------------------

    @abstractmethod
    def restore(self) -> None:
        """Bring back every stored model at its latest revision; calls wait until then."""

    @abstractmethod
    def reserve(self, model_id: str, field: str) -> str:
        """Claim a new id (a fresh one when empty) for a model about to be created."""

    @abstractmethod
    def release(self, model_id: str) -> None:
        """Give up a reservation whose creation will not happen."""

    @abstractmethod
    def create(
        self, model_id: str, new: NewModel, *, field: str = "model_id", reserved: bool = False
    ) -> ModelInfo:
        """Build a model and commit its revision 1, under a new id (`reserved`: one already claimed).

        The id is released when this returns, whatever happens.
        """

    @abstractmethod
    def delete(self, model_id: str) -> None:
        """Remove a model from memory and, durably, from the store."""

    @abstractmethod
    def unload(self, model_id: str) -> None:
        """Drop a model from memory; it stays stored and is loaded again on its next use.

        FAILED_PRECONDITION while an in-place job trains it. The memory
        budget does the same on its own to least-recently-used idle models.
        """

    # --- reading ---------------------------------------------------------------

    @abstractmethod
    def exists(self, model_id: str) -> bool:
        """Whether a model with this id is stored (resident or not)."""

    @abstractmethod
    def describe(self, model_id: str, field: str = "model_id") -> ModelInfo:
        """What GetModel reports; an unloaded model is described without being loaded."""

    @abstractmethod
    def list(
        self, page_size: int, page_token: str, visible: Callable[[str], bool] | None = None
    ) -> tuple[list[ModelInfo], str]:
        """One page of models ordered by id (only ids `visible` accepts), and the next page's token.

        Models unloaded by the memory budget are listed too, without being loaded.
        """

    @abstractmethod
    def placements(self) -> dict[str, list[str]]:
        """The ids of the resident models on each device."""

    @abstractmethod
    def resident_bytes(self) -> dict[str, int]:
        """Bytes of resident models' variables on each device."""

    @abstractmethod
    def memory_budgets(self) -> dict[str, int]:
        """Each device's memory budget in bytes (0: none): past it, idle models are unloaded."""

    @abstractmethod
    def run(self, model_id: str, function: Callable[[ResidentModel], T], *, field: str = "model_id") -> T:
        """Run `function` on the resident model where it lives; it takes the locks it needs.

        The model is loaded first if it was unloaded, and stays resident while `function` runs.
        """

    @abstractmethod
    def revision(
        self, model_id: str, revision: int, field: str = "revision", model_field: str = "model_id"
    ) -> tuple[int, Manifest]:
        """A revision's number and manifest (0: the current one); NOT_FOUND if not retained."""

    @abstractmethod
    def materialize(self, model_id: str, revision: int, device: str) -> ModelState:
        """A separate copy of a committed revision's model, built from the store on `device`."""

    # --- committing --------------------------------------------------------------

    @abstractmethod
    def stage(self, model_id: str, field: str = "model_id") -> StagedRevision:
        """Start staging a new revision's files in the store."""

    @abstractmethod
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
        """Commit one revision through the commit path (`revisions.commit`), or nothing."""

    @abstractmethod
    def reserve_for_job(self, model_id: str, job_id: str) -> bool:
        """Lock a model for an in-place job; False if another job holds it."""

    @abstractmethod
    def release_job(self, model_id: str, job_id: str) -> None:
        """End an in-place job's hold on its model."""
