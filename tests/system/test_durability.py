"""Acknowledged means durable: SIGKILL the server process, restart, compare bits."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

import weightsmith
from tests.conftest import spawn_server, tiny_cnn_config, tiny_config

pytestmark = pytest.mark.slow


def test_revert_after_edits_and_sigkill_is_bit_exact(tmp_path: Path) -> None:
    from tests.api.test_edits import _mixed_edits
    from weightsmith import edits

    store = tmp_path / "store"
    first = spawn_server(store)
    try:
        with weightsmith.Client(first.address) as client:
            client.create_model("cnn", keras_config=tiny_cnn_config(), seed=1)
            target = {k: v.tobytes() for k, v in client.read_weights("cnn").items()}
            layers = [
                (layer.name, layer.class_name, layer.trainable) for layer in client.get_model("cnn").layers
            ]
            _mixed_edits(client, "cnn")
            client.apply_edits("cnn", [edits.scale("*", 1.5)], message="last edit")
            edited = {k: v.tobytes() for k, v in client.read_weights("cnn").items()}
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(30)

    second = spawn_server(store)
    try:
        with weightsmith.Client(second.address) as client:
            assert client.get_model("cnn").revision == 22
            assert {k: v.tobytes() for k, v in client.read_weights("cnn").items()} == edited
            client.revert_model("cnn", 1, expected_revision=22)
            restored = client.get_model("cnn")
            assert [(layer.name, layer.class_name, layer.trainable) for layer in restored.layers] == layers
            assert {k: v.tobytes() for k, v in client.read_weights("cnn").items()} == target
    finally:
        second.process.send_signal(signal.SIGKILL)
        second.process.wait(30)


def test_sigkill_then_restart_restores_identical_bytes_and_revisions(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = spawn_server(store)
    try:
        with weightsmith.Client(first.address) as client:
            client.create_model("cnn", keras_config=tiny_cnn_config(), seed=1)
            client.create_model("mlp", keras_config=tiny_config(), seed=2)
            weights = client.read_weights("cnn")
            client.write_weights("cnn", {k: v * 2 for k, v in weights.items()}, message="doubled")
            client.write_weights("cnn", {"head/bias": np.arange(10, dtype=np.float32)}, message="bias")
            client.delete_model("mlp")
            expected = {k: v.tobytes() for k, v in client.read_weights("cnn").items()}
            expected_r2 = {k: v.tobytes() for k, v in client.read_weights("cnn", revision=2).items()}
            batch = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
            expected_out = client.predict("cnn", batch).outputs["head"]
            revisions = [(r.revision, r.message) for r in client.iter_revisions("cnn")]
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(30)

    second = spawn_server(store)
    try:
        with weightsmith.Client(second.address) as client:
            assert [m.model_id for m in client.iter_models()] == ["cnn"]
            model = client.get_model("cnn")
            assert model.revision == 3
            assert {k: v.tobytes() for k, v in client.read_weights("cnn").items()} == expected
            assert {k: v.tobytes() for k, v in client.read_weights("cnn", revision=2).items()} == expected_r2
            assert [(r.revision, r.message) for r in client.iter_revisions("cnn")] == revisions
            np.testing.assert_array_equal(client.predict("cnn", batch).outputs["head"], expected_out)
            client.write_weights("cnn", {"head/bias": np.zeros(10, np.float32)}, expected_revision=3)
            assert client.get_model("cnn").revision == 4
    finally:
        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(60) == 0, second.log()
    assert "shutting down" in second.log()
