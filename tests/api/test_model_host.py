"""The model host seam: unloading a model keeps it listed, and its next use reloads it bit-exactly."""

from __future__ import annotations

import numpy as np

from tests.conftest import ServerHandle, tiny_config


def _resident(server: ServerHandle) -> set[str]:
    return {m for ids in server.running.host.placements().values() for m in ids}  # type: ignore[attr-defined]


def test_unloaded_model_reloads_bit_exactly_on_next_use(client, server: ServerHandle, model_id: str) -> None:
    client.create_model(model_id, keras_config=tiny_config(), seed=3)
    client.write_weights(model_id, {"logits/bias": np.array([0.25, -1.5], np.float32)})
    before = client.read_weights(model_id)
    host = server.running.host  # type: ignore[attr-defined]

    host.unload(model_id)

    assert model_id not in _resident(server)
    assert model_id in [m.model_id for m in client.iter_models()]
    after = client.read_weights(model_id)
    assert sorted(after) == sorted(before)
    for path, value in before.items():
        assert after[path].tobytes() == value.tobytes(), path
    assert client.get_model(model_id).revision == 2
    assert model_id in _resident(server)
    assert client.write_weights(model_id, {"logits/bias": np.zeros(2, np.float32)}).revision == 3
