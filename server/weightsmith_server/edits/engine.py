"""ApplyEdits: run a batch of edits on a working copy and commit it as one revision."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Sequence

import numpy as np

from weightsmith_server.edits.base import EditOp
from weightsmith_server.edits.context import EditContext, EditReport
from weightsmith_server.errors import InvalidArgument, WeightsmithError
from weightsmith_server.manifests import Manifest, VariableRecord
from weightsmith_server.models.host import ModelHost
from weightsmith_server.models.resident import ResidentModel
from weightsmith_server.revisions.commit import Change, check_expected_revision
from weightsmith_server.revisions.record import RevisionDraft, RevisionKind, RevisionRecord
from weightsmith_server.store import StagedRevision


def _apply_all(ctx: EditContext, ops: Sequence[EditOp]) -> list[EditReport]:
    reports = []
    for index, op in enumerate(ops):
        try:
            # Overflow shows up as a non-finite result, which `put` rejects by name.
            with np.errstate(over="ignore", invalid="ignore"):
                reports.append(op.apply(ctx))
        except WeightsmithError as exc:
            raise exc.with_field_prefix(f"edits[{index}].{op.name}") from exc.__cause__
    return reports


def _summary(reports: list[EditReport]) -> str:
    ops = ", ".join(f"{r.op}({len(r.variables)})" for r in reports)
    return f"{len(reports)} edit(s): {ops}"


def _write(ctx: EditContext, staged: StagedRevision) -> dict[str, VariableRecord]:
    """Write the changed values durably (model order); their staged manifest entries by path."""
    return {
        path: staged.add_tensor(record.entry, ctx.value(path))
        for path, record in ctx.records.items()
        if path in ctx.changed
    }


def _stage(ctx: EditContext, staged: StagedRevision) -> Manifest:
    """Write the changed values while the batch's changes are counted; the new manifest.

    The files are written and fsync'd on a worker thread (the disk works
    while this thread counts) unless they are too small for the thread hop
    to pay; every other variable keeps its file.
    """
    if sum(ctx.value(path).nbytes for path in ctx.changed) < _OVERLAP_BYTES:
        ctx.settle()
        written = _write(ctx, staged)
    else:
        writing = _workers().submit(_write, ctx, staged)
        try:
            ctx.settle()
        finally:
            # Never leave a write running: a failure discards the staging folder next.
            concurrent.futures.wait([writing])
        written = writing.result()
    return Manifest(
        layer_count=ctx.layer_count,
        variables=tuple(written.get(path, record) for path, record in ctx.records.items()),
    )


# Below this many changed bytes the values are written on the calling thread.
_OVERLAP_BYTES = 1 << 20
_WORKERS: concurrent.futures.ThreadPoolExecutor | None = None
_WORKERS_LOCK = threading.Lock()


def _workers() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that write edited values to disk, started on first use."""
    global _WORKERS
    with _WORKERS_LOCK:
        if _WORKERS is None:
            _WORKERS = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="weightsmith-edits")
        return _WORKERS


def apply_edits(
    host: ModelHost,
    model_id: str,
    ops: Sequence[EditOp],
    *,
    expected_revision: int | None,
    message: str,
    dry_run: bool,
    author: str,
) -> tuple[RevisionRecord | None, list[EditReport]]:
    """Apply `ops` in order; commit them as one revision unless `dry_run`.

    All new values are computed and checked before anything is written; an
    invalid edit anywhere leaves the model untouched.
    """
    host.revision(model_id, 0)
    if not ops:
        raise InvalidArgument("Received no edits; send at least one.", reason="NO_EDITS", field="edits")
    if dry_run:

        def rehearse(resident: ResidentModel) -> list[EditReport]:
            check_expected_revision(resident, expected_revision, "expected_revision")
            ctx = EditContext(host, resident)
            reports = _apply_all(ctx, ops)
            ctx.settle()
            return reports

        return None, host.run(model_id, rehearse)
    staged = host.stage(model_id)
    reports: list[EditReport] = []

    def prepare(resident: ResidentModel) -> Change:
        ctx = EditContext(host, resident)
        reports.extend(_apply_all(ctx, ops))
        manifest = _stage(ctx, staged)
        draft = RevisionDraft(
            kind=RevisionKind.EDIT,
            author=author,
            message=message,
            summary=_summary(reports),
            changed_variables=[p for p in ctx.records if p in ctx.changed],
            architecture_changed=ctx.keras_model is not None,
            edits=[r.as_dict() for r in reports],
        )
        return Change(draft, manifest, ctx.values_to_install(), ctx.architecture_json, ctx.keras_model)

    record = host.commit(model_id, staged, prepare, expected_revision=expected_revision)
    return record, reports
