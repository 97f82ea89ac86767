"""Predict: run a model's committed revision on a batch, optionally with layer outputs.

Every runner is a `tf.function` over the Keras model with the batch
dimension left open (`None`) in its input signature, so one trace serves
every batch size. It captures the model's variables, which a value-only
commit assigns in place: the same function stays valid until a commit
rebuilds the Keras model (a new `ModelState`, new runners). Runners are
traced and instantiated by a background warm-up when a state is installed;
a Predict that comes first traces it itself, once.

Compiled outputs are bit-identical to the eager `model(x, training=False)`:
grappler's remapper fuses MatMul+BiasAdd+activation (tanh, gelu, ...) into
oneDNN kernels whose results differ in the last bits, so runners execute
with the remapper turned off, for these calls only (thread-local function
call options; the rest of the process, training included, keeps it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightsmith_server.errors import InvalidArgument
from weightsmith_server.limits import excerpt
from weightsmith_server.models.description import output_names
from weightsmith_server.models.resident import ModelState, ResidentModel

log = logging.getLogger(__name__)

# Distinct `output_layers` combinations kept built per model (clients choose them).
_FEATURE_MODEL_CACHE = 8
# Guards every state's cache of runners (`ModelState.feature_models`).
_runners_lock = threading.Lock()


def _pack_inputs(model: Any, arrays: Sequence[Any]) -> Any:
    """Arrange inputs the way the model was built: one tensor, a list or a dict."""
    import keras

    structure = getattr(model, "_inputs_struct", None)
    if structure is not None:
        return keras.tree.pack_sequence_as(structure, list(arrays))
    return arrays[0] if len(arrays) == 1 else list(arrays)


_call_options: Any = None
_call_options_lock = threading.Lock()


def _exact_call_options() -> Any:
    """Function call options with grappler's remapper off (the eager kernels' bits)."""
    global _call_options
    if _call_options is None:
        from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
        from tensorflow.python.eager import context

        with _call_options_lock:
            if _call_options is None:
                current = context.context().function_call_options
                config = config_pb2.ConfigProto()
                config.ParseFromString(current.config_proto_serialized)
                config.graph_options.rewrite_options.remapping = rewriter_config_pb2.RewriterConfig.OFF
                _call_options = context.FunctionCallOptions(
                    executor_type=current.executor_type, config_proto=config
                )
    return _call_options


class CompiledRunner:
    """A Keras model as one `tf.function`, batch dimension open; returns flat outputs."""

    def __init__(self, model: Any) -> None:
        import keras
        import tensorflow as tf

        self.model = model
        self.specs = [
            tf.TensorSpec((None, *tuple(t.shape)[1:]), t.dtype, name=f"input_{i}")
            for i, t in enumerate(model.inputs)
        ]
        # Inputs declared with a fixed batch size cannot take concatenated batches.
        self.batchable = all(t.shape and t.shape[0] is None for t in model.inputs)
        # Whether each output row depends on its own input row only (`rows_independent`); None: unknown.
        self._rows_independent: bool | None = None

        def run(*arrays: Any) -> list[Any]:
            return keras.tree.flatten(model(_pack_inputs(model, arrays), training=False))

        self.function = tf.function(run, input_signature=self.specs, autograph=False)

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        from tensorflow.python.eager import context

        ctx = context.context()
        previous = ctx.function_call_options
        ctx.function_call_options = _exact_call_options()
        try:
            result = self.function(*arrays)
        finally:
            ctx.function_call_options = previous
        return [t.numpy() for t in result]

    def warm_up(self) -> None:
        """Trace, and run a 1-row zero batch when every dimension is known (instantiates the graph)."""
        self.function.get_concrete_function()
        if all(d is not None for spec in self.specs for d in spec.shape[1:]):
            self([np.zeros((1, *spec.shape[1:]), spec.dtype.as_numpy_dtype) for spec in self.specs])

    def rows_independent(self, template: Sequence[np.ndarray]) -> bool:
        """Whether each output row depends only on its own input row, so callers may share a batch.

        Not every model is row-wise (`Softmax(axis=0)`, a mean over the
        batch, outputs without a batch axis): batching those would compute
        one caller's answer from another's inputs. Probed once per runner:
        two 2-row batches that share row 0 (the first row of `template`,
        one array per input) and differ in row 1 must give row 0 the same
        bits, and every output must have 2 rows. The probe runs on the first
        batch of several callers (not at warm-up: it costs two small batches).
        """
        if self._rows_independent is None:
            first = [np.asarray(a[:1]) for a in template]
            other = [~a if a.dtype == np.bool_ else a + np.ones_like(a) for a in first]  # differs from row 0
            try:
                same = self([np.concatenate([a, a]) for a in first])
                different = self([np.concatenate([a, b]) for a, b in zip(first, other, strict=True)])
                self._rows_independent = all(
                    x.ndim and y.ndim and len(x) == 2 and len(y) == 2 and _same_bits(x[0], y[0])
                    for x, y in zip(same, different, strict=True)
                )
            except Exception:  # a model that cannot run these rows is not batched
                log.info("batch probe failed; Predicts on this model run alone", exc_info=True)
                self._rows_independent = False
        return self._rows_independent


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def warm_up(resident: ResidentModel, state: ModelState) -> None:
    """Build and warm the plain runner of a newly installed state (background thread)."""
    import tensorflow as tf

    try:
        with tf.device(resident.device):
            _runner(state, ()).warm_up()
    except Exception:  # a failed warm-up only means the first Predict traces
        log.warning("model %s: warm-up failed", resident.model_id, exc_info=True)


Inputs = Sequence[tuple[str, np.ndarray]]


@dataclass(frozen=True)
class Outcome:
    """One caller's answer: named outputs, requested layer outputs, the revision that ran."""

    outputs: list[tuple[str, np.ndarray]]
    layer_outputs: list[tuple[str, np.ndarray]]
    revision: int


