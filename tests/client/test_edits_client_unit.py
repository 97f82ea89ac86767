"""The `weightsmith.edits` builders and the edit methods of both clients, without a server."""

from __future__ import annotations

import inspect
import json
from typing import Any

import numpy as np
import pytest
from google.protobuf import json_format

import weightsmith
from weightsmith import _channel, _requests, _rpcs, edits, wire
from weightsmith.v1 import edits_pb2, selector_pb2, weight_service_pb2

KERNELS = selector_pb2.VariableSelector(patterns=["*/kernel"])


def _op(edit: edits_pb2.Edit, name: str) -> Any:
    assert isinstance(edit, edits_pb2.Edit)
    assert edit.WhichOneof("op") == name
    return getattr(edit, name)


# --- package surface -------------------------------------------------------------


def test_edits_is_a_public_submodule() -> None:
    assert weightsmith.edits is edits
    assert "edits" in weightsmith.__all__
    assert edits.__all__ == sorted(edits.__all__)
    for name in edits.__all__:
        assert callable(getattr(edits, name)), name
    assert edits.__doc__ and "apply_edits" in edits.__doc__


# --- selectors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("*/kernel", KERNELS),
        (["a/*", "b/*"], selector_pb2.VariableSelector(patterns=["a/*", "b/*"])),
        (weightsmith.Selector(kinds="bias"), selector_pb2.VariableSelector(kinds=["bias"])),
        (selector_pb2.VariableSelector(layers=["x"]), selector_pb2.VariableSelector(layers=["x"])),
        (weightsmith.Selector(), selector_pb2.VariableSelector()),
    ],
)
def test_selector_like_forms(selector: Any, expected: selector_pb2.VariableSelector) -> None:
    op = _op(edits.scale(selector, 2.0), "scale")
    assert op.HasField("selector")
    assert op.selector == expected


def test_selector_conversion_is_shared_with_the_client() -> None:
    assert _requests.selector_to_proto is weightsmith._types.selector_to_proto
    assert _requests.SelectorLike is weightsmith._types.SelectorLike


def test_required_selectors_reject_none_and_bad_types() -> None:
    with pytest.raises(TypeError, match=r"Selector\(\)"):
        edits.scale(None, 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a Selector"):
        edits.prune(42, 0.5)  # type: ignore[arg-type]


def test_optional_selectors_stay_unset_when_none() -> None:
    for edit, name in [
        (edits.interpolate("other", 0.5), "interpolate"),
        (edits.task_vector("base", "tuned", 1.0), "task_vector"),
        (edits.copy_from("source"), "copy_from"),
    ]:
        assert not _op(edit, name).HasField("selector"), name
    for edit, name in [
        (edits.interpolate("other", 0.5, selector="*/kernel"), "interpolate"),
        (edits.task_vector("base", "tuned", 1.0, selector="*/kernel"), "task_vector"),
        (edits.copy_from("source", selector="*/kernel"), "copy_from"),
    ]:
        assert _op(edit, name).selector == KERNELS, name


# --- each builder ----------------------------------------------------------------


def test_assign_whole_and_slice() -> None:
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    op = _op(edits.assign("dense/kernel", value), "assign")
    assert op.variable == "dense/kernel"
    assert op.value == wire.tensor_to_proto(value)
    np.testing.assert_array_equal(wire.tensor_from_proto(op.value), value)
    assert list(op.begin) == []

    op = _op(edits.assign("dense/kernel", value[:1], begin=[1, 0]), "assign")
    assert list(op.begin) == [1, 0]
    assert list(op.value.shape) == [1, 3]


def test_assign_rejects() -> None:
    value = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="one per dimension"):
        edits.assign("dense/kernel", value, begin=[0])
    with pytest.raises(ValueError, match="begin"):
        edits.assign("dense/kernel", value, begin=[0, -1])
    with pytest.raises(ValueError, match="variable"):
        edits.assign("", value)
    with pytest.raises(ValueError, match="unsupported array"):
        edits.assign("dense/kernel", np.array(["a", "b"]))


def test_scale_and_add() -> None:
    op = _op(edits.scale("*/kernel", 0.5), "scale")
    assert (op.selector, op.factor) == (KERNELS, 0.5)
    op = _op(edits.add("*/kernel", -1), "add")
    assert (op.selector, op.value) == (KERNELS, -1.0)
    assert _op(edits.scale("*/kernel", np.float32(2)), "scale").factor == 2.0


