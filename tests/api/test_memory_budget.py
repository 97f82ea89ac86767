"""The memory budget per device: least-recently-used idle models are unloaded, still listed,
reloaded bit-exactly on their next use; RESOURCE_EXHAUSTED when nothing can make room."""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

import weightsmith
from tests.conftest import ServerHandle, _start_in_thread, _stop_in_thread, tiny_config
from weightsmith import edits
from weightsmith_server.models.local_host import LocalModelHost
from weightsmith_server.models.resident import ResidentModel


def _device_policy() -> str:
    """One device, so that the budget's choices are known: the first GPU if there is one."""
    import tensorflow as tf

    return "gpu:0" if tf.config.list_physical_devices("GPU") else "cpu"


POLICY = _device_policy()
DEVICE = "/device:GPU:0" if POLICY == "gpu:0" else "/device:CPU:0"
MIB = 1024 * 1024
# A Dense(100 -> 1000 -> 2) model: 412,008 bytes of float32 variables; a 1 MiB budget holds two.
UNITS, INPUTS = 1000, 100
MODEL_BYTES = (INPUTS * UNITS + UNITS + UNITS * 2 + 2) * 4


def _config(units: int = UNITS) -> str:
    return tiny_config(units, inputs=INPUTS)


@pytest.fixture
def budget_server(tmp_path: Path) -> Iterator[ServerHandle]:
    """A server on one device whose memory budget holds two of the models above."""
    handle, thread = _start_in_thread(tmp_path / "store", device=POLICY, memory_budget_mb=1)
    yield handle
    _stop_in_thread(handle, thread)


@pytest.fixture
def budget_client(budget_server: ServerHandle) -> Iterator[weightsmith.Client]:
    with weightsmith.Client(budget_server.address, author="tests") as connected:
        yield connected


def _host(server: ServerHandle) -> LocalModelHost:
    return server.running.host  # type: ignore[attr-defined]


def _resident_flags(client: weightsmith.Client) -> dict[str, bool]:
    return {m.model_id: m.resident for m in client.iter_models()}


def _unloads() -> float:
    return REGISTRY.get_sample_value("weightsmith_model_unloads_total", {"device": DEVICE}) or 0.0


