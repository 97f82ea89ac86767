"""DiffRevisions: how each variable differs between two revisions of a model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from weightsmith_server.manifests import VariableRecord
from weightsmith_server.models.host import ModelHost
from weightsmith_server.revisions.history import require_revision_number
from weightsmith_server.store import Store


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


def diff(host: ModelHost, model_id: str, from_revision: int, to_revision: int) -> RevisionDiff:
    """Per variable: L2 and max |delta|, fraction changed; added and removed paths.

    Reads committed files only, so concurrent commits change nothing here.
    """
    host.revision(model_id, 0)
    require_revision_number(from_revision, "from_revision")
    first, old = host.revision(model_id, from_revision, field="from_revision")
    second, new = host.revision(model_id, to_revision, field="to_revision")
    store = host.store
    before, after = old.by_path(), new.by_path()
    changed: list[VariableDelta] = []
    unchanged = 0
    for record in new.variables:
        earlier = before.get(record.path)
        if earlier is None:
            continue
        delta = _delta(store, model_id, earlier, record)
        if delta is None:
            unchanged += 1
        else:
            changed.append(delta)
    return RevisionDiff(
        first,
        second,
        changed,
        added=[v.path for v in new.variables if v.path not in before],
        removed=[v.path for v in old.variables if v.path not in after],
        unchanged_count=unchanged,
        architecture_changed=_architecture_changed(store, model_id, first, second),
    )


def _delta(store: Store, model_id: str, old: VariableRecord, new: VariableRecord) -> VariableDelta | None:
    """How a variable changed, or None when its values are the same."""
    if old.shape != new.shape or old.dtype != new.dtype:
        return VariableDelta(new.path, shape_changed=True)
    if old.file == new.file:
        return None  # the same stored bytes
    a = store.load_tensor(model_id, old)
    b = store.load_tensor(model_id, new)
    differs = a != b
    count = int(np.count_nonzero(differs))
    if not count:
        return None
    delta = (b.astype(np.float64) - a.astype(np.float64)).ravel()
    return VariableDelta(
        new.path,
        delta_l2=float(np.sqrt(np.dot(delta, delta))),
        max_abs_delta=float(np.abs(delta).max()),
        fraction_changed=count / differs.size,
    )


def _architecture_changed(store: Store, model_id: str, first: int, second: int) -> bool:
    first_arch = store.read_revision(model_id, first).architecture_revision
    second_arch = store.read_revision(model_id, second).architecture_revision
    return first_arch != second_arch and (
        store.read_architecture(model_id, first) != store.read_architecture(model_id, second)
    )
