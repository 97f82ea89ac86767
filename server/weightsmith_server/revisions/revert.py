"""RevertModel: restore an earlier revision as a new one; history is never rewritten."""

from __future__ import annotations

from weightsmith_server.errors import NotFound
from weightsmith_server.models import architecture
from weightsmith_server.models.host import ModelHost
from weightsmith_server.models.resident import ResidentModel
from weightsmith_server.revisions.commit import Change
from weightsmith_server.revisions.history import require_revision_number
from weightsmith_server.revisions.record import RevisionDraft, RevisionKind, RevisionRecord


def revert(
    host: ModelHost,
    model_id: str,
    to_revision: int,
    *,
    expected_revision: int | None,
    message: str,
    author: str,
) -> RevisionRecord:
    """Commit a new revision equal to `to_revision` in weights and architecture.

    Its manifest points at the target's files, so a revert stores no tensor.
    """
    host.revision(model_id, 0)
    require_revision_number(to_revision, "to_revision")
    store = host.store

    def prepare(resident: ResidentModel) -> Change:
        if not store.has_revision(model_id, to_revision):
            raise NotFound(
                f"Model {model_id!r} has no revision {to_revision}; ListRevisions shows the retained ones.",
                reason="REVISION_NOT_FOUND",
                field="to_revision",
            )
        state = resident.state
        target = store.read_revision(model_id, to_revision)
        manifest = store.read_manifest(model_id, to_revision)
        current = state.manifest.by_path()
        changed = [
            v.path for v in manifest.variables if v.path not in current or current[v.path].file != v.file
        ]
        architecture_changed = target.architecture_revision != state.revision.architecture_revision
        keras_model = None
        by_path = manifest.by_path()
        if architecture_changed:
            keras_model = architecture.rebuild(
                store.read_architecture(model_id, to_revision), device=resident.device
            )
            changed_values = list(by_path)
        else:
            changed_values = changed
        draft = RevisionDraft(
            kind=RevisionKind.REVERT,
            author=author,
            message=message,
            summary=f"revert to revision {to_revision}: {len(changed)} variable(s) restored",
            changed_variables=changed,
            architecture_changed=architecture_changed,
            architecture_revision=target.architecture_revision,
            reverted_to=to_revision,
        )
        values = {p: store.load_tensor(model_id, by_path[p]) for p in changed_values}
        return Change(draft, manifest, values, keras_model=keras_model)

    return host.commit(model_id, host.stage(model_id), prepare, expected_revision=expected_revision)
