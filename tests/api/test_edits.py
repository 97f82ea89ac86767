"""ApplyEdits over real gRPC: every op against its numpy formula, atomicity, revisions."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from google.protobuf import struct_pb2

import weightsmith
from tests.conftest import ServerHandle, tiny_cnn_config, tiny_config
from weightsmith import edits
from weightsmith.v1 import edits_pb2, revision_pb2, selector_pb2, weight_service_pb2

ALL = weightsmith.Selector()


def _weights(client, model_id: str, revision: int = 0) -> dict[str, np.ndarray]:
    return client.read_weights(model_id, revision=revision)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.fixture
def cnn(client, model_id: str) -> str:
    client.create_model(model_id, keras_config=tiny_cnn_config(), seed=3)
    return model_id


# --- each op against its formula ------------------------------------------------


def test_assign_whole_and_slice(client, cnn: str) -> None:
    before = _weights(client, cnn)
    bias = np.arange(10, dtype=np.float32)
    patch = np.full((2, 3), 7.0, np.float32)
    response = client.apply_edits(
        cnn, [edits.assign("head/bias", bias), edits.assign("head/kernel", patch, begin=(1, 4))]
    )
    after = _weights(client, cnn)
    expected_kernel = before["head/kernel"].copy()
    expected_kernel[1:3, 4:7] = 7.0
    assert after["head/bias"].tobytes() == bias.tobytes()
    assert after["head/kernel"].tobytes() == expected_kernel.tobytes()
    assert response.results[1].elements_changed == 6
    assert response.results[1].delta_l2 == pytest.approx(
        float(np.linalg.norm(expected_kernel.astype(np.float64) - before["head/kernel"]))
    )


def test_scale_add_clip(client, cnn: str) -> None:
    before = _weights(client, cnn)
    response = client.apply_edits(
        cnn,
        [
            edits.scale("conv*/kernel", 0.5),
            edits.add("head/bias", 0.25),
            edits.clip("head/kernel", min=-0.1, max=0.1),
        ],
    )
    after = _weights(client, cnn)
    for name in ("conv1/kernel", "conv2/kernel"):
        assert after[name].tobytes() == (before[name] * 0.5).tobytes()
    assert after["head/bias"].tobytes() == (before["head/bias"] + 0.25).tobytes()
    assert after["head/kernel"].tobytes() == np.clip(before["head/kernel"], -0.1, 0.1).tobytes()
    scale_report = response.results[0]
    assert list(scale_report.variables) == ["conv1/kernel", "conv2/kernel"]
    delta = np.concatenate([(after[n] - before[n]).ravel() for n in ("conv1/kernel", "conv2/kernel")])
    assert scale_report.delta_l2 == pytest.approx(float(np.linalg.norm(delta.astype(np.float64))), rel=1e-6)
    assert scale_report.elements_changed == np.count_nonzero(delta)
    assert response.results[2].elements_changed == np.count_nonzero(np.abs(before["head/kernel"]) > 0.1)


def test_add_noise_is_seeded_normal_noise(client, cnn: str) -> None:
    before = _weights(client, cnn)
    response = client.apply_edits(cnn, [edits.add_noise("conv*/kernel", mean=0.1, stddev=0.01, seed=42)])
    after = _weights(client, cnn)
    rng = np.random.default_rng(42)
    for name in ("conv1/kernel", "conv2/kernel"):
        expected = (before[name].astype(np.float64) + rng.normal(0.1, 0.01, before[name].shape)).astype(
            np.float32
        )
        assert after[name].tobytes() == expected.tobytes()
    assert response.results[0].seed == 42


def test_reinitialize_equals_the_keras_initializer(client, cnn: str) -> None:
    import keras

    client.apply_edits(
        cnn,
        [
            edits.reinitialize("conv*/kernel", "random_normal", seed=7, mean=0.1, stddev=0.01),
            edits.reinitialize("head/kernel", "glorot_uniform", seed=11),
        ],
    )
    after = _weights(client, cnn)
    for index, name in enumerate(("conv1/kernel", "conv2/kernel")):
        init = keras.initializers.get(
            {"class_name": "random_normal", "config": {"mean": 0.1, "stddev": 0.01, "seed": 7 + index}}
        )
        assert after[name].tobytes() == np.asarray(init(after[name].shape, dtype="float32")).tobytes()
    glorot = keras.initializers.get({"class_name": "glorot_uniform", "config": {"seed": 11}})
    assert after["head/kernel"].tobytes() == np.asarray(glorot((8, 10), dtype="float32")).tobytes()


def test_prune_per_tensor_zeroes_exactly_the_smallest(client, cnn: str) -> None:
    before = _weights(client, cnn)
    client.apply_edits(cnn, [edits.prune("conv*/kernel", 0.6)])
    after = _weights(client, cnn)
    for name in ("conv1/kernel", "conv2/kernel"):
        old, new = before[name].ravel(), after[name].ravel()
        pruned = new == 0
        assert pruned.sum() == math.floor(0.6 * old.size)
        assert np.abs(old[pruned]).max() <= np.abs(old[~pruned]).min()
        assert (new[~pruned] == old[~pruned]).all()


def test_prune_global(client, cnn: str) -> None:
    before = _weights(client, cnn)
    client.apply_edits(cnn, [edits.prune("conv*/kernel", 0.5, scope="global")])
    after = _weights(client, cnn)
    old = np.concatenate([before[n].ravel() for n in ("conv1/kernel", "conv2/kernel")])
    new = np.concatenate([after[n].ravel() for n in ("conv1/kernel", "conv2/kernel")])
    pruned = new == 0
    assert pruned.sum() == math.floor(0.5 * old.size)
    assert np.abs(old[pruned]).max() <= np.abs(old[~pruned]).min()


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_prune_output_channels(client, cnn: str, norm: str) -> None:
    before = _weights(client, cnn)["conv2/kernel"]
    client.apply_edits(cnn, [edits.prune("conv2/kernel", 0.5, granularity="output_channel", norm=norm)])
    after = _weights(client, cnn)["conv2/kernel"]
    channels = before.reshape(-1, before.shape[-1]).astype(np.float64)
    norms = np.abs(channels).sum(0) if norm == "l1" else np.sqrt((channels**2).sum(0))
    zeroed = np.all(after.reshape(-1, after.shape[-1]) == 0, axis=0)
    assert zeroed.sum() == 4
    assert norms[zeroed].max() <= norms[~zeroed].min()
    assert (after[..., ~zeroed] == before[..., ~zeroed]).all()


def test_quantize_per_channel_and_per_tensor(client, cnn: str) -> None:
    before = _weights(client, cnn)
    client.apply_edits(
        cnn,
        [edits.quantize("conv2/kernel", bits=8), edits.quantize("head/kernel", bits=4, per_channel=False)],
    )
    after = _weights(client, cnn)
    w = before["conv2/kernel"]
    s = np.abs(w).max(axis=(0, 1, 2), keepdims=True) / 127
    assert after["conv2/kernel"].tobytes() == (np.round(w / s) * s).astype(np.float32).tobytes()
    h = before["head/kernel"]
    s4 = np.abs(h).max() / 7
    assert (
        after["head/kernel"].tobytes() == (np.clip(np.round(h / s4), -7, 7) * s4).astype(np.float32).tobytes()
    )
    assert len(np.unique(after["head/kernel"])) <= 15


def test_interpolate_task_vector_copy_from(client, model_id: str) -> None:
    ids = [f"{model_id}-{name}" for name in ("a", "b", "base", "tuned")]
    for seed, each in enumerate(ids):
        client.create_model(each, keras_config=tiny_cnn_config(), seed=seed)
    a, b, base, tuned = (_weights(client, each) for each in ids)

    client.apply_edits(ids[0], [edits.interpolate(ids[1], 0.25)])
    mixed = _weights(client, ids[0])
    for name in a:
        assert mixed[name].tobytes() == (0.75 * a[name] + 0.25 * b[name]).astype(np.float32).tobytes()

    client.apply_edits(ids[1], [edits.task_vector(ids[2], ids[3], 0.5, selector="*/kernel")])
    moved = _weights(client, ids[1])
    for name in b:
        expected = b[name] + 0.5 * (tuned[name] - base[name]) if name.endswith("kernel") else b[name]
        assert moved[name].tobytes() == expected.astype(np.float32).tobytes()

    client.apply_edits(ids[2], [edits.copy_from(ids[3], selector="head/*")])
    copied = _weights(client, ids[2])
    assert copied["head/kernel"].tobytes() == tuned["head/kernel"].tobytes()
    assert copied["conv1/kernel"].tobytes() == base["conv1/kernel"].tobytes()


def test_set_trainable(client, cnn: str) -> None:
    client.apply_edits(cnn, [edits.freeze(ALL), edits.unfreeze(weightsmith.Selector(layers=("head",)))])
    model = client.get_model(cnn)
    trainable = {v.path for v in model.variables if v.trainable}
    assert trainable == {"head/kernel", "head/bias"}
    assert {layer.name: layer.trainable for layer in model.layers}["conv1"] is False


# --- transfer learning ---------------------------------------------------------


def test_transfer_learning_surgery(client, model_id: str) -> None:
    client.create_model(
        model_id, architecture="MobileNetV2", include_top=False, input_shape=(32, 32, 3), seed=0
    )
    before = _weights(client, model_id)
    response = client.apply_edits(
        model_id,
        [
            edits.replace_head(
                "out_relu",
                [
                    edits.layer("GlobalAveragePooling2D"),
                    edits.layer("Dropout", rate=0.2),
                    edits.layer("Dense", units=5, activation="softmax"),
                ],
                seed=1,
            ),
            edits.freeze(ALL),
            edits.unfreeze(weightsmith.Selector(layer_range=(-3, None))),
        ],
        message="new 5-way head",
    )
    assert response.revision.architecture_changed
    model = client.get_model(model_id)
    assert [layer.class_name for layer in model.layers[-3:]] == ["GlobalAveragePooling2D", "Dropout", "Dense"]
    assert list(model.outputs[0].shape) == [-1, 5]
    assert {v.path for v in model.variables if v.trainable} == {"head_dense/kernel", "head_dense/bias"}
    after = _weights(client, model_id)
    assert all(after[k].tobytes() == v.tobytes() for k, v in before.items())
    probabilities = client.predict(
        model_id, np.random.default_rng(0).random((4, 32, 32, 3), np.float32)
    ).output
    assert probabilities.shape == (4, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


# --- atomicity, concurrency, dry runs -----------------------------------------


def test_invalid_third_op_changes_nothing(client, server: ServerHandle, cnn: str) -> None:
    before, revision = _weights(client, cnn), client.get_model(cnn).revision
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.apply_edits(
            cnn, [edits.scale(ALL, 2.0), edits.add("head/bias", 1.0), edits.prune("nothing/*", 0.5)]
        )
    assert caught.value.field_violations[0][0] == "edits[2].prune.selector"
    assert _same(_weights(client, cnn), before)
    assert client.get_model(cnn).revision == revision
    assert not list((server.store / "models" / cnn / "revisions").glob(".staging-*"))


def test_dry_run_reports_the_same_and_commits_nothing(client, cnn: str) -> None:
    batch = [
        edits.scale("conv*/kernel", 0.5),
        edits.prune("head/kernel", 0.5),
        edits.add_noise(ALL, stddev=0.1, seed=1),
    ]
    before = _weights(client, cnn)
    dry = client.apply_edits(cnn, batch, dry_run=True)
    assert not dry.HasField("revision")
    assert _same(_weights(client, cnn), before)
    real = client.apply_edits(cnn, batch)
    assert real.revision.revision == 2
    for a, b in zip(dry.results, real.results, strict=True):
        assert (a.op, list(a.variables), a.elements_changed) == (b.op, list(b.variables), b.elements_changed)
        assert a.delta_l2 == pytest.approx(b.delta_l2)
    assert [e.op for e in client.get_revision(cnn, 2).edits] == ["scale", "prune", "add_noise"]


def test_concurrent_predict_never_sees_a_mixed_state(client, server: ServerHandle, model_id: str) -> None:
    import keras

    config = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, name="a"),
            keras.layers.Dense(1, use_bias=False, name="b"),
        ]
    ).to_json()
    client.create_model(model_id, keras_config=config)
    one = np.ones((1, 1), np.float32)
    client.apply_edits(model_id, [edits.assign("a/kernel", one), edits.assign("b/kernel", one)])
    stop = threading.Event()
    seen: list[float] = []
    errors: list[Exception] = []

    def reader() -> None:
        try:
            with weightsmith.Client(server.address) as own:
                while not stop.is_set():
                    seen.append(float(own.predict(model_id, one).output[0, 0]))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for c in range(2, 52):
        value = np.full((1, 1), float(c), np.float32)
        client.apply_edits(model_id, [edits.assign("a/kernel", value), edits.assign("b/kernel", value)])
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors
    assert seen
    assert all(math.isqrt(int(v)) ** 2 == int(v) and v == int(v) for v in seen), sorted(set(seen))[:10]


def test_expected_revision_and_racing_editors(client, server: ServerHandle, cnn: str) -> None:
    with pytest.raises(weightsmith.AbortedError) as caught:
        client.apply_edits(cnn, [edits.scale(ALL, 2.0)], expected_revision=7)
    assert caught.value.field_violations[0][0] == "expected_revision"
    for round_number in range(1, 4):
        outcomes: list[tuple[str, float]] = []

        def edit(value: float, expected: int = round_number, outcomes: list = outcomes) -> None:
            with weightsmith.Client(server.address) as own:
                try:
                    own.apply_edits(
                        cnn,
                        [edits.assign("head/bias", np.full(10, value, np.float32))],
                        expected_revision=expected,
                    )
                    outcomes.append(("won", value))
                except weightsmith.AbortedError:
                    outcomes.append(("aborted", value))

        threads = [threading.Thread(target=edit, args=(round_number * 10.0 + i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [v for outcome, v in outcomes if outcome == "won"]
        assert len(winners) == 1 and len(outcomes) == 4
        assert client.get_model(cnn).revision == round_number + 1
        assert client.read_weights(cnn, "head/bias")["head/bias"][0] == winners[0]


# --- revisions -------------------------------------------------------------------


def test_diff_revisions(client, cnn: str) -> None:
    before = _weights(client, cnn)
    client.apply_edits(
        cnn, [edits.scale("head/kernel", 2.0), edits.assign("head/bias", np.ones(10, np.float32))]
    )
    diff = client.diff_revisions(cnn, 1, 2)
    by_path = {d.path: d for d in diff.changed}
    assert set(by_path) == {"head/kernel", "head/bias"}
    delta = (before["head/kernel"] * 2 - before["head/kernel"]).astype(np.float64)
    assert by_path["head/kernel"].delta_l2 == pytest.approx(float(np.linalg.norm(delta)))
    assert by_path["head/kernel"].max_abs_delta == pytest.approx(float(np.abs(delta).max()))
    assert by_path["head/kernel"].fraction_changed == pytest.approx(np.count_nonzero(delta) / delta.size)
    assert diff.unchanged_count == 8
    assert not diff.architecture_changed
    client.apply_edits(cnn, [edits.replace_head("pool", [edits.layer("Dense", units=3)])])
    surgery = client.diff_revisions(cnn, 2)
    assert surgery.architecture_changed
    assert set(surgery.removed) == {"head/kernel", "head/bias"}
    assert set(surgery.added) == {"head_dense/kernel", "head_dense/bias"}


def _mixed_edits(client, model_id: str) -> None:
    rng = np.random.default_rng(0)
    for step in range(20):
        if step == 7:
            batch = [edits.replace_head("pool", [edits.layer("Dense", units=6)], seed=step)]
        elif step % 4 == 0:
            batch = [edits.prune("*/kernel", 0.3)]
        elif step % 4 == 1:
            batch = [edits.add_noise(ALL, stddev=0.01, seed=step), edits.clip(ALL, min=-1, max=1)]
        elif step % 4 == 2:
            batch = [edits.freeze(weightsmith.Selector(layer_range=(None, 3)))]
        else:
            batch = [edits.scale("conv2/*", float(rng.uniform(0.5, 1.5)))]
        client.apply_edits(model_id, batch, message=f"step {step}")


def test_revert_after_mixed_edits_is_bit_exact(client, cnn: str) -> None:
    target_model, target = client.get_model(cnn), _weights(client, cnn)
    _mixed_edits(client, cnn)
    middle = client.get_model(cnn)
    assert middle.revision == 21 and [layer.name for layer in middle.layers] != [
        layer.name for layer in target_model.layers
    ]
    revision = client.revert_model(cnn, 1, expected_revision=21, message="back to the start")
    assert revision.revision == 22 and revision.reverted_to == 1
    assert revision.kind == revision_pb2.REVISION_KIND_REVERT
    assert revision.stored_bytes == 0
    reverted = client.get_model(cnn)
    assert [(layer.name, layer.class_name, layer.trainable) for layer in reverted.layers] == [
        (layer.name, layer.class_name, layer.trainable) for layer in target_model.layers
    ]
    assert list(reverted.outputs[0].shape) == list(target_model.outputs[0].shape)
    assert _same(_weights(client, cnn), target)
    assert client.diff_revisions(cnn, 1, 22).changed == []


# --- storage -------------------------------------------------------------------


def _folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_small_edits_store_only_what_changed(client, server: ServerHandle, model_id: str) -> None:
    import keras

    config = keras.Sequential([keras.Input((5000,)), keras.layers.Dense(5000, name="big")]).to_json()
    model = client.create_model(model_id, keras_config=config)
    assert model.weight_bytes >= 100_000_000
    folder = server.store / "models" / model_id
    start = _folder_bytes(folder)
    for step in range(100):
        client.apply_edits(model_id, [edits.add("big/bias", 0.001)], message=f"bias {step}")
    growth = _folder_bytes(folder) - start
    assert client.get_model(model_id).revision == 101
    assert growth < model.weight_bytes / 20, growth  # 100 bias copies + metadata, not model copies
    bias = client.read_weights(model_id, "big/bias", revision=51)["big/bias"]
    np.testing.assert_allclose(bias, np.full(5000, 0.05, np.float32), rtol=1e-4)
    client.delete_model(model_id)


def test_retention_keeps_the_last_revisions_exactly(tmp_path) -> None:
    from tests.conftest import _start_in_thread, _stop_in_thread

    handle, thread = _start_in_thread(tmp_path / "store", retain_revisions=3)
    try:
        with weightsmith.Client(handle.address) as own:
            own.create_model("kept", keras_config=tiny_cnn_config(), seed=1)
            own.apply_edits("kept", [edits.scale("conv1/kernel", 2.0)])
            snapshots = {}
            for step in range(5):
                own.apply_edits("kept", [edits.add("head/bias", float(step))])
                snapshots[own.get_model("kept").revision] = _weights(own, "kept")
            assert [r.revision for r in own.iter_revisions("kept")] == [7, 6, 5]
            for number in (5, 6, 7):
                assert _same(_weights(own, "kept", revision=number), snapshots[number])
            with pytest.raises(weightsmith.NotFoundError):
                own.read_weights("kept", revision=2)
            own.revert_model("kept", 5)
            assert _same(_weights(own, "kept"), snapshots[5])
    finally:
        _stop_in_thread(handle, thread)


# --- bad input ---------------------------------------------------------------------


def _selector(*patterns: str) -> selector_pb2.VariableSelector:
    return selector_pb2.VariableSelector(patterns=list(patterns))


def _struct(**values: object) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


BAD_EDITS = [
    ("no op", edits_pb2.Edit(), "edits[1]", "UNKNOWN_EDIT"),
    (
        "unknown initializer",
        edits_pb2.Edit(reinitialize=edits_pb2.ReinitializeOp(selector=_selector("*"), initializer="nope")),
        "edits[1].reinitialize.initializer",
        "UNKNOWN_INITIALIZER",
    ),
    (
        "bad initializer config",
        edits_pb2.Edit(
            reinitialize=edits_pb2.ReinitializeOp(
                selector=_selector("*"), initializer="random_normal", config=_struct(wrong=1)
            )
        ),
        "edits[1].reinitialize.config",
        "INVALID_INITIALIZER_CONFIG",
    ),
    (
        "sparsity 1",
        edits_pb2.Edit(prune=edits_pb2.PruneOp(selector=_selector("*"), sparsity=1.0)),
        "edits[1].prune.sparsity",
        "INVALID_SPARSITY",
    ),
    (
        "sparsity negative",
        edits_pb2.Edit(prune=edits_pb2.PruneOp(selector=_selector("*"), sparsity=-0.1)),
        "edits[1].prune.sparsity",
        "INVALID_SPARSITY",
    ),
    (
        "bits 1",
        edits_pb2.Edit(quantize=edits_pb2.QuantizeOp(selector=_selector("*"), bits=1)),
        "edits[1].quantize.bits",
        "INVALID_BITS",
    ),
    (
        "bits 17",
        edits_pb2.Edit(quantize=edits_pb2.QuantizeOp(selector=_selector("*"), bits=17)),
        "edits[1].quantize.bits",
        "INVALID_BITS",
    ),
    (
        "interpolate other architecture",
        edits_pb2.Edit(interpolate=edits_pb2.InterpolateOp(other_model_id="OTHER", alpha=0.5)),
        "edits[1].interpolate.other_model_id",
        "ARCHITECTURE_MISMATCH",
    ),
    (
        "interpolate unknown model",
        edits_pb2.Edit(interpolate=edits_pb2.InterpolateOp(other_model_id="no-such-model", alpha=0.5)),
        "edits[1].interpolate.other_model_id",
        "MODEL_NOT_FOUND",
    ),
    (
        "lambda head",
        edits_pb2.Edit(
            replace_head=edits_pb2.ReplaceHeadOp(
                cut_at_layer="pool", layers=[edits_pb2.LayerSpec(class_name="Lambda")]
            )
        ),
        "edits[1].replace_head.layers[0].class_name",
        "UNKNOWN_LAYER_CLASS",
    ),
    (
        "unknown layer class",
        edits_pb2.Edit(
            replace_head=edits_pb2.ReplaceHeadOp(
                cut_at_layer="pool", layers=[edits_pb2.LayerSpec(class_name="NoSuchLayer")]
            )
        ),
        "edits[1].replace_head.layers[0].class_name",
        "UNKNOWN_LAYER_CLASS",
    ),
    (
        "unknown cut layer",
        edits_pb2.Edit(
            replace_head=edits_pb2.ReplaceHeadOp(
                cut_at_layer="nope", layers=[edits_pb2.LayerSpec(class_name="Dense", config=_struct(units=2))]
            )
        ),
        "edits[1].replace_head.cut_at_layer",
        "UNKNOWN_LAYER",
    ),
    (
        "empty selection",
        edits_pb2.Edit(scale=edits_pb2.ScaleOp(selector=_selector("zzz*"), factor=2)),
        "edits[1].scale.selector",
        "EMPTY_SELECTION",
    ),
    (
        "unknown exact path",
        edits_pb2.Edit(
            scale=edits_pb2.ScaleOp(selector=selector_pb2.VariableSelector(paths=["x/kernel"]), factor=2)
        ),
        "edits[1].scale.selector.paths[0]",
        "UNKNOWN_VARIABLE",
    ),
    (
        "non-finite factor",
        edits_pb2.Edit(scale=edits_pb2.ScaleOp(selector=_selector("*"), factor=float("inf"))),
        "edits[1].scale.factor",
        "NOT_FINITE",
    ),
    (
        "overflowing result",
        edits_pb2.Edit(scale=edits_pb2.ScaleOp(selector=_selector("*"), factor=1e300)),
        "edits[1].scale.selector",
        "NON_FINITE_RESULT",
    ),
    (
        "clip min above max",
        edits_pb2.Edit(clip=edits_pb2.ClipOp(selector=_selector("*"), min=1, max=0)),
        "edits[1].clip.max",
        "INVALID_BOUNDS",
    ),
    (
        "assign wrong shape",
        edits_pb2.Edit(
            assign=edits_pb2.AssignOp(
                variable="head/bias", value=weightsmith.wire.tensor_to_proto(np.zeros(3, np.float32))
            )
        ),
        "edits[1].assign.value.shape",
        "WRONG_SHAPE",
    ),
]


@pytest.mark.parametrize("case", BAD_EDITS, ids=[c[0] for c in BAD_EDITS])
def test_bad_edits_change_nothing(client, server: ServerHandle, cnn: str, case) -> None:
    import grpc

    from weightsmith.errors import from_rpc_error
    from weightsmith.v1 import weight_service_pb2_grpc

    name, bad, field, reason = case
    if bad.WhichOneof("op") == "interpolate" and bad.interpolate.other_model_id == "OTHER":
        other = f"{cnn}-other"
        client.create_model(other, keras_config=tiny_config())
        bad = edits_pb2.Edit(interpolate=edits_pb2.InterpolateOp(other_model_id=other, alpha=0.5))
    before, revision = _weights(client, cnn), client.get_model(cnn).revision
    request = weight_service_pb2.ApplyEditsRequest(model_id=cnn, edits=[edits.scale(ALL, 2.0), bad])
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as caught:
        weight_service_pb2_grpc.WeightServiceStub(channel).ApplyEdits(request)
    error = from_rpc_error(caught.value)
    expected = weightsmith.NotFoundError if reason == "MODEL_NOT_FOUND" else weightsmith.InvalidArgumentError
    assert isinstance(error, expected), name
    assert error.reason == reason, name
    assert error.field_violations[0][0] == field, name
    assert _same(_weights(client, cnn), before), name
    assert client.get_model(cnn).revision == revision, name


def test_no_edits(server: ServerHandle, cnn: str) -> None:
    import grpc

    from weightsmith.errors import from_rpc_error
    from weightsmith.v1 import weight_service_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = weight_service_pb2_grpc.WeightServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ApplyEdits(weight_service_pb2.ApplyEditsRequest(model_id=cnn))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(caught.value).field_violations[0][0] == "edits"


# --- the fast path of a small edit ------------------------------------------------


def _exact_stats(new: np.ndarray, old: np.ndarray) -> tuple[int, float]:
    difference = (new.astype(np.float64) - old.astype(np.float64)).ravel()
    return int(np.count_nonzero(new != old)), math.fsum(difference * difference)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_change_stats_count_exactly_and_sum_within_1e6(dtype) -> None:
    from weightsmith_server.numerics import change_stats

    rng = np.random.default_rng(7)
    old = rng.standard_normal(70_001).astype(dtype)
    cases = {
        "small edit": old * dtype(1.0001),
        "far values": (rng.standard_normal(old.size) * 1e4).astype(dtype),
        "some unchanged": np.where(rng.random(old.size) < 0.5, old, old + 1).astype(dtype),
        "signed zeros": np.where(old > 0, dtype(-0.0), old).astype(dtype),
    }
    exact = dtype != np.float32  # float32 sums in float32, pairwise
    for name, new in cases.items():
        changed, squares = change_stats(new, old)
        exact_changed, exact_squares = _exact_stats(new, old)
        assert changed == exact_changed, name
        assert squares == pytest.approx(exact_squares, rel=1e-12 if exact else 1e-6, abs=0), name
    big = np.array([3e38, -3e38], np.float32)  # squares beyond float32's range: summed in float64
    assert change_stats(big, -big) == (2, pytest.approx(2 * (2 * float(big[0])) ** 2, rel=1e-15))
    assert math.isnan(change_stats(np.ones(2, np.float32), np.array([1, np.nan], np.float32))[1])


def _wide_config() -> str:
    """One Dense layer whose kernel (512×600 float32, 1.2 MB) is written on the edits' worker thread."""
    import keras

    return keras.Sequential([keras.Input((512,)), keras.layers.Dense(600, name="wide")]).to_json()