def _bytes(weights: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {path: value.tobytes() for path, value in weights.items()}


def test_the_least_recently_used_idle_model_is_unloaded_and_stays_listed(
    budget_client: weightsmith.Client, budget_server: ServerHandle
) -> None:
    unloads = _unloads()
    budget_client.create_model("m1", keras_config=_config(), seed=1)
    budget_client.predict("m1", np.zeros((1, INPUTS), np.float32))
    first = _host(budget_server).run("m1", lambda resident: weakref.ref(resident.state.keras_model))
    budget_client.create_model("m2", keras_config=_config(), seed=1)
    device = budget_client.server_info().devices[0]
    assert (device.memory_budget_bytes, device.resident_bytes) == (MIB, 2 * MODEL_BYTES)

    created = budget_client.create_model("m3", keras_config=_config(), seed=1)

    assert created.resident and created.device == DEVICE
    assert _resident_flags(budget_client) == {"m1": False, "m2": True, "m3": True}
    unloaded = budget_client.get_model("m1")
    assert not unloaded.resident
    assert unloaded.device == ""
    assert (unloaded.revision, unloaded.weight_bytes) == (1, MODEL_BYTES)
    assert [layer.name for layer in unloaded.layers] == ["hidden", "logits"]
    assert [tuple(s.shape) for s in unloaded.inputs] == [(-1, INPUTS)]
    # Neither GetModel nor ListModels loaded it back.
    assert _host(budget_server).placements() == {DEVICE: ["m2", "m3"]}
    device = budget_client.server_info().devices[0]
    assert sorted(device.model_ids) == ["m2", "m3"]
    assert device.resident_bytes == 2 * MODEL_BYTES
    assert _unloads() == unloads + 1
    assert first() is None  # its Keras model (and variables) were freed, not just forgotten


def test_a_use_makes_a_model_the_most_recently_used(budget_client: weightsmith.Client) -> None:
    for name in ("m1", "m2"):
        budget_client.create_model(name, keras_config=_config(), seed=2)
    budget_client.predict("m1", np.zeros((1, INPUTS), np.float32))  # m1 used after m2

    budget_client.create_model("m3", keras_config=_config(), seed=2)

    assert _resident_flags(budget_client) == {"m1": True, "m2": False, "m3": True}
    budget_client.get_model("m1")  # metadata is no use: m1 stays older than m3
    budget_client.read_weights("m3", "logits/bias")
    budget_client.read_weights("m2", "logits/bias")  # reloads m2, unloading m1
    assert _resident_flags(budget_client) == {"m1": False, "m2": True, "m3": True}


def test_an_unloaded_model_is_reloaded_bit_exactly_by_its_next_use(
    budget_client: weightsmith.Client, budget_server: ServerHandle
) -> None:
    budget_client.create_model("m1", keras_config=_config(), seed=3)
    rng = np.random.default_rng(3)
    new = {"hidden/kernel": rng.normal(size=(INPUTS, UNITS)).astype(np.float32)}
    assert budget_client.write_weights("m1", new).revision == 2
    before = budget_client.read_weights("m1")
    batch = rng.normal(size=(3, INPUTS)).astype(np.float32)
    outputs = budget_client.predict("m1", batch).outputs["logits"]
    budget_client.create_model("m2", keras_config=_config(), seed=4)
    budget_client.create_model("m3", keras_config=_config(), seed=5)
    assert not budget_client.get_model("m1").resident
    # History and old revisions are read from the store without a reload.
    assert [r.revision for r in budget_client.iter_revisions("m1")] == [2, 1]
    assert _bytes(budget_client.read_weights("m1", revision=1)) != _bytes(before)
    assert not budget_client.get_model("m1").resident

    after = budget_client.read_weights("m1")

    assert _bytes(after) == _bytes(before)
    reloaded = budget_client.get_model("m1")
    assert (reloaded.resident, reloaded.revision, reloaded.device) == (True, 2, DEVICE)
    assert _resident_flags(budget_client) == {"m1": True, "m2": False, "m3": True}
    assert budget_client.predict("m1", batch).outputs["logits"].tobytes() == outputs.tobytes()
    assert budget_client.write_weights("m1", {"logits/bias": np.ones(2, np.float32)}).revision == 3
    # A write to an unloaded model reloads it, then commits on top of what it had.
    assert budget_client.write_weights("m2", {"logits/bias": np.ones(2, np.float32)}).revision == 2
    assert _host(budget_server).placements() == {DEVICE: ["m1", "m2"]}


def test_a_model_larger_than_the_whole_budget_is_refused_and_not_created(
    budget_client: weightsmith.Client, budget_server: ServerHandle
) -> None:
    budget_client.create_model("m1", keras_config=_config(), seed=1)
    with pytest.raises(weightsmith.ResourceExhaustedError) as caught:
        budget_client.create_model("huge", keras_config=_config(3000), seed=1)

    error = caught.value
    assert error.reason == "MODEL_EXCEEDS_MEMORY_BUDGET"
    needed = (INPUTS * 3000 + 3000 + 3000 * 2 + 2) * 4
    assert error.metadata == {"device": DEVICE, "budget_bytes": str(MIB), "needed_bytes": str(needed)}
    with pytest.raises(weightsmith.NotFoundError):
        budget_client.get_model("huge")
    assert not (budget_server.store / "models" / "huge").exists()
    assert _resident_flags(budget_client) == {"m1": True}  # nothing was unloaded for it
    assert budget_client.create_model("huge", keras_config=_config(), seed=1).revision == 1


def test_an_upload_larger_than_the_budget_is_refused_and_its_id_freed(
    budget_client: weightsmith.Client, budget_server: ServerHandle, tmp_path: Path
) -> None:
    import keras

    path = tmp_path / "huge.keras"
    keras.models.model_from_json(_config(3000)).save(path)
    with pytest.raises(weightsmith.ResourceExhaustedError) as caught:
        budget_client.upload_model(path, "huge")
    assert caught.value.reason == "MODEL_EXCEEDS_MEMORY_BUDGET"
    with pytest.raises(weightsmith.NotFoundError):
        budget_client.get_model("huge")
    assert list((budget_server.store / "tmp").iterdir()) == []
    keras.models.model_from_json(_config()).save(path)
    assert budget_client.upload_model(path, "huge").resident


def test_models_in_use_are_never_unloaded(
    budget_client: weightsmith.Client, budget_server: ServerHandle
) -> None:
    host = _host(budget_server)
    for name in ("m1", "m2"):
        budget_client.create_model(name, keras_config=_config(), seed=1)
    assert host.reserve_for_job("m1", "job-holding-m1")  # as an in-place job does
    entered, leave = threading.Event(), threading.Event()

    def hold(resident: ResidentModel) -> None:
        entered.set()
        leave.wait(60)

    call = threading.Thread(target=host.run, args=("m2", hold))  # a call in progress on m2
    call.start()
    try:
        assert entered.wait(30)
        with pytest.raises(weightsmith.ResourceExhaustedError) as caught:
            budget_client.create_model("m3", keras_config=_config(), seed=1)
        assert caught.value.reason == "MEMORY_BUDGET_EXHAUSTED"
        assert caught.value.metadata == {
            "device": DEVICE,
            "budget_bytes": str(MIB),
            "needed_bytes": str(MODEL_BYTES),
            "resident_bytes": str(2 * MODEL_BYTES),
        }
        with pytest.raises(weightsmith.NotFoundError):
            budget_client.get_model("m3")
        assert _resident_flags(budget_client) == {"m1": True, "m2": True}
    finally:
        leave.set()
        call.join(30)
    # m2's call ended, m1 is still held by its job: m2 goes, although m1 is older.
    budget_client.create_model("m3", keras_config=_config(), seed=1)
    assert _resident_flags(budget_client) == {"m1": True, "m2": False, "m3": True}
    host.release_job("m1", "job-holding-m1")
    budget_client.read_weights("m2", "logits/bias")
    assert _resident_flags(budget_client) == {"m1": False, "m2": True, "m3": True}


def test_a_commit_that_grows_a_model_makes_room_first_or_commits_nothing(
    budget_client: weightsmith.Client, budget_server: ServerHandle
) -> None:
    for name in ("m1", "m2"):
        budget_client.create_model(name, keras_config=_config(), seed=1)
    # 1000 -> 60 units instead of 1000 -> 2: 232,232 bytes more, past the budget with m2 resident.
    grow = [edits.replace_head("hidden", [edits.layer("Dense", units=60)], seed=0)]
    entered, leave = threading.Event(), threading.Event()

    def hold(resident: ResidentModel) -> None:
        entered.set()
        leave.wait(60)

    call = threading.Thread(target=_host(budget_server).run, args=("m2", hold))
    call.start()
    try:
        assert entered.wait(30)
        with pytest.raises(weightsmith.ResourceExhaustedError) as caught:
            budget_client.apply_edits("m1", grow)
        assert caught.value.reason == "MEMORY_BUDGET_EXHAUSTED"
        assert budget_client.get_model("m1").revision == 1
        assert [r.revision for r in budget_client.iter_revisions("m1")] == [1]
    finally:
        leave.set()
        call.join(30)

    assert budget_client.apply_edits("m1", grow).revision.revision == 2

    assert _resident_flags(budget_client) == {"m1": True, "m2": False}
    assert budget_client.server_info().devices[0].resident_bytes == MODEL_BYTES + 232_232


def test_deleting_an_unloaded_model_does_not_load_it(
    budget_client: weightsmith.Client, budget_server: ServerHandle
) -> None:
    for name in ("m1", "m2", "m3"):
        budget_client.create_model(name, keras_config=_config(), seed=1)
    budget_client.delete_model("m1")
    assert _resident_flags(budget_client) == {"m2": True, "m3": True}
    assert not (budget_server.store / "models" / "m1").exists()
    assert budget_client.create_model("m1", keras_config=_config(), seed=9).revision == 1


def test_a_restart_with_more_models_than_the_budget_places_what_fits(tmp_path: Path) -> None:
    from tests.api.test_lazy_restore import wait_restored

    store = tmp_path / "store"
    handle, thread = _start_in_thread(store, device=POLICY)  # the automatic budget holds them all
    try:
        with weightsmith.Client(handle.address) as client:
            for index, name in enumerate(("m1", "m2", "m3")):
                client.create_model(name, keras_config=_config(), seed=index)
            client.write_weights("m3", {"logits/bias": np.array([1.5, -2.5], np.float32)})
            before = {name: _bytes(client.read_weights(name)) for name in ("m1", "m2", "m3")}
            described = client.get_model("m1")
    finally:
        _stop_in_thread(handle, thread)

    handle, thread = _start_in_thread(store, device=POLICY, memory_budget_mb=1)
    try:
        wait_restored(handle)
        with weightsmith.Client(handle.address) as client:
            # Most recently committed first: m3 (edited last), then m2; m1 does not fit.
            assert _resident_flags(client) == {"m1": False, "m2": True, "m3": True}
            listed = client.get_model("m1")
            assert not listed.resident
            described.ClearField("resident")
            described.ClearField("device")
            assert listed == described
            assert _bytes(client.read_weights("m1")) == before["m1"]
            assert _resident_flags(client) == {"m1": True, "m2": False, "m3": True}
            for name in ("m2", "m3"):
                assert _bytes(client.read_weights(name)) == before[name]
            assert client.get_model("m3").revision == 2
    finally:
        _stop_in_thread(handle, thread)


def test_a_restart_with_a_budget_smaller_than_a_model_keeps_it_listed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    handle, thread = _start_in_thread(store, device=POLICY)
    try:
        with weightsmith.Client(handle.address) as client:
            client.create_model("big", keras_config=_config(3000), seed=1)
    finally:
        _stop_in_thread(handle, thread)
    handle, thread = _start_in_thread(store, device=POLICY, memory_budget_mb=1)
    try:
        with weightsmith.Client(handle.address) as client:
            assert _resident_flags(client) == {"big": False}
            with pytest.raises(weightsmith.ResourceExhaustedError) as caught:
                client.predict("big", np.zeros((1, INPUTS), np.float32))
            assert caught.value.reason == "MODEL_EXCEEDS_MEMORY_BUDGET"
            client.delete_model("big")
            assert _resident_flags(client) == {}
    finally:
        _stop_in_thread(handle, thread)


def _stress_seconds() -> float:
    return 60.0 if os.environ.get("WEIGHTSMITH_STRESS") else 4.0


def _churn(budget_server: ServerHandle, seconds: float) -> None:
    """Threads read, write and predict over four models while the budget holds two.

    Every read must match the last value written to that model (each thread
    owns one model's bias), the budget must hold at every sample, and the
    only error allowed is MEMORY_BUDGET_EXHAUSTED (both resident models busy).
    """
    names = ["m1", "m2", "m3", "m4"]
    unloads = _unloads()
    with weightsmith.Client(budget_server.address) as client:
        for name in names:
            client.create_model(name, keras_config=_config(), seed=1)
    failures: list[str] = []
    exhausted = [0]
    stop = time.monotonic() + seconds
    host = _host(budget_server)

    def work(name: str, seed: int) -> None:
        rng = random.Random(seed)
        expected = None
        with weightsmith.Client(budget_server.address) as client:
            while time.monotonic() < stop and not failures:
                try:
                    action = rng.choice(("write", "read", "predict", "read"))
                    if action == "write":
                        value = np.array([rng.random(), rng.random()], np.float32)
                        client.write_weights(name, {"logits/bias": value})
                        expected = value
                    elif action == "read":
                        got = client.read_weights(name, "logits/bias")["logits/bias"]
                        if expected is not None and got.tobytes() != expected.tobytes():
                            failures.append(f"{name}: read {got} after writing {expected}")
                    else:
                        client.predict(name, np.zeros((2, INPUTS), np.float32))
                except weightsmith.ResourceExhaustedError as exc:
                    if exc.reason != "MEMORY_BUDGET_EXHAUSTED":
                        failures.append(f"{name}: {exc}")
                    exhausted[0] += 1
                except Exception as exc:  # any other error fails the test
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=work, args=(name, i)) for i, name in enumerate(names)]
    for worker in workers:
        worker.start()
    while any(w.is_alive() for w in workers):
        held = sum(host.resident_bytes().values())
        if held > MIB:
            failures.append(f"{held} resident bytes over the budget")
        time.sleep(0.05)
    for worker in workers:
        worker.join()
    assert not failures, failures[:5]
    assert _unloads() - unloads >= 4  # the models really went out and came back
    with weightsmith.Client(budget_server.address) as client:
        assert sum(m.resident for m in client.iter_models()) == 2
        assert client.server_info().devices[0].resident_bytes == 2 * MODEL_BYTES


