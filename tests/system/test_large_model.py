"""A realistic model end to end: VGG16 (553 MB of weights) through the chunked streams."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_vgg16_round_trip_is_bit_exact(client, model_id: str) -> None:
    model = client.create_model(model_id, architecture="VGG16", seed=0)
    assert model.weight_bytes > 300_000_000

    weights = client.read_weights(model_id)
    assert sum(v.nbytes for v in weights.values()) == model.weight_bytes
    for value in weights.values():
        np.negative(value, out=value)
    revision = client.write_weights(model_id, weights, expected_revision=1, message="negated")

    again = client.read_weights(model_id)
    assert revision.revision == 2
    assert list(again) == list(weights)
    for name, value in weights.items():
        assert again[name].tobytes() == value.tobytes(), name
    del again
    probe = client.predict(model_id, np.zeros((1, 224, 224, 3), np.float32))
    assert probe.outputs["predictions"].shape == (1, 1000)
    client.delete_model(model_id)
