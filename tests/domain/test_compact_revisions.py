"""Compact revisions: delta manifests, packed safetensors files, retention, old layouts, few fsyncs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from weightsmith_server import store as store_module
from weightsmith_server.manifests import Manifest, VariableRecord
from weightsmith_server.revisions.record import RevisionDraft, RevisionKind, RevisionRecord
from weightsmith_server.store import FULL_MANIFEST_EVERY, ModelRecord, Store
from weightsmith_server.tensor_files import LARGE_TENSOR_BYTES
from weightsmith_server.variables import VariableEntry

CPU = "/device:CPU:0"


def _record(model_id: str, number: int, changed: list[str], *, architecture: bool = False) -> RevisionRecord:
    draft = RevisionDraft(
        kind=RevisionKind.CREATE if number == 1 else RevisionKind.EDIT,
        author="tests",
        message=f"r{number}",
        summary="",
        changed_variables=changed,
        architecture_changed=architecture or number == 1,
        architecture_revision=1,
    )
    return draft.record(model_id, number, None, 0)


def _create(root: Store, model_id: str, values: dict[str, np.ndarray], config: str = "{}") -> Manifest:
    folder, staged = root.stage_model()
    records = tuple(
        staged.add_tensor(VariableEntry(path, path.split("/")[0], i, True), value)
        for i, (path, value) in enumerate(values.items())
    )
    committed = staged.commit(_record(model_id, 1, list(values)), Manifest(len(values), records), config)
    root.commit_model(folder, ModelRecord(model_id, "Test", "config", "2026-01-01T00:00:00Z"))
    return committed


def _commit(root: Store, model_id: str, parent: Manifest, values: dict[str, np.ndarray]) -> Manifest:
    """A new revision writing `values`, on top of `parent` (the previous revision's manifest)."""
    staged = root.stage_revision(model_id)
    variables = tuple(
        staged.add_tensor(v.entry, values[v.path]) if v.path in values else v for v in parent.variables
    )
    record = _record(model_id, parent.revision + 1, list(values))
    return staged.commit(record, Manifest(parent.layer_count, variables), None, parent=parent)


def _stored(tmp_path: Path, model_id: str, number: int) -> dict:
    return json.loads(
        (tmp_path / "models" / model_id / "revisions" / f"{number:06d}" / "revision.json").read_text()
    )


def _values(root: Store, model_id: str, number: int) -> dict[str, bytes]:
    manifest = root.read_manifest(model_id, number)
    return {v.path: root.load_tensor(model_id, v).tobytes() for v in manifest.variables}


def _many(count: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"l{i}/bias": rng.standard_normal(16 + i).astype(np.float32) for i in range(count)}


def test_delta_chain_restores_every_revision_after_restart(tmp_path: Path) -> None:
    root = Store(tmp_path)
    values = _many(2 * FULL_MANIFEST_EVERY)  # the chain's entries stay under the variable count
    manifest = _create(root, "m", values)
    expected = {1: {k: v.tobytes() for k, v in values.items()}}
    rng = np.random.default_rng(1)
    for number in range(2, FULL_MANIFEST_EVERY + 4):
        path = f"l{number % 3}/bias"
        values = values | {path: rng.standard_normal(values[path].shape).astype(np.float32)}
        manifest = _commit(root, "m", manifest, {path: values[path]})
        expected[number] = {k: v.tobytes() for k, v in values.items()}

    kinds = {n: _stored(tmp_path, "m", n)["manifest"]["kind"] for n in expected}
    assert kinds[1] == "full" and kinds[2] == "delta"
    assert kinds[FULL_MANIFEST_EVERY + 1] == "full"  # the chain is bounded
    assert _stored(tmp_path, "m", 2)["manifest"]["changed"][0][:2] == [2, "l2/bias"]

    reopened = Store(tmp_path)
    for number, wanted in expected.items():
        assert _values(reopened, "m", number) == wanted, number
    assert reopened.read_manifest("m", max(expected)) == manifest


def test_full_manifest_once_the_chain_passes_the_variable_count(tmp_path: Path) -> None:
    root = Store(tmp_path)
    values = _many(4)
    manifest = _create(root, "m", values)
    kinds = []
    for number in range(2, 8):
        manifest = _commit(root, "m", manifest, {"l0/bias": values["l0/bias"] + number})
        kinds.append(_stored(tmp_path, "m", number)["manifest"]["kind"])
    assert kinds == ["delta", "delta", "delta", "delta", "full", "delta"]
    everything = {k: v * 2 for k, v in values.items()}
    _commit(root, "m", manifest, everything)  # every variable changes: a full manifest
    assert _stored(tmp_path, "m", 8)["manifest"]["kind"] == "full"
    assert _values(Store(tmp_path), "m", 8) == {k: v.tobytes() for k, v in everything.items()}


def test_small_values_are_packed_and_large_ones_block_aligned(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    root = Store(tmp_path)
    large = np.arange(LARGE_TENSOR_BYTES // 4, dtype=np.float32)
    values = {
        "a/int8": np.array([1, -2, 3], np.int8),
        "a/half": np.arange(5, dtype=np.float16),
        "a/double": np.array([0.1, 0.2, 0.3]),
        "a/flag": np.array([True, False, True]),
        "a/brain": np.array([1.0, -3.5, 1e-3, 65504], ml_dtypes.bfloat16),
        "a/scalar": np.array(7, np.int64),
        "a/empty": np.zeros((0, 3), np.float32),
        "b/large": large,
        "c/large_bf16": np.linspace(-1, 1, LARGE_TENSOR_BYTES // 2).astype(ml_dtypes.bfloat16),
    }
    _create(root, "m", values)
    folder = tmp_path / "models" / "m" / "revisions" / "000001"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "0000.safetensors",
        "0001.safetensors",
        "tensors.safetensors",
    ]
    packed = folder / "tensors.safetensors"
    header_length = int.from_bytes(packed.read_bytes()[:8], "little")
    small = sum(v.nbytes for k, v in values.items() if "large" not in k)
    assert packed.stat().st_size == 8 + header_length + small  # no padding between values
    assert (8 + header_length) % 64 == 0
    header = json.loads(packed.read_bytes()[8 : 8 + header_length])
    for key, entry in header.items():
        assert entry["data_offsets"][0] % values[key].dtype.itemsize == 0
    for name in ("0000.safetensors", "0001.safetensors"):
        data = (folder / name).read_bytes()
        assert int.from_bytes(data[:8], "little") + 8 == 4096  # the data starts on a block

    reopened = Store(tmp_path)
    for record in reopened.read_manifest("m", 1).variables:
        loaded = reopened.load_tensor("m", record)
        assert loaded.dtype == values[record.path].dtype and loaded.shape == values[record.path].shape
        assert loaded.tobytes() == values[record.path].tobytes()
        assert not loaded.flags.writeable

    # Any framework reads the files: the same names, dtypes, shapes and values.
    from_files = {**load_file(str(packed))}
    for name in ("0000.safetensors", "0001.safetensors"):
        from_files |= load_file(str(folder / name))
    assert sorted(from_files) == sorted(values)
    for key, value in values.items():
        assert from_files[key].shape == value.shape
        assert from_files[key].tobytes() == value.tobytes()
    with safe_open(str(packed), framework="np") as handle:
        assert handle.get_slice("a/brain").get_dtype() == "BF16"
        assert handle.get_slice("a/flag").get_dtype() == "BOOL"


def test_one_bias_edit_grows_the_store_by_little_with_four_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Store(tmp_path)
    rng = np.random.default_rng(0)
    values = {f"conv{i}/kernel": rng.standard_normal((3, 3, 8, 8)).astype(np.float32) for i in range(150)}
    values |= {f"conv{i}/bias": rng.standard_normal(64).astype(np.float32) for i in range(150)}
    manifest = _create(root, "m", values)
    revisions = tmp_path / "models" / "m" / "revisions"

    def size() -> int:
        return sum(p.stat().st_size for p in revisions.rglob("*") if p.is_file())

    before = size()
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    new_bias = values["conv7/bias"] * 2
    _commit(root, "m", manifest, {"conv7/bias": new_bias})
    monkeypatch.undo()
    assert size() - before <= 4096 + 2 * new_bias.nbytes
    assert len(synced) <= 4
    assert _values(Store(tmp_path), "m", 2)["conv7/bias"] == new_bias.tobytes()


def test_retention_keeps_every_kept_revision_restorable_at_each_step(tmp_path: Path) -> None:
    root = Store(tmp_path)
    values = _many()
    manifest = _create(root, "m", values)
    expected = {1: _values(root, "m", 1)}
    for number in range(2, 8):
        path = f"l{number % 2}/bias"
        manifest = _commit(root, "m", manifest, {path: values[path] * number})
        expected[number] = _values(root, "m", number)
    kept = [5, 6, 7]
    assert _stored(tmp_path, "m", 5)["manifest"]["kind"] == "delta"

    # A crash in step 1, before the rename: the temporary file goes at start-up.
    (tmp_path / "models/m/revisions/000005/.revision.json").write_text("{partial")
    root = Store(tmp_path)
    assert not (tmp_path / "models/m/revisions/000005/.revision.json").exists()

    # A crash after step 1: revision 5 is full, every revision still restores.
    manifests = root._kept_manifests("m", kept)
    root._make_full("m", manifests[0])
    assert _stored(tmp_path, "m", 5)["manifest"]["kind"] == "full"
    root = Store(tmp_path)
    assert {n: _values(root, "m", n) for n in expected} == expected

    # A crash in step 2, after the newest dropped revision went: the older ones still resolve.
    root._unlink_records("m", [4])
    root = Store(tmp_path)
    assert root.revision_numbers("m") == [1, 2, 3, 5, 6, 7]
    assert {n: _values(root, "m", n) for n in root.revision_numbers("m")} == {
        n: expected[n] for n in [1, 2, 3, 5, 6, 7]
    }

    # The next retention finishes the job, including the folder the crash left.
    assert root.retain("m", 3) == [1, 2, 3]
    root = Store(tmp_path)
    assert root.revision_numbers("m") == kept
    assert {n: _values(root, "m", n) for n in kept} == {n: expected[n] for n in kept}
    folders = sorted(p.name for p in (tmp_path / "models/m/revisions").iterdir())
    # Files kept revisions still use stay: revision 1's architecture and values, 4's `l0/bias` (5 uses it).
    assert folders == ["000001", "000004", "000005", "000006", "000007"]
    assert [p.name for p in (tmp_path / "models/m/revisions/000004").iterdir()] == ["tensors.safetensors"]
    assert sorted(p.name for p in (tmp_path / "models/m/revisions/000001").iterdir()) == [
        "architecture.json",
        "tensors.safetensors",
    ]


def test_compact_revision_restores_a_keras_model_after_restart_and_retention(tmp_path: Path) -> None:
    import keras

    from weightsmith_server.models import architecture
    from weightsmith_server.models.creation import materialize
    from weightsmith_server.variables import model_variables

    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    config = keras.Model(inputs, keras.layers.Dense(10, name="head")(x), name="tiny_cnn").to_json()
    model = architecture.rebuild(config, device=CPU, seed=3)
    entries = model_variables(model)
    root = Store(tmp_path)
    folder, staged = root.stage_model()
    records = tuple(staged.add_tensor(entry, np.asarray(v.numpy())) for entry, v in entries)
    manifest = staged.commit(_record("cnn", 1, []), Manifest(len(model.layers), records), model.to_json())
    root.commit_model(folder, ModelRecord("cnn", "Functional", "config", "2026-01-01T00:00:00Z"))
    values = {entry.path: np.asarray(v.numpy()) for entry, v in entries}
    for number, path in enumerate(["conv1/bias", "head/kernel", "bn1/moving_mean", "conv1/bias"], start=2):
        values[path] = values[path] * 1.5 + number
        manifest = _commit(root, "cnn", manifest, {path: values[path]})
    assert _stored(tmp_path, "cnn", 5)["manifest"]["kind"] == "delta"

    def restored(number: int) -> dict[str, bytes]:
        state = materialize(Store(tmp_path), "cnn", number, CPU)
        return {
            entry.path: np.asarray(v.numpy()).tobytes() for entry, v in model_variables(state.keras_model)
        }

    wanted = {k: v.tobytes() for k, v in values.items()}
    assert restored(5) == wanted
    assert Store(tmp_path).retain("cnn", 1) == [1, 2, 3, 4]
    assert _stored(tmp_path, "cnn", 5)["manifest"]["kind"] == "full"
    assert restored(5) == wanted


def _write_layout_1(tmp_path: Path, values: dict[str, np.ndarray]) -> None:
    """A store as layout-1 servers wrote it: pretty manifest.json, one `.npy` per value."""
    folder = tmp_path / "models" / "old" / "revisions" / "000001"
    (folder / "tensors").mkdir(parents=True)
    variables = []
    for index, (path, value) in enumerate(values.items()):
        stored = value.view(np.uint16) if value.dtype == ml_dtypes.bfloat16 else value
        np.save(folder / "tensors" / f"{index:04d}.npy", stored)
        variables.append(
            {
                "path": path,
                "dtype": value.dtype.name,
                "shape": list(value.shape),
                "file": f"000001/tensors/{index:04d}.npy",
                "layer": path.split("/")[0],
                "layer_index": index,
                "trainable": True,
            }
        )
    record = _record("old", 1, list(values)).to_dict()
    (folder / "revision.json").write_text(json.dumps(record, indent=1))
    (folder / "manifest.json").write_text(json.dumps({"layer_count": 3, "variables": variables}, indent=1))
    (folder / "architecture.json").write_text("{}")
    model = {
        "model_id": "old",
        "architecture": "Test",
        "source": "config",
        "create_time": "2026-01-01T00:00:00Z",
    }
    (tmp_path / "models" / "old" / "model.json").write_text(json.dumps(model))
    (tmp_path / "LAYOUT_VERSION").write_text("1\n")


def test_layout_1_store_opens_and_new_revisions_chain_onto_it(tmp_path: Path) -> None:
    values = {
        "a/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b/bias": np.array([1, -2], np.int32),
        "c/brain": np.array([0.5, -2], ml_dtypes.bfloat16),
    }
    _write_layout_1(tmp_path, values)
    root = Store(tmp_path)
    assert (tmp_path / "LAYOUT_VERSION").read_text().strip() == "2"
    manifest = root.read_manifest("old", 1)
    assert _values(root, "old", 1) == {k: v.tobytes() for k, v in values.items()}
    assert root.load_tensor("old", manifest.by_path()["c/brain"]).dtype == values["c/brain"].dtype

    new_bias = np.array([7, 8], np.int32)
    second = _commit(root, "old", manifest, {"b/bias": new_bias})
    third = _commit(root, "old", second, {"a/kernel": values["a/kernel"] * 2})
    assert _stored(tmp_path, "old", 3)["manifest"] == {
        "kind": "delta",
        "parent": 2,
        "layer_count": 3,
        "count": 3,
        "fields": ["index", "path", "dtype", "shape", "file", "layer", "layer_index", "trainable"],
        "changed": [[0, "a/kernel", "float32", [3, 4], "000003/tensors.safetensors", "a", 0, True]],
    }
    assert third.by_path()["c/brain"].file == "000001/tensors/0002.npy"
    expected = {
        "a/kernel": (values["a/kernel"] * 2).tobytes(),
        "b/bias": new_bias.tobytes(),
        "c/brain": values["c/brain"].tobytes(),
    }
    assert _values(Store(tmp_path), "old", 3) == expected

    assert Store(tmp_path).retain("old", 1) == [1, 2]
    root = Store(tmp_path)
    assert _values(root, "old", 3) == expected
    assert sorted(p.name for p in (tmp_path / "models/old/revisions/000001").rglob("*")) == [
        "0002.npy",
        "architecture.json",
        "tensors",
    ]


def test_architecture_change_writes_a_full_manifest(tmp_path: Path) -> None:
    root = Store(tmp_path)
    manifest = _create(root, "m", _many(3))
    staged = root.stage_revision("m")
    extra = staged.add_tensor(VariableEntry("new/bias", "new", 3, True), np.ones(2, np.float32))
    committed = staged.commit(
        _record("m", 2, ["new/bias"], architecture=True),
        Manifest(4, (*manifest.variables, extra)),
        '{"new": 1}',
        parent=manifest,
    )
    assert _stored(tmp_path, "m", 2)["manifest"]["kind"] == "full"
    assert Store(tmp_path).read_manifest("m", 2) == committed
    assert isinstance(committed.variables[-1], VariableRecord)


def test_a_store_of_a_newer_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "LAYOUT_VERSION").write_text("3\n")
    with pytest.raises(RuntimeError, match="layout 3"):
        Store(tmp_path)
    assert (tmp_path / "LAYOUT_VERSION").read_text() == "3\n"
