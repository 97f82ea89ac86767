"""History: compare two revisions, and restore one as a new revision."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from weightsmith_server import architecture
from weightsmith_server.errors import NotFound
from weightsmith_server.registry import ModelState, Prepared, Registry, require_revision_number, utc_now
from weightsmith_server.store import RevisionRecord


@dataclass(frozen=True)
class VariableDelta:
    """How one variable differs between two revisions."""

    path: str
    delta_l2: float = 0.0
    max_abs_delta: float = 0.0
    fraction_changed: float = 0.0
    shape_changed: bool = False


@dataclass(frozen=True)
class RevisionDiff:
    """DiffRevisions' answer."""

    from_revision: int
    to_revision: int
    changed: list[VariableDelta] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged_count: int = 0
    architecture_changed: bool = False


async def diff(registry: Registry, model_id: str, from_revision: int, to_revision: int) -> RevisionDiff:
    """Per variable: L2 and max |delta|, fraction changed; added and removed paths."""
    resident = registry.get(model_id)
    require_revision_number(from_revision, "from_revision")
    first, old = registry.revision_state(resident, from_revision, field="from_revision")
    second, new = registry.revision_state(resident, to_revision, field="to_revision")
    store = registry.store

    def compute() -> RevisionDiff:
        before = old.by_path()
        result = RevisionDiff(first, second)
        unchanged = 0
        for record in new.variables:
            earlier = before.get(record.path)
            if earlier is None:
                result.added.append(record.path)
            elif earlier.shape != record.shape or earlier.dtype != record.dtype:
                result.changed.append(VariableDelta(record.path, shape_changed=True))
            elif earlier.file == record.file:
                unchanged += 1  # the same stored bytes
            else:
                a = store.load_tensor(model_id, earlier)
                b = store.load_tensor(model_id, record)
                differs = a != b
                count = int(np.count_nonzero(differs))
                if not count:
                    unchanged += 1
                    continue
                delta = b.astype(np.float64) - a.astype(np.float64)
                result.changed.append(
                    VariableDelta(
                        record.path,
                        delta_l2=float(np.sqrt(np.dot(delta.ravel(), delta.ravel()))),
                        max_abs_delta=float(np.abs(delta).max()),
                        fraction_changed=count / differs.size,
                    )
                )
        after = new.by_path()
        result.removed.extend(v.path for v in old.variables if v.path not in after)
        first_arch = store.read_revision(model_id, first).architecture_revision
        second_arch = store.read_revision(model_id, second).architecture_revision
        architecture_changed = first_arch != second_arch and (
            store.read_architecture(model_id, first) != store.read_architecture(model_id, second)
        )
        return RevisionDiff(
            first,
            second,
            result.changed,
            result.added,
            result.removed,
            unchanged,
            architecture_changed,
        )

    return await registry.run(compute)


async def revert(
    registry: Registry,
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
    resident = registry.get(model_id)
    require_revision_number(to_revision, "to_revision")
    store = registry.store

    def prepare(state: ModelState, number: int) -> Prepared:
        if not store.has_revision(model_id, to_revision):
            raise NotFound(
                f"Model {model_id!r} has no revision {to_revision}; ListRevisions shows the retained ones.",
                reason="REVISION_NOT_FOUND",
                field="to_revision",
            )
        target = store.read_revision(model_id, to_revision)
        manifest = store.read_manifest(model_id, to_revision)
        current = state.manifest.by_path()
        changed = [
            v.path for v in manifest.variables if v.path not in current or current[v.path].file != v.file
        ]
        architecture_changed = target.architecture_revision != state.revision.architecture_revision
        keras_model = None
        if architecture_changed:
            config = store.read_architecture(model_id, to_revision)
            keras_model = architecture.rebuild(config, device=resident.device)
            values = {v.path: store.load_tensor(model_id, v) for v in manifest.variables}
        else:
            by_path = manifest.by_path()
            values = {p: store.load_tensor(model_id, by_path[p]) for p in changed}
        record = RevisionRecord(
            model_id=model_id,
            revision=number,
            create_time=utc_now(),
            author=author,
            message=message,
            kind="revert",
            summary=f"revert to revision {to_revision}: {len(changed)} variable(s) restored",
            architecture_changed=architecture_changed,
            architecture_revision=target.architecture_revision,
            stored_bytes=0,
            changed_variables=changed,
            reverted_to=to_revision,
        )
        return Prepared(record, manifest, values, keras_model=keras_model)

    def run() -> RevisionRecord:
        try:
            staged = store.stage_revision(model_id)
        except FileNotFoundError:
            raise NotFound(
                f"Model {model_id!r} was deleted.", reason="MODEL_NOT_FOUND", field="model_id"
            ) from None
        return registry.commit_revision(
            resident, staged, expected_revision=expected_revision, prepare=prepare
        )

    return await registry.run(run)