def predict(resident: ResidentModel, inputs: Inputs, output_layers: Sequence[str]) -> Outcome:
    """Run the committed revision on one caller's batch; errors raise."""
    outcome = predict_many(resident, [inputs], output_layers)[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def predict_many(
    resident: ResidentModel, requests: Sequence[Inputs], output_layers: Sequence[str]
) -> list[Outcome | Exception]:
    """Run several callers' inputs as one batch; each gets exactly its own rows, or its own error.

    Each caller's inputs are checked on their own (a bad one fails only that
    caller). The valid ones are concatenated along the batch dimension, run
    once and split back; if the batch fails at run time, each caller runs
    alone so that it gets the error (or result) it would get alone. All of
    them see the same committed revision, read under the model's read lock.
    A lone caller's run-time error raises.
    """
    import tensorflow as tf

    layers = tuple(output_layers)
    with resident.lock.read():
        state = resident.state
        model = state.keras_model
        runner = _runner(state, layers)
        revision = state.revision.revision
        results: list[Any] = []
        for inputs in requests:
            try:
                results.append(_order_inputs(model, inputs))
            except InvalidArgument as exc:
                results.append(exc)
        valid = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
        with tf.device(resident.device):
            if len(requests) == 1 and valid:
                results[0] = runner(results[0])
            elif (
                len(valid) == 1
                or (valid and not runner.batchable)
                or (valid and not runner.rows_independent(results[valid[0]]))
            ):
                for i in valid:
                    results[i] = _alone(runner, results[i])
            elif valid:
                _batched(runner, results, valid)
    count = len(model.outputs)
    names = output_names(model)
    return [
        r
        if isinstance(r, Exception)
        else Outcome(
            list(zip(names, r[:count], strict=True)), list(zip(layers, r[count:], strict=True)), revision
        )
        for r in results
    ]


def _alone(runner: CompiledRunner, arrays: list[np.ndarray]) -> list[np.ndarray] | Exception:
    try:
        return runner(arrays)
    except Exception as exc:  # handed to its caller, who raises it
        return exc


def _batched(runner: CompiledRunner, results: list[Any], valid: list[int]) -> None:
    """Run the valid callers' rows as one batch and put each caller's slice in `results`."""
    rows = [len(results[i][0]) for i in valid]
    try:
        joined = [np.concatenate(column) for column in zip(*(results[i] for i in valid), strict=True)]
        flat = runner(joined)
    except Exception:  # each caller alone then gets its own error
        for i in valid:
            results[i] = _alone(runner, results[i])
        return
    if any(a.ndim == 0 or len(a) != sum(rows) for a in flat):  # not one row per input row
        for i in valid:
            results[i] = _alone(runner, results[i])
        return
    start = 0
    for i, count in zip(valid, rows, strict=True):
        results[i] = [a[start : start + count] for a in flat]
        start += count


def _runner(state: ModelState, names: tuple[str, ...]) -> CompiledRunner:
    """The compiled runner for the model, or for it plus the outputs of layers `names`.

    Predicts run under the model's read lock, several at once: the cache
    of runners changes under its own lock.
    """
    with _runners_lock:
        cached = state.feature_models.get(names)
        if cached is not None:
            return cached
        if not names:
            return state.feature_models.setdefault((), CompiledRunner(state.keras_model))
        runner = CompiledRunner(_feature_model(state.keras_model, names))
        if len(state.feature_models) > _FEATURE_MODEL_CACHE:
            state.feature_models.pop(next(k for k in state.feature_models if k))
        return state.feature_models.setdefault(names, runner)


def _feature_model(model: Any, names: tuple[str, ...]) -> Any:
    import keras

    tensors = []
    for index, name in enumerate(names):
        try:
            tensors.append(model.get_layer(name).output)
        except (ValueError, AttributeError) as exc:
            raise InvalidArgument(
                f"Cannot return the output of layer {excerpt(name)!r}: {excerpt(exc, 300)}. GetModel "
                "lists the layers.",
                reason="UNKNOWN_LAYER",
                field=f"output_layers[{index}]",
            ) from exc
    return keras.Model(model.inputs, [*model.outputs, *tensors])


def _order_inputs(model: Any, inputs: Sequence[tuple[str, np.ndarray]]) -> list[np.ndarray]:
    """Map named or positional inputs onto the model's inputs, checking each."""
    specs = model.inputs
    names = [t.name for t in specs]
    named = [name for name, _ in inputs if name]
    if named and len(named) != len(inputs):
        raise InvalidArgument(
            "Received a mix of named and unnamed inputs; name all of them or none.",
            reason="MIXED_INPUT_NAMING",
            field="inputs",
        )
    if len(inputs) != len(specs):
        raise InvalidArgument(
            f"Received {len(inputs)} input tensor(s), expected {len(specs)}: {names}.",
            reason="WRONG_INPUT_COUNT",
            field="inputs",
        )
    ordered: list[np.ndarray | None] = [None] * len(specs)
    for index, (name, array) in enumerate(inputs):
        position = index
        if name:
            if name not in names:
                raise InvalidArgument(
                    f"Received an unknown input name {name!r}, expected one of {names}.",
                    reason="UNKNOWN_INPUT",
                    field=f"inputs[{index}].name",
                )
            position = names.index(name)
            if ordered[position] is not None:
                raise InvalidArgument(
                    f"Input {name!r} was given twice.",
                    reason="DUPLICATE_INPUT",
                    field=f"inputs[{index}].name",
                )
        spec = specs[position]
        expected_shape = tuple(spec.shape)
        if array.dtype.name != str(spec.dtype):
            raise InvalidArgument(
                f"Received dtype {array.dtype.name} for input {names[position]!r}, expected {spec.dtype}.",
                reason="WRONG_DTYPE",
                field=f"inputs[{index}].tensor.dtype",
            )
        if len(array.shape) != len(expected_shape) or any(
            want is not None and want != got for want, got in zip(expected_shape, array.shape, strict=True)
        ):
            shown = ["None" if d is None else d for d in expected_shape]
            raise InvalidArgument(
                f"Received shape {list(array.shape)} for input {names[position]!r}, expected "
                f"[{', '.join(map(str, shown))}] (None: any size).",
                reason="WRONG_SHAPE",
                field=f"inputs[{index}].tensor.shape",
            )
        ordered[position] = array
    return [a for a in ordered if a is not None]
