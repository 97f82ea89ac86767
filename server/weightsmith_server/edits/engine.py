"""ApplyEdits: run a batch of edits on a working copy and commit it as one revision."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from weightsmith_server.edits.base import EditOp
from weightsmith_server.edits.context import EditContext, EditReport
from weightsmith_server.errors import InvalidArgument, NotFound, WeightsmithError
from weightsmith_server.registry import (
    ModelState,
    Prepared,
    Registry,
    ResidentModel,
    check_expected_revision,
    utc_now,
)
from weightsmith_server.store import Manifest, RevisionRecord, StagedRevision


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


def _stage(ctx: EditContext, staged: StagedRevision) -> Manifest:
    """Write the changed values; every other variable keeps its file."""
    return Manifest(
        layer_count=ctx.layer_count,
        variables=tuple(
            staged.add_tensor(record.entry, ctx.value(path)) if path in ctx.changed else record
            for path, record in ctx.records.items()
        ),
    )


async def apply_edits(
    registry: Registry,
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
    resident = registry.get(model_id)
    if not ops:
        raise InvalidArgument("Received no edits; send at least one.", reason="NO_EDITS", field="edits")

    def run() -> tuple[RevisionRecord | None, list[EditReport]]:
        if dry_run:
            check_expected_revision(resident, expected_revision, "expected_revision")
            return None, _apply_all(EditContext(registry, resident, resident.state), ops)
        return _commit(registry, resident, ops, expected_revision, message, author)

    return await registry.run(run)


def _commit(
    registry: Registry,
    resident: ResidentModel,
    ops: Sequence[EditOp],
    expected_revision: int | None,
    message: str,
    author: str,
) -> tuple[RevisionRecord, list[EditReport]]:
    try:
        staged = registry.store.stage_revision(resident.model_id)
    except FileNotFoundError:
        raise NotFound(
            f"Model {resident.model_id!r} was deleted.", reason="MODEL_NOT_FOUND", field="model_id"
        ) from None
    reports: list[EditReport] = []

    def prepare(state: ModelState, number: int) -> Prepared:
        ctx = EditContext(registry, resident, state)
        reports.extend(_apply_all(ctx, ops))
        manifest = _stage(ctx, staged)
        architecture_changed = ctx.keras_model is not None
        record = RevisionRecord(
            model_id=resident.model_id,
            revision=number,
            create_time=utc_now(),
            author=author,
            message=message,
            kind="edit",
            summary=_summary(reports),
            architecture_changed=architecture_changed,
            architecture_revision=number if architecture_changed else state.revision.architecture_revision,
            stored_bytes=staged.stored_bytes,
            changed_variables=[p for p in ctx.records if p in ctx.changed],
            edits=[r.as_dict() for r in reports],
        )
        return Prepared(record, manifest, ctx.values_to_install(), ctx.architecture_json, ctx.keras_model)

    record = registry.commit_revision(resident, staged, expected_revision=expected_revision, prepare=prepare)
    return record, reports