@pytest.mark.stress
def test_concurrent_calls_over_more_models_than_the_budget_stay_exact(budget_server: ServerHandle) -> None:
    """4 s in `make test`; a minute under `make stress`."""
    _churn(budget_server, _stress_seconds())


def test_a_config_declaring_terabytes_is_refused_before_anything_is_allocated(
    client: weightsmith.Client, server: ServerHandle
) -> None:
    """A 1 KB config of a 10^6 x 10^6 Dense layer: its size is read from the config, never allocated."""
    import keras

    config = keras.Sequential([keras.Input((7,)), keras.layers.Dense(9)]).to_json()
    config = config.replace("[null, 7]", "[null, 1000000]").replace('"units": 9', '"units": 1000000')
    with pytest.raises(weightsmith.ResourceExhaustedError) as caught:
        client.create_model("terabytes", keras_config=config)
    assert caught.value.reason == "MODEL_EXCEEDS_MEMORY_BUDGET"
    assert caught.value.metadata["needed_bytes"] == str((10**6 * 10**6 + 10**6) * 4)
    with pytest.raises(weightsmith.ResourceExhaustedError) as caught:
        client.create_model("terabytes", architecture="MobileNetV2", input_shape=(32, 32, 3), classes=10**9)
    assert caught.value.reason == "MODEL_EXCEEDS_MEMORY_BUDGET"
    with pytest.raises(weightsmith.NotFoundError):
        client.get_model("terabytes")