def test_add_noise_seed_presence() -> None:
    op = _op(edits.add_noise("*/kernel", stddev=0.1), "add_noise")
    assert (op.stddev, op.mean) == (0.1, 0.0)
    assert not op.HasField("seed")
    op = _op(edits.add_noise("*/kernel", stddev=0.1, mean=1.0, seed=0), "add_noise")
    assert op.HasField("seed") and op.seed == 0
    assert op.mean == 1.0


def test_clip_bound_presence() -> None:
    op = _op(edits.clip("*/kernel", min=-1.0), "clip")
    assert op.HasField("min") and op.min == -1.0
    assert not op.HasField("max")
    op = _op(edits.clip("*/kernel", max=0.0), "clip")
    assert not op.HasField("min")
    assert op.HasField("max") and op.max == 0.0
    op = _op(edits.clip("*/kernel", min=-2, max=2), "clip")
    assert (op.min, op.max) == (-2.0, 2.0)


def test_reinitialize_config_struct() -> None:
    op = _op(edits.reinitialize("*/kernel", "he_normal"), "reinitialize")
    assert op.initializer == "he_normal"
    assert not op.HasField("config")
    assert not op.HasField("seed")

    op = _op(
        edits.reinitialize(
            "*/kernel",
            "random_normal",
            seed=7,
            mean=np.float32(0.5),
            stddev=0.01,
            nested={"values": (1, 2), "flag": True, "none": None},
        ),
        "reinitialize",
    )
    assert op.HasField("seed") and op.seed == 7
    assert json_format.MessageToDict(op.config) == {
        "mean": 0.5,
        "stddev": 0.01,
        "nested": {"values": [1.0, 2.0], "flag": True, "none": None},
    }
    assert op.config["stddev"] == 0.01


def test_set_trainable_freeze_unfreeze() -> None:
    assert _op(edits.set_trainable("*", True), "set_trainable").trainable is True
    frozen = _op(edits.freeze("*/kernel"), "set_trainable")
    assert (frozen.selector, frozen.trainable) == (KERNELS, False)
    assert edits.unfreeze("*/kernel") == edits.set_trainable("*/kernel", True)
    assert edits.freeze("*/kernel") == edits.set_trainable("*/kernel", False)


def test_prune_enums() -> None:
    op = _op(edits.prune("*/kernel", 0.5), "prune")
    assert op.sparsity == 0.5
    assert op.scope == edits_pb2.PRUNE_SCOPE_PER_TENSOR
    assert op.granularity == edits_pb2.PRUNE_GRANULARITY_ELEMENT
    assert op.norm == edits_pb2.PRUNE_NORM_L1
    op = _op(
        edits.prune("*/kernel", 0.0, scope="global", granularity="output_channel", norm="l2"),
        "prune",
    )
    assert op.scope == edits_pb2.PRUNE_SCOPE_GLOBAL
    assert op.granularity == edits_pb2.PRUNE_GRANULARITY_OUTPUT_CHANNEL
    assert op.norm == edits_pb2.PRUNE_NORM_L2


def test_quantize() -> None:
    op = _op(edits.quantize("*/kernel"), "quantize")
    assert op.bits == 8
    assert op.granularity == edits_pb2.QUANTIZE_GRANULARITY_PER_OUTPUT_CHANNEL
    op = _op(edits.quantize("*/kernel", bits=2, per_channel=False), "quantize")
    assert op.bits == 2
    assert op.granularity == edits_pb2.QUANTIZE_GRANULARITY_PER_TENSOR
    assert _op(edits.quantize("*/kernel", bits=16), "quantize").bits == 16


def test_merges() -> None:
    op = _op(edits.interpolate("other", 0.25, other_revision=3), "interpolate")
    assert (op.other_model_id, op.alpha, op.other_revision) == ("other", 0.25, 3)
    op = _op(edits.task_vector("base", "tuned", -0.5), "task_vector")
    assert (op.base_model_id, op.tuned_model_id, op.scale) == ("base", "tuned", -0.5)
    op = _op(edits.copy_from("source", source_revision=2), "copy_from")
    assert (op.source_model_id, op.source_revision) == ("source", 2)
    assert _op(edits.copy_from("source"), "copy_from").source_revision == 0


