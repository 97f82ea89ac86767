"""A crash loop: SIGKILL the server again and again under concurrent writes, edits and uploads.

Each round starts the server on the same store, checks that start-up left no
scratch behind (`tmp/` empty, no staging folder) before any new call, reads
back every revision acknowledged so far (bit-exact), then lets writer,
editor and uploader threads run for a few seconds and kills the process
mid-traffic. A call in flight at the kill may or may not have committed:
only acknowledged ones are asserted, and each round re-reads the state it
starts from. 10 kills in `make test`, 30 with `WEIGHTSMITH_STRESS=1`.
"""

from __future__ import annotations

import io
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import weightsmith
from tests.conftest import SpawnedServer, free_port, spawn_server, tiny_config
from weightsmith import edits

pytestmark = [pytest.mark.slow, pytest.mark.stress]

STRESS = os.environ.get("WEIGHTSMITH_STRESS") == "1"
KILLS = 30 if STRESS else 10
# The model the writers and editors work on: about 0.5 MiB of weights.
CONFIG = tiny_config(256, inputs=512)
# Seconds of traffic per round before the kill (random in this range).
TRAFFIC = (1.5, 3.5)


def snapshot(weights: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {name: np.ascontiguousarray(value).tobytes() for name, value in weights.items()}


@dataclass
class Ledger:
    """Every acknowledged revision: (model, revision) -> the exact bytes of each variable."""

    revisions: dict[tuple[str, int], dict[str, bytes]] = field(default_factory=dict)
    datasets: dict[str, int] = field(default_factory=dict)  # acknowledged dataset -> example count
    errors: list[str] = field(default_factory=list)  # failures while the server was not being killed
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acknowledge(self, model_id: str, revision: int, weights: dict[str, bytes]) -> None:
        with self.lock:
            key = (model_id, revision)
            assert key not in self.revisions, f"revision {key} acknowledged twice"
            self.revisions[key] = weights


class Round:
    """One server lifetime: the workers run until `killing` is set."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.killing = threading.Event()

    def failed(self, ledger: Ledger, what: str, error: Exception) -> None:
        if not self.killing.is_set():
            with ledger.lock:
                ledger.errors.append(f"{what}: {error}")

    def pause(self, rng: np.random.Generator) -> None:
        """A short random pause between calls (fewer revisions to verify, kills at any point)."""
        self.killing.wait(float(rng.uniform(0, 0.06)))

    def thread(self, target: Callable[..., None], ledger: Ledger, *args: object) -> threading.Thread:
        """A worker thread; anything but a call failing because of the kill fails the test."""

        def run() -> None:
            try:
                target(self, ledger, *args)
            except Exception as error:  # an assertion, or a bug in the test
                with ledger.lock:
                    ledger.errors.append(f"{target.__name__}: {error!r}")

        return threading.Thread(target=run, name=target.__name__, daemon=True)


def writer(round_: Round, ledger: Ledger, model_id: str, seed: int) -> None:
    """Overwrite every variable with fresh random values, expecting the revision it last saw."""
    rng = np.random.default_rng(seed)
    with weightsmith.Client(round_.address, timeout=30) as client:
        try:
            current = client.get_model(model_id)
            shapes = {v.path: tuple(v.shape) for v in current.variables}
            revision = current.revision
            while not round_.killing.is_set():
                values = {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}
                done = client.write_weights(model_id, values, expected_revision=revision, message="w")
                ledger.acknowledge(model_id, done.revision, snapshot(values))
                revision = done.revision
                round_.pause(rng)
        except weightsmith.errors.WeightsmithError as error:
            round_.failed(ledger, f"writer {model_id}", error)


def editor(round_: Round, ledger: Ledger, model_id: str, seed: int) -> None:
    """Edits whose results the test computes exactly: scale by 2 or 1/2, and assign a bias."""
    rng = np.random.default_rng(seed)
    with weightsmith.Client(round_.address, timeout=30) as client:
        try:
            revision = client.get_model(model_id).revision
            state = {k: v.copy() for k, v in client.read_weights(model_id, revision=revision).items()}
            while not round_.killing.is_set():
                factor = float(rng.choice([2.0, 0.5]))
                bias = rng.normal(size=state["logits/bias"].shape).astype(np.float32)
                ops = [edits.scale("*", factor), edits.assign("logits/bias", bias)]
                done = client.apply_edits(model_id, ops, expected_revision=revision, message="e").revision
                state = {k: (v * np.float32(factor)).astype(np.float32) for k, v in state.items()}
                state["logits/bias"] = bias
                ledger.acknowledge(model_id, done.revision, snapshot(state))
                revision = done.revision
                round_.pause(rng)
        except weightsmith.errors.WeightsmithError as error:
            round_.failed(ledger, f"editor {model_id}", error)


def uploader(
    round_: Round, ledger: Ledger, number: int, keras_file: bytes, expected: dict[str, bytes]
) -> None:
    """Upload a model and a dataset under fresh ids, once a round (each start restores them all)."""
    rng = np.random.default_rng(number)
    model_id, dataset_id = f"up-{number}", f"ds-{number}"
    with weightsmith.Client(round_.address, timeout=60) as client:
        try:
            round_.pause(rng)
            model = client.upload_model(keras_file, model_id)
            ledger.acknowledge(model_id, model.revision, expected)
            round_.pause(rng)
            examples = 16 + number
            dataset = client.upload_dataset(_npz(examples), dataset_id, format="npz")
            with ledger.lock:
                ledger.datasets[dataset_id] = dataset.example_count
            assert dataset.example_count == examples
        except weightsmith.errors.WeightsmithError as error:
            round_.failed(ledger, f"uploader {model_id}", error)


def _npz(examples: int) -> bytes:
    rng = np.random.default_rng(examples)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.normal(size=(examples, 4)).astype(np.float32), y=rng.integers(0, 2, examples))
    return buffer.getvalue()


def _keras_file(tmp_path: Path) -> bytes:
    import keras

    model = keras.models.model_from_json(tiny_config())
    path = tmp_path / "uploaded.keras"
    model.save(path)
    return path.read_bytes()


def leftovers(store: Path) -> list[str]:
    """Scratch the server may leave only while it runs: `tmp/` entries and staging folders."""
    found = [f"tmp/{p.name}" for p in (store / "tmp").iterdir()]
    found += [str(p.relative_to(store)) for p in store.rglob(".staging-*")]
    return found


def verify(client: weightsmith.Client, ledger: Ledger) -> int:
    """Read back every acknowledged revision bit-exactly; returns how many."""
    for (model_id, revision), expected in sorted(ledger.revisions.items()):
        got = snapshot(client.read_weights(model_id, revision=revision))
        assert got == expected, f"{model_id} revision {revision} differs after a restart"
    for dataset_id, examples in ledger.datasets.items():
        assert client.get_dataset(dataset_id).example_count == examples
    return len(ledger.revisions)


def _start(store: Path, port: int) -> SpawnedServer:
    return spawn_server(store, "--workers", "4", port=port)


@pytest.mark.timeout(2400 if STRESS else 600)
def test_crash_loop_keeps_every_acknowledged_revision_and_no_scratch(tmp_path: Path) -> None:
    store = tmp_path / "store"
    port = free_port()
    ledger = Ledger()
    keras_file = _keras_file(tmp_path)
    chooser = random.Random(8)

    server = _start(store, port)
    try:
        with weightsmith.Client(server.address) as client:
            for model_id, seed in (("writer-a", 1), ("writer-b", 2), ("editor", 3)):
                client.create_model(model_id, keras_config=CONFIG, seed=seed)
                ledger.acknowledge(model_id, 1, snapshot(client.read_weights(model_id, revision=1)))
            reference = client.upload_model(keras_file, "up-reference")
            expected_upload = snapshot(client.read_weights("up-reference"))
            ledger.acknowledge("up-reference", reference.revision, expected_upload)
        kills = 0
        timings = {"start": 0.0, "verify": 0.0}
        left_by_kills = 0  # rounds whose kill left scratch behind for the next start to remove
        started = time.monotonic()
        while True:
            round_ = Round(server.address)
            workers: list[tuple[Callable[..., None], tuple[object, ...]]] = [
                (writer, ("writer-a", kills * 10 + 1)),
                (writer, ("writer-b", kills * 10 + 2)),
                (editor, ("editor", kills * 10 + 3)),
                (uploader, (kills, keras_file, expected_upload)),
            ]
            threads = [round_.thread(target, ledger, *args) for target, args in workers]
            for thread in threads:
                thread.start()
            time.sleep(chooser.uniform(*TRAFFIC))
            round_.killing.set()
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(30)
            kills += 1
            for thread in threads:
                thread.join(60)
                assert not thread.is_alive(), "a worker hung after the kill"
            assert not ledger.errors, ledger.errors
            left_by_kills += bool(leftovers(store))

            restarting = time.monotonic()
            server = _start(store, port)
            timings["start"] += time.monotonic() - restarting
            # Before any new call: start-up removed everything half-written.
            assert leftovers(store) == [], f"after kill {kills}: {leftovers(store)}"
            verifying = time.monotonic()
            with weightsmith.Client(server.address) as client:
                verify(client, ledger)
            timings["verify"] += time.monotonic() - verifying
            if kills >= KILLS:
                break
        elapsed = time.monotonic() - started
        print(
            f"{kills} kills in {elapsed:.0f} s ({timings['start']:.0f} s restarting, "
            f"{timings['verify']:.0f} s verifying), {len(ledger.revisions)} acknowledged revisions verified, "
            f"{left_by_kills} kills left scratch behind"
        )
        written = sum(1 for model_id, _ in ledger.revisions if model_id.startswith("writer"))
        edited = sum(1 for model_id, _ in ledger.revisions if model_id == "editor")
        uploaded = sum(1 for model_id, _ in ledger.revisions if model_id.startswith("up-"))
        assert written > KILLS and edited > KILLS and uploaded > 1 and ledger.datasets
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
