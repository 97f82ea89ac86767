"""A stored model rebuilt for restore: variables initialized once from the stored values, bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import tiny_cnn_config
from weightsmith_server.models.architecture import rebuild, rebuild_with_values
from weightsmith_server.variables import model_variables


def _with_dropout() -> str:
    import keras

    model = keras.models.model_from_json(tiny_cnn_config())
    head = keras.layers.Dropout(0.5, seed=3, name="drop")(model.outputs[0])
    return keras.Model(model.inputs, head).to_json()


def test_values_become_the_variables_bit_exactly_and_the_model_runs() -> None:
    config = _with_dropout()
    reference = rebuild(config, device="/device:CPU:0", seed=1)
    rng = np.random.default_rng(0)
    values = {
        entry.path: rng.normal(size=tuple(v.shape)).astype(np.float32)
        for entry, v in model_variables(reference)
    }
    for entry, variable in model_variables(reference):
        variable.assign(values[entry.path])

    restored = rebuild_with_values(config, values.__getitem__, device="/device:CPU:0")

    got = {entry.path: np.asarray(v.numpy()) for entry, v in model_variables(restored)}
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in values.items()}
    batch = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(restored(batch, training=False), reference(batch, training=False))
    assert all(v.value is not None for v in restored.variables)  # seed-generator state too


def test_a_value_of_another_shape_or_dtype_is_refused() -> None:
    config = tiny_cnn_config()
    entries = model_variables(rebuild(config, device="/device:CPU:0", initialize=False))
    first = entries[0][0].path
    values = {e.path: np.zeros(tuple(v.shape), np.float32) for e, v in entries}

    values[first] = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="declares"):
        rebuild_with_values(config, values.__getitem__, device="/device:CPU:0")
    values[first] = np.zeros(tuple(entries[0][1].shape), np.float64)
    with pytest.raises(ValueError, match="declares"):
        rebuild_with_values(config, values.__getitem__, device="/device:CPU:0")


def test_a_description_only_rebuild_allocates_no_variable() -> None:
    model = rebuild(tiny_cnn_config(), device="/device:CPU:0", initialize=False)
    assert model.layers and all(v._value is None for v in model.variables)
