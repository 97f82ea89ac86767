"""Edit messages as domain edit operations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weightsmith.v1 import edits_pb2
from weightsmith_server.api.codecs.common import EnumTable, struct
from weightsmith_server.api.codecs.selectors import selector
from weightsmith_server.api.codecs.tensors import decode_tensor
from weightsmith_server.edits.arithmetic import Add, AddNoise, Assign, Clip, Scale
from weightsmith_server.edits.base import EditOp
from weightsmith_server.edits.initializers import Reinitialize
from weightsmith_server.edits.merging import CopyFrom, Interpolate, TaskVector
from weightsmith_server.edits.pruning import Prune, PruneGranularity, PruneNorm, PruneScope
from weightsmith_server.edits.quantization import Quantize
from weightsmith_server.edits.surgery import LayerToAppend, ReplaceHead, SetTrainable
from weightsmith_server.errors import InvalidArgument, WeightsmithError
from weightsmith_server.selectors import Selector


def _optional_selector(op: Any) -> Selector | None:
    return selector(op.selector) if op.HasField("selector") else None


def _optional(op: Any, name: str) -> Any:
    return getattr(op, name) if op.HasField(name) else None


PRUNE_SCOPES = EnumTable(
    edits_pb2.PruneScope,
    {
        edits_pb2.PRUNE_SCOPE_UNSPECIFIED: PruneScope.PER_TENSOR,
        edits_pb2.PRUNE_SCOPE_PER_TENSOR: PruneScope.PER_TENSOR,
        edits_pb2.PRUNE_SCOPE_GLOBAL: PruneScope.GLOBAL,
    },
)
PRUNE_GRANULARITIES = EnumTable(
    edits_pb2.PruneGranularity,
    {
        edits_pb2.PRUNE_GRANULARITY_UNSPECIFIED: PruneGranularity.ELEMENT,
        edits_pb2.PRUNE_GRANULARITY_ELEMENT: PruneGranularity.ELEMENT,
        edits_pb2.PRUNE_GRANULARITY_OUTPUT_CHANNEL: PruneGranularity.OUTPUT_CHANNEL,
    },
)
PRUNE_NORMS = EnumTable(
    edits_pb2.PruneNorm,
    {
        edits_pb2.PRUNE_NORM_UNSPECIFIED: PruneNorm.L1,
        edits_pb2.PRUNE_NORM_L1: PruneNorm.L1,
        edits_pb2.PRUNE_NORM_L2: PruneNorm.L2,
    },
)
# Per output channel unless per tensor is asked for.
QUANTIZE_PER_CHANNEL = EnumTable(
    edits_pb2.QuantizeGranularity,
    {
        edits_pb2.QUANTIZE_GRANULARITY_UNSPECIFIED: True,
        edits_pb2.QUANTIZE_GRANULARITY_PER_OUTPUT_CHANNEL: True,
        edits_pb2.QUANTIZE_GRANULARITY_PER_TENSOR: False,
    },
)


def _edit(edit: edits_pb2.Edit) -> EditOp:
    kind = edit.WhichOneof("op")
    op = getattr(edit, kind) if kind else None
    if kind == "assign":
        return Assign(op.variable, decode_tensor(op.value, field="value"), tuple(op.begin))
    if kind == "scale":
        return Scale(selector(op.selector), op.factor)
    if kind == "add":
        return Add(selector(op.selector), op.value)
    if kind == "add_noise":
        return AddNoise(selector(op.selector), op.mean, op.stddev, _optional(op, "seed"))
    if kind == "clip":
        return Clip(selector(op.selector), _optional(op, "min"), _optional(op, "max"))
    if kind == "reinitialize":
        config = struct(op.config, field="config")
        return Reinitialize(selector(op.selector), op.initializer, config, _optional(op, "seed"))
    if kind == "set_trainable":
        return SetTrainable(selector(op.selector), op.trainable)
    if kind == "prune":
        return Prune(
            selector(op.selector),
            op.sparsity,
            scope=PRUNE_SCOPES.decode(op.scope, field="scope"),
            granularity=PRUNE_GRANULARITIES.decode(op.granularity, field="granularity"),
            norm=PRUNE_NORMS.decode(op.norm, field="norm"),
        )
    if kind == "quantize":
        return Quantize(
            selector(op.selector),
            op.bits or 8,
            per_channel=QUANTIZE_PER_CHANNEL.decode(op.granularity, field="granularity"),
        )
    if kind == "interpolate":
        return Interpolate(selector(op.selector), op.other_model_id, op.alpha, op.other_revision)
    if kind == "task_vector":
        return TaskVector(selector(op.selector), op.base_model_id, op.tuned_model_id, op.scale)
    if kind == "copy_from":
        return CopyFrom(_optional_selector(op), op.source_model_id, op.source_revision)
    if kind == "replace_head":
        layers = tuple(
            LayerToAppend(spec.class_name, struct(spec.config, field=f"layers[{i}].config"))
            for i, spec in enumerate(op.layers)
        )
        return ReplaceHead(op.cut_at_layer, layers, _optional(op, "seed"))
    raise InvalidArgument(
        "Received an edit with no operation this server knows; set one of the `op` fields "
        "(a newer client may be sending an op this server does not have).",
        reason="UNKNOWN_EDIT",
        field="",
    )


def edit_ops(edits: Sequence[edits_pb2.Edit]) -> list[EditOp]:
    """Decode a batch of edits; errors name the edit (`edits[3].assign.value`)."""
    ops = []
    for index, edit in enumerate(edits):
        kind = edit.WhichOneof("op")
        try:
            ops.append(_edit(edit))
        except WeightsmithError as exc:
            raise exc.with_field_prefix(f"edits[{index}].{kind}" if kind else f"edits[{index}]") from None
    return ops