def test_layer_and_replace_head() -> None:
    bare = edits.layer("GlobalAveragePooling2D")
    assert isinstance(bare, edits_pb2.LayerSpec)
    assert bare.class_name == "GlobalAveragePooling2D"
    assert not bare.HasField("config")
    dense = edits.layer("Dense", units=10, activation="softmax")
    assert json_format.MessageToDict(dense.config) == {"units": 10.0, "activation": "softmax"}

    op = _op(edits.replace_head("avg_pool", [bare, dense]), "replace_head")
    assert op.cut_at_layer == "avg_pool"
    assert list(op.layers) == [bare, dense]
    assert not op.HasField("seed")
    op = _op(edits.replace_head("avg_pool", [dense], seed=0), "replace_head")
    assert op.HasField("seed") and op.seed == 0


def test_every_op_has_a_builder() -> None:
    built = {
        edits.assign("v", np.zeros(1, np.float32)).WhichOneof("op"),
        edits.scale("*", 1).WhichOneof("op"),
        edits.add("*", 1).WhichOneof("op"),
        edits.add_noise("*", stddev=1).WhichOneof("op"),
        edits.clip("*", min=0).WhichOneof("op"),
        edits.reinitialize("*", "zeros").WhichOneof("op"),
        edits.freeze("*").WhichOneof("op"),
        edits.prune("*", 0.1).WhichOneof("op"),
        edits.quantize("*").WhichOneof("op"),
        edits.interpolate("m", 0.5).WhichOneof("op"),
        edits.task_vector("a", "b", 1).WhichOneof("op"),
        edits.copy_from("m").WhichOneof("op"),
        edits.replace_head("x", [edits.layer("Dense", units=1)]).WhichOneof("op"),
    }
    assert built == {field.name for field in edits_pb2.Edit.DESCRIPTOR.oneofs_by_name["op"].fields}


