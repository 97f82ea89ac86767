"""Compiled and batched Predict: bit-identical to the eager model, each caller its own rows."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import keras  # imported before the server's own TensorFlow import (no import race)
import numpy as np
import pytest

import weightsmith
import weightsmith.errors
from tests.conftest import ServerHandle
from weightsmith import edits
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.models import inference


def _cnn_config() -> str:
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="cnn").to_json()


def _mlp_config() -> str:
    # tanh and gelu: the activations grappler's remapper fuses into different bits.
    inputs = keras.Input((12,), name="features")
    x = keras.layers.Dense(16, activation="tanh", name="hidden")(inputs)
    x = keras.layers.Dense(16, activation="gelu", name="hidden2")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="mlp").to_json()


def _local(client: weightsmith.Client, model_id: str, config: str) -> keras.Model:
    local = keras.models.model_from_json(config)
    weights = client.read_weights(model_id)
    for variable in local.weights:
        variable.assign(weights[variable.path])
    return local


def _randomize_batchnorm(client: weightsmith.Client, model_id: str) -> None:
    rng = np.random.default_rng(1)
    weights = client.read_weights(model_id)
    changed = {
        path: (rng.random(value.shape) + 0.5).astype(np.float32)
        for path, value in weights.items()
        if "moving" in path or "gamma" in path
    }
    if changed:
        client.write_weights(model_id, changed)


@pytest.mark.parametrize(("config", "shape"), [(_cnn_config, (8, 8, 3)), (_mlp_config, (12,))])
def test_compiled_predict_is_bit_identical_to_eager(
    client: weightsmith.Client, model_id: str, config, shape
) -> None:
    source = config()
    client.create_model(model_id, keras_config=source, seed=3)
    _randomize_batchnorm(client, model_id)
    local = _local(client, model_id, source)
    rng = np.random.default_rng(0)
    for rows in (1, 3, 8):
        batch = rng.normal(size=(rows, *shape)).astype(np.float32)
        result = client.predict(model_id, batch)
        [name] = result.outputs
        eager = np.asarray(local(batch, training=False))
        np.testing.assert_array_equal(result.outputs[name], eager)
    # Layer outputs go through a compiled feature model: the same bits as eager.
    layer = "relu" if len(shape) == 3 else "hidden2"
    result = client.predict(model_id, batch, output_layers=[layer])
    feature = keras.Model(local.inputs, local.get_layer(layer).output)
    np.testing.assert_array_equal(result.layer_outputs[layer], np.asarray(feature(batch, training=False)))

    # A value-only commit assigns into the same variables: the same compiled function sees them.
    revision = client.apply_edits(model_id, [edits.scale("*", 1.5)]).revision.revision
    local = _local(client, model_id, source)
    result = client.predict(model_id, batch)
    assert result.revision == revision
    np.testing.assert_array_equal(result.outputs[name], np.asarray(local(batch, training=False)))


def test_batch_of_callers_gives_each_its_own_rows_and_errors(
    server: ServerHandle, client: weightsmith.Client, model_id: str
) -> None:
    source = _mlp_config()
    client.create_model(model_id, keras_config=source, seed=5)
    rng = np.random.default_rng(2)
    requests = [[("", rng.normal(size=(rows, 12)).astype(np.float32))] for rows in (1, 2, 1, 3)]
    bad = [("", np.zeros((1, 11), np.float32))]
    host = server.running.host  # type: ignore[attr-defined]

    batched = host.run(model_id, lambda r: inference.predict_many(r, [*requests[:2], bad, *requests[2:]], ()))
    alone = [host.run(model_id, lambda r, q=q: inference.predict(r, q, ())) for q in requests]

    assert isinstance(batched[2], InvalidArgument)
    assert batched[2].reason == "WRONG_SHAPE"
    for got, want in zip([*batched[:2], *batched[3:]], alone, strict=True):
        assert got.revision == want.revision
        np.testing.assert_array_equal(got.outputs[0][1], want.outputs[0][1])
        assert len(got.outputs[0][1]) == len(want.outputs[0][1])


def test_a_model_whose_rows_depend_on_each_other_is_never_batched(
    server: ServerHandle, client: weightsmith.Client, model_id: str
) -> None:
    inputs = keras.Input((3,), name="x")
    hidden = keras.layers.Dense(3, name="dense")(inputs)
    outputs = keras.layers.Softmax(axis=0, name="out")(hidden)  # normalizes over the batch
    client.create_model(model_id, keras_config=keras.Model(inputs, outputs).to_json(), seed=1)
    requests = [[("", np.full((1, 3), value, np.float32))] for value in (1.0, 2.0, 5.0)]
    host = server.running.host  # type: ignore[attr-defined]

    batched = host.run(model_id, lambda r: inference.predict_many(r, requests, ()))

    for got in batched:  # batched together, each row would get a share of 1 instead of 1 itself
        np.testing.assert_array_equal(got.outputs[0][1], np.ones((1, 3), np.float32))


def test_concurrent_predicts_each_get_their_own_result(server: ServerHandle, model_id: str) -> None:
    source = _cnn_config()
    with weightsmith.Client(server.address) as setup:
        setup.create_model(model_id, keras_config=source, seed=7)
        local = _local(setup, model_id, source)
    rng = np.random.default_rng(3)
    inputs = [rng.normal(size=(1, 8, 8, 3)).astype(np.float32) for _ in range(8)]
    inputs.append(np.zeros((1, 8, 8, 2), np.float32))  # a wrong shape fails only its caller

    def call(batch: np.ndarray) -> object:
        with weightsmith.Client(server.address) as own:
            try:
                return [own.predict(model_id, batch).outputs["head"] for _ in range(5)]
            except weightsmith.errors.InvalidArgumentError as exc:
                return exc

    with ThreadPoolExecutor(len(inputs)) as pool:
        results = list(pool.map(call, inputs))
    assert isinstance(results[-1], weightsmith.errors.InvalidArgumentError)
    for batch, outputs in zip(inputs[:-1], results[:-1], strict=True):
        # Each caller's row equals the model run on its input alone (same kernels, any batch).
        want = np.asarray(local(batch, training=False))
        for got in outputs:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_server_info_reports_the_batching_policy(client: weightsmith.Client) -> None:
    policy = client.server_info().limits.predict_batching
    assert (policy.max_batch_size, policy.max_wait_seconds) == (32, 0.005)