@pytest.mark.parametrize(("config", "path"), [("cnn", "conv2/kernel"), ("wide", "wide/kernel")])
def test_scale_writes_exactly_and_reports_exact_statistics(
    client, server: ServerHandle, model_id: str, config: str, path: str
) -> None:
    client.create_model(
        model_id, keras_config=tiny_cnn_config() if config == "cnn" else _wide_config(), seed=5
    )
    before = _weights(client, model_id)
    response = client.apply_edits(model_id, [edits.scale(path, 1.0001)])
    after = _weights(client, model_id)
    assert after[path].tobytes() == (before[path] * 1.0001).tobytes()
    changed, squares = _exact_stats(after[path], before[path])
    assert response.results[0].elements_changed == changed
    assert response.results[0].delta_l2 == pytest.approx(math.sqrt(squares), rel=1e-6)
    assert list(response.revision.changed_variables) == [path]
    assert _same(
        {k: v for k, v in after.items() if k != path}, {k: v for k, v in before.items() if k != path}
    )
    assert client.get_revision(model_id, 2).edits[0].delta_l2 == response.results[0].delta_l2
    assert not list((server.store / "models" / model_id / "revisions").glob(".staging-*"))


def test_literal_selectors_match_only_their_own_variable(client, cnn: str) -> None:
    before = _weights(client, cnn)
    response = client.apply_edits(
        cnn,
        [
            edits.add(weightsmith.Selector(patterns=["head/bias"], paths=["conv1/bias"]), 1.0),
            edits.scale(weightsmith.Selector(patterns=["head/kernel"], kinds=["kernel"]), 2.0),
        ],
        dry_run=True,
    )
    assert list(response.results[0].variables) == ["conv1/bias", "head/bias"]  # model order
    assert list(response.results[1].variables) == ["head/kernel"]
    for bad, reason in (
        (weightsmith.Selector(patterns=["head/Bias"]), "EMPTY_SELECTION"),
        (weightsmith.Selector(patterns=["head/kernel"], kinds=["bias"]), "EMPTY_SELECTION"),
        (weightsmith.Selector(paths=["head/nothing"]), "UNKNOWN_VARIABLE"),
    ):
        with pytest.raises(weightsmith.InvalidArgumentError) as caught:
            client.apply_edits(cnn, [edits.scale(bad, 2.0)])
        assert caught.value.reason == reason
    assert _same(_weights(client, cnn), before)


def test_a_failing_batch_leaves_no_staged_files(client, server: ServerHandle, cnn: str) -> None:
    before, revision = _weights(client, cnn), client.get_model(cnn).revision
    with pytest.raises(weightsmith.InvalidArgumentError) as caught:
        client.apply_edits(cnn, [edits.scale(ALL, 0.5), edits.scale("head/*", 1e300)])
    assert caught.value.reason == "NON_FINITE_RESULT"
    assert caught.value.field_violations[0][0] == "edits[1].scale.selector"
    assert _same(_weights(client, cnn), before)
    assert client.get_model(cnn).revision == revision
    assert not list((server.store / "models" / cnn / "revisions").glob(".staging-*"))