# --- client-side validation ------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: edits.prune("*", 1.0), ValueError, r"\[0, 1\).*sparsity=1.0"),
        (lambda: edits.prune("*", -0.1), ValueError, "sparsity=-0.1"),
        (lambda: edits.prune("*", 0.5, scope="layer"), ValueError, r"\['global', 'per_tensor'\].*'layer'"),
        (lambda: edits.prune("*", 0.5, granularity="row"), ValueError, "'element', 'output_channel'"),
        (lambda: edits.prune("*", 0.5, norm="linf"), ValueError, r"\['l1', 'l2'\].*'linf'"),
        (lambda: edits.quantize("*", bits=1), ValueError, "2 to 16.*bits=1"),
        (lambda: edits.quantize("*", bits=17), ValueError, "2 to 16.*bits=17"),
        (lambda: edits.quantize("*", bits=8.0), TypeError, "bits"),
        (lambda: edits.scale("*", float("nan")), ValueError, "finite"),
        (lambda: edits.scale("*", "2"), TypeError, "factor"),
        (lambda: edits.add("*", float("inf")), ValueError, "finite"),
        (lambda: edits.add_noise("*", stddev=-1.0), ValueError, "stddev=-1.0"),
        (lambda: edits.add_noise("*", stddev=1.0, seed=2**63), ValueError, "seed"),
        (lambda: edits.clip("*"), ValueError, "at least one bound"),
        (lambda: edits.clip("*", min=1.0, max=0.0), ValueError, "min <= max"),
        (lambda: edits.reinitialize("*", ""), ValueError, "initializer"),
        (lambda: edits.reinitialize("*", "constant", value=object()), TypeError, "unsupported value"),
        (lambda: edits.set_trainable("*", "false"), TypeError, "trainable"),
        (lambda: edits.interpolate("", 0.5), ValueError, "other_model_id"),
        (lambda: edits.interpolate("m", 0.5, other_revision=-1), ValueError, "other_revision"),
        (lambda: edits.task_vector("a", "", 1.0), ValueError, "tuned_model_id"),
        (lambda: edits.copy_from("m", source_revision=-1), ValueError, "source_revision"),
        (lambda: edits.layer(""), ValueError, "class_name"),
        (lambda: edits.replace_head("x", []), ValueError, "at least one"),
        (lambda: edits.replace_head("x", ["Dense"]), TypeError, "LayerSpec"),
        (lambda: edits.replace_head("", [edits.layer("Dense", units=1)]), ValueError, "cut_at_layer"),
    ],
)
def test_builders_reject(build: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build()


# --- client requests -------------------------------------------------------------


def test_apply_edits_request() -> None:
    batch = [edits.scale("*/kernel", 0.5), edits.freeze("*")]
    request = _requests.apply_edits("m1", batch, expected_revision=None, message="", dry_run=False)
    assert request == weight_service_pb2.ApplyEditsRequest(model_id="m1", edits=batch)
    assert not request.HasField("expected_revision")

    request = _requests.apply_edits("m1", tuple(batch), expected_revision=3, message="msg", dry_run=True)
    assert request.HasField("expected_revision") and request.expected_revision == 3
    assert (request.message, request.dry_run) == ("msg", True)
    assert list(request.edits) == batch


@pytest.mark.parametrize(
    ("batch", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "no edits"),
        (edits.scale("*", 1.0), {}, TypeError, "list of `Edit`s"),
        (["scale"], {}, TypeError, r"edits\[0\]"),
        ([edits_pb2.Edit()], {}, ValueError, "empty"),
        ([edits.scale("*", 1.0)], {"expected_revision": 0}, ValueError, "expected_revision"),
    ],
)
def test_apply_edits_request_rejects(
    batch: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    options: dict[str, Any] = {"expected_revision": None, "message": "", "dry_run": False, **kwargs}
    with pytest.raises(error, match=match):
        _requests.apply_edits("m1", batch, **options)


def test_diff_and_revert_requests() -> None:
    diff = _requests.diff_revisions("m1", 2, 0)
    assert diff == weight_service_pb2.DiffRevisionsRequest(model_id="m1", from_revision=2, to_revision=0)
    with pytest.raises(ValueError, match="from_revision"):
        _requests.diff_revisions("m1", 0, 0)
    with pytest.raises(ValueError, match="to_revision"):
        _requests.diff_revisions("m1", 1, -1)

    revert = _requests.revert_model("m1", 1, expected_revision=None, message="undo")
    assert revert == weight_service_pb2.RevertModelRequest(model_id="m1", to_revision=1, message="undo")
    assert not revert.HasField("expected_revision")
    revert = _requests.revert_model("m1", 1, expected_revision=4, message="")
    assert revert.HasField("expected_revision") and revert.expected_revision == 4
    with pytest.raises(ValueError, match="to_revision"):
        _requests.revert_model("m1", 0, expected_revision=None, message="")


def test_only_diff_revisions_is_retried() -> None:
    retried = {method for _, method in _rpcs.RETRIED_METHODS}
    assert "DiffRevisions" in retried
    assert not retried & {"ApplyEdits", "RevertModel", "WriteWeights"}
    config = json.loads(
        dict(_channel.ClientSettings("127.0.0.1:1", **_CLIENT_KWARGS).channel_options)["grpc.service_config"]
    )
    names = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    assert ("weightsmith.v1.WeightService", "DiffRevisions") in names
    assert ("weightsmith.v1.WeightService", "ApplyEdits") not in names


_CLIENT_KWARGS: dict[str, Any] = {
    "timeout": 60.0,
    "stream_timeout": None,
    "author": "tester@host",
    "max_message_bytes": _channel.DEFAULT_MAX_MESSAGE_BYTES,
    "credentials": None,
    "options": (),
}


# --- client signatures -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "apply_edits",
            [
                ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("model_id", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("edits", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("expected_revision", inspect.Parameter.KEYWORD_ONLY, None),
                ("message", inspect.Parameter.KEYWORD_ONLY, ""),
                ("dry_run", inspect.Parameter.KEYWORD_ONLY, False),
            ],
        ),
        (
            "diff_revisions",
            [
                ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("model_id", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("from_revision", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("to_revision", inspect.Parameter.POSITIONAL_OR_KEYWORD, 0),
            ],
        ),
        (
            "revert_model",
            [
                ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("model_id", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("to_revision", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("expected_revision", inspect.Parameter.KEYWORD_ONLY, None),
                ("message", inspect.Parameter.KEYWORD_ONLY, ""),
            ],
        ),
    ],
)
def test_edit_methods_are_twins(name: str, expected: list[tuple[str, Any, Any]]) -> None:
    sync_method = getattr(weightsmith.Client, name)
    async_method = getattr(weightsmith.AsyncClient, name)
    for method in (sync_method, async_method):
        signature = inspect.signature(method)
        assert [(p.name, p.kind, p.default) for p in signature.parameters.values()] == expected
    assert (
        inspect.signature(sync_method).return_annotation == inspect.signature(async_method).return_annotation
    )
    assert not inspect.iscoroutinefunction(sync_method)
    assert inspect.iscoroutinefunction(async_method)
    assert sync_method.__doc__ and "Example:" in sync_method.__doc__
    assert async_method.__doc__ and "await client." in async_method.__doc__
