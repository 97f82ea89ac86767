"""The durable store, without gRPC: commit protocol, manifests, leftovers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from weightsmith_server.manifests import Manifest
from weightsmith_server.revisions.record import RevisionDraft, RevisionKind, RevisionRecord
from weightsmith_server.store import ModelRecord, Store
from weightsmith_server.variables import VariableEntry

ENTRY_A = VariableEntry("a/kernel", "a", 0, True)
ENTRY_B = VariableEntry("b/bias", "b", 1, False)


def _revision(model_id: str, number: int, changed: list[str]) -> RevisionRecord:
    draft = RevisionDraft(
        kind=RevisionKind.CREATE if number == 1 else RevisionKind.WRITE_WEIGHTS,
        author="tests",
        message=f"r{number}",
        summary="",
        changed_variables=changed,
        architecture_changed=number == 1,
        architecture_revision=1,
    )
    return draft.record(model_id, number, None, 0)


def _create(store: Store, model_id: str, a: np.ndarray, b: np.ndarray) -> None:
    folder, staged = store.stage_model()
    records = (staged.add_tensor(ENTRY_A, a), staged.add_tensor(ENTRY_B, b))
    staged.commit(_revision(model_id, 1, ["a/kernel", "b/bias"]), Manifest(2, records), '{"arch": 1}')
    store.commit_model(folder, ModelRecord(model_id, "Test", "config", "2026-01-01T00:00:00Z"))


def test_revision_stores_only_what_changed_and_restores_every_revision(tmp_path: Path) -> None:
    store = Store(tmp_path)
    a1 = np.arange(12, dtype=np.float32).reshape(3, 4)
    b1 = np.array([1.5, -2.5], dtype=np.float64)
    _create(store, "m", a1, b1)

    staged = store.stage_revision("m")
    b2 = b1 * 3
    new_b = staged.add_tensor(ENTRY_B, b2)
    base = store.read_manifest("m", 1)
    staged.commit(
        _revision("m", 2, ["b/bias"]),
        Manifest(base.layer_count, tuple(new_b if v.path == "b/bias" else v for v in base.variables)),
        None,
    )

    assert store.revision_numbers("m") == [1, 2]
    second = store.read_manifest("m", 2).by_path()
    assert second["a/kernel"].file == "000001/tensors.safetensors#a/kernel"  # shared, not copied
    assert second["b/bias"].file == "000002/tensors.safetensors#b/bias"
    assert second["b/bias"].trainable is False and second["b/bias"].layer_index == 1
    np.testing.assert_array_equal(store.load_tensor("m", second["a/kernel"]), a1)
    np.testing.assert_array_equal(store.load_tensor("m", second["b/bias"]), b2)
    first = store.read_manifest("m", 1).by_path()
    np.testing.assert_array_equal(store.load_tensor("m", first["b/bias"]), b1)
    assert store.read_architecture("m", 2) == '{"arch": 1}'
    assert sorted(p.name for p in (tmp_path / "models/m/revisions/000002").iterdir()) == [
        "revision.json",
        "tensors.safetensors",
    ]


def test_uncommitted_staging_is_invisible_and_removed_on_restart(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _create(store, "m", np.zeros((2, 2), np.float32), np.zeros(2, np.float64))
    staged = store.stage_revision("m")
    staged.add_tensor(ENTRY_A, np.ones((2, 2), np.float32))
    half_model, _ = store.stage_model()

    assert store.revision_numbers("m") == [1]
    reopened = Store(tmp_path)
    assert reopened.revision_numbers("m") == [1]
    assert not staged.dir.exists()
    assert not half_model.exists()
    assert reopened.model_ids() == ["m"]


def test_bfloat16_round_trips_bit_exactly(tmp_path: Path) -> None:
    import ml_dtypes

    store = Store(tmp_path)
    values = np.array([1.0, -3.5, 1e-3, 65504], dtype=ml_dtypes.bfloat16)
    _create(store, "m", values, np.zeros(1, np.float32))
    loaded = store.load_tensor("m", store.read_manifest("m", 1).by_path()["a/kernel"])
    assert loaded.dtype == values.dtype
    assert loaded.tobytes() == values.tobytes()


def test_delete_is_a_single_rename(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _create(store, "m", np.zeros(1, np.float32), np.zeros(1, np.float32))
    store.delete_model("m")
    assert store.model_ids() == []
    assert not (tmp_path / "models" / "m").exists()


@pytest.mark.parametrize("relative", ["../x.h5", "/etc/passwd", "a/../../b.h5"])
def test_imports_cannot_escape(tmp_path: Path, relative: str) -> None:
    assert Store(tmp_path).resolve_import(relative) is None
