"""The one commit path: how a mutation becomes a durable, then visible, revision.

Every mutation of a resident model (weight write, edit batch, revert, job
result) hands the model host a staged revision and a `prepare` function.
Under the model's commit lock, `commit_change` checks the model still
exists, is not busy and is at the expected revision, lets `prepare` build
the `Change` from the model's current state (stable under that lock), renames the staged folder into place
(the point of no return: the store's fence, since the rename fails when the
number exists) and only then installs the values in memory. Before the
rename any failure discards the staging folder; after it, memory is
brought in step with disk before the failure is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from weightsmith_server.errors import Aborted, NotFound
from weightsmith_server.manifests import Manifest, VariableRecord
from weightsmith_server.revisions.record import RevisionDraft, RevisionRecord
from weightsmith_server.store import StagedRevision, Store

if TYPE_CHECKING:
    from weightsmith_server.models.resident import ResidentModel

log = logging.getLogger(__name__)


@dataclass
class Change:
    """A revision ready to commit, built by a mutation from the current state.

    `manifest` lists every variable (staged entries not yet under a revision folder);
    `values` holds the new values by path. When the architecture changes,
    `architecture_json` is its config and `keras_model` the rebuilt model,
    and `values` covers every one of its variables.
    """

    draft: RevisionDraft
    manifest: Manifest
    values: dict[str, np.ndarray]
    architecture_json: str | None = None
    keras_model: Any = None


def stage_values(staged: StagedRevision, current: Manifest, values: Mapping[str, np.ndarray]) -> Manifest:
    """Write `values` into `staged`; every other variable keeps the file it has."""
    return replace_entries(
        current,
        {v.path: staged.add_tensor(v.entry, values[v.path]) for v in current.variables if v.path in values},
    )


def replace_entries(current: Manifest, entries: Mapping[str, VariableRecord]) -> Manifest:
    """`current` with the entries of the changed variables replaced, in model order."""
    return Manifest(
        layer_count=current.layer_count,
        variables=tuple(entries.get(v.path, v) for v in current.variables),
    )


class ModelUnloaded(Exception):
    """The resident model was unloaded before the commit took its lock; the host retries."""


def check_expected_revision(resident: ResidentModel, expected: int | None, field: str) -> None:
    """Raise `Aborted` when the model moved past the revision the caller expects."""
    if expected is not None and expected != resident.revision:
        raise Aborted(
            f"Model {resident.model_id!r} is at revision {resident.revision}, not the expected "
            f"revision {expected}; re-read it and retry.",
            reason="REVISION_MISMATCH",
            field=field,
            metadata={"current_revision": str(resident.revision), "expected_revision": str(expected)},
        )


def commit_change(
    resident: ResidentModel,
    staged: StagedRevision,
    prepare: Callable[[ResidentModel], Change],
    *,
    store: Store,
    reload: Callable[[ResidentModel, int], None],
    expected_revision: int | None,
    field_prefix: str = "",
    job_id: str | None = None,
    retain_revisions: int = 0,
) -> RevisionRecord:
    """Commit one new revision of a resident model, or nothing at all (see the module docstring)."""
    with resident.commit_lock:
        if resident.unloaded:
            raise ModelUnloaded(resident.model_id)
        number = resident.revision + 1
        try:
            # A staging folder gone with its model's folder: deleted (and maybe re-created) meanwhile.
            if resident.deleted or not staged.dir.is_dir():
                raise NotFound(
                    f"Model {resident.model_id!r} was deleted while the change was in progress.",
                    reason="MODEL_NOT_FOUND",
                    field=f"{field_prefix}model_id",
                )
            resident.check_not_busy(f"{field_prefix}model_id", job_id)
            check_expected_revision(resident, expected_revision, f"{field_prefix}expected_revision")
            change = prepare(resident)
            record = change.draft.record(
                resident.model_id, number, resident.state.revision, staged.stored_bytes
            )
            committed = staged.commit(
                record, change.manifest, change.architecture_json, parent=resident.state.manifest
            )
        except BaseException:
            if not staged.renamed:
                staged.discard()
                raise
            log.exception("model %s: revision %d committed, then a step failed", resident.model_id, number)
            reload(resident, number)
            raise
        try:
            resident.install(record, change, committed)
        except Exception:
            log.exception("model %s: installing revision %d failed; reloading it", resident.model_id, number)
            reload(resident, number)
        if retain_revisions:
            try:
                store.retain(resident.model_id, retain_revisions)
            except Exception:  # the revision is committed: retention failing must not report otherwise
                log.exception("model %s: dropping old revisions failed", resident.model_id)
    log.info("model %s: revision %d, %s", resident.model_id, number, record.summary)
    return record
