"""Revisions, their edit reports and diffs as protos."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from weightsmith.v1 import edits_pb2, revision_pb2, weight_service_pb2
from weightsmith_server.api.codecs.common import EnumTable, timestamp
from weightsmith_server.edits.context import EditReport
from weightsmith_server.revisions.diff import RevisionDiff
from weightsmith_server.revisions.record import RevisionKind, RevisionRecord

REVISION_KINDS = EnumTable(
    revision_pb2.RevisionKind,
    {
        revision_pb2.REVISION_KIND_CREATE: RevisionKind.CREATE,
        revision_pb2.REVISION_KIND_UPLOAD: RevisionKind.UPLOAD,
        revision_pb2.REVISION_KIND_WRITE_WEIGHTS: RevisionKind.WRITE_WEIGHTS,
        revision_pb2.REVISION_KIND_EDIT: RevisionKind.EDIT,
        revision_pb2.REVISION_KIND_REVERT: RevisionKind.REVERT,
        revision_pb2.REVISION_KIND_JOB: RevisionKind.JOB,
    },
)


def edit_result(report: EditReport | Mapping[str, Any]) -> edits_pb2.EditResult:
    """What one edit did, from its report or the stored copy of it."""
    fields = report.as_dict() if isinstance(report, EditReport) else report
    return edits_pb2.EditResult(**fields)


def revision(record: RevisionRecord) -> revision_pb2.Revision:
    return revision_pb2.Revision(
        model_id=record.model_id,
        revision=record.revision,
        create_time=timestamp(record.create_time),
        author=record.author,
        message=record.message,
        kind=REVISION_KINDS.encode(record.kind),
        changed_variables=record.changed_variables,
        summary=record.summary,
        architecture_changed=record.architecture_changed,
        stored_bytes=record.stored_bytes,
        edits=[edit_result(e) for e in record.edits],
        reverted_to=record.reverted_to,
    )


def diff(result: RevisionDiff) -> weight_service_pb2.DiffRevisionsResponse:
    return weight_service_pb2.DiffRevisionsResponse(
        from_revision=result.from_revision,
        to_revision=result.to_revision,
        changed=[
            revision_pb2.VariableDiff(
                path=d.path,
                delta_l2=d.delta_l2,
                max_abs_delta=d.max_abs_delta,
                fraction_changed=d.fraction_changed,
                shape_changed=d.shape_changed,
            )
            for d in result.changed
        ],
        added=result.added,
        removed=result.removed,
        unchanged_count=result.unchanged_count,
        architecture_changed=result.architecture_changed,
    )
