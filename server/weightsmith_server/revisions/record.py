"""What a revision is: the record `revision.json` holds, and the draft every mutation fills in.

Every mutation (create, upload, weight write, edit, revert, job) describes
the revision it makes as a `RevisionDraft`; the commit path alone numbers,
stamps and sizes it into a `RevisionRecord` (`RevisionDraft.record`), so the
rules for authorship, time and architecture lineage live in one place.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from weightsmith_server.clock import utc_now


class RevisionKind(enum.StrEnum):
    """Which kind of mutation made a revision."""

    CREATE = "create"
    UPLOAD = "upload"
    WRITE_WEIGHTS = "write_weights"
    EDIT = "edit"
    REVERT = "revert"
    JOB = "job"


@dataclass(frozen=True)
class RevisionRecord:
    """One committed revision's identity and what changed: `revision.json`, besides its manifest."""

    model_id: str
    revision: int
    create_time: str
    author: str
    message: str
    kind: RevisionKind
    summary: str
    architecture_changed: bool
    # The revision whose `architecture.json` is in force at this one.
    architecture_revision: int
    stored_bytes: int
    changed_variables: list[str] = field(default_factory=list)
    # What each edit of an ApplyEdits batch did (EditReport fields), in order.
    edits: list[dict[str, Any]] = field(default_factory=list)
    # The revision a RevertModel restored.
    reverted_to: int = 0
    # The job that committed this revision ("" when no job did), as the server wrote it.
    job_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The `revision.json` form; `job_id` only when a job committed (older readers lack the key)."""
        raw = asdict(self) | {"kind": str(self.kind)}
        if not self.job_id:
            del raw["job_id"]
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RevisionRecord:
        """Read a stored record; keys a newer server added and this one lacks are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        return cls(**values | {"kind": RevisionKind(values["kind"])})


@dataclass
class RevisionDraft:
    """What a mutation says about the revision it is making, before it has a number.

    `architecture_revision` is set only by a revert, which brings back the
    target's architecture; otherwise a changed architecture is the new
    revision's own and an unchanged one is the parent's.
    """

    kind: RevisionKind
    author: str
    message: str
    summary: str
    changed_variables: list[str] = field(default_factory=list)
    architecture_changed: bool = False
    edits: list[dict[str, Any]] = field(default_factory=list)
    reverted_to: int = 0
    architecture_revision: int | None = None
    job_id: str = ""

    def record(
        self, model_id: str, number: int, parent: RevisionRecord | None, stored_bytes: int
    ) -> RevisionRecord:
        """The committed record: the one place a `RevisionRecord` is made."""
        if self.architecture_revision is not None:
            architecture_revision = self.architecture_revision
        elif self.architecture_changed or parent is None:
            architecture_revision = number
        else:
            architecture_revision = parent.architecture_revision
        return RevisionRecord(
            model_id=model_id,
            revision=number,
            create_time=utc_now(),
            author=self.author,
            message=self.message,
            kind=self.kind,
            summary=self.summary,
            architecture_changed=self.architecture_changed,
            architecture_revision=architecture_revision,
            stored_bytes=stored_bytes,
            changed_variables=list(self.changed_variables),
            edits=list(self.edits),
            reverted_to=self.reverted_to,
            job_id=self.job_id,
        )
