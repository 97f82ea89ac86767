"""Edits that change the architecture: set_trainable and replace_head.

Both produce a new Keras config and rebuild the model from it; variables
that keep their path, shape and dtype keep their values bit for bit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightsmith_server.edits.base import EditOp
from weightsmith_server.edits.context import EditContext, EditReport
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.limits import MAX_GLOBAL_SEED, check_seed, excerpt
from weightsmith_server.models import architecture
from weightsmith_server.selectors import Selector


@dataclass(frozen=True)
class SetTrainable(EditOp):
    """Freeze (`trainable=False`) or unfreeze the layers owning the selected variables."""

    selector: Selector
    trainable: bool
    name = "set_trainable"

    def apply(self, ctx: EditContext) -> EditReport:
        paths = ctx.select(self.selector)
        layers = {ctx.records[p].layer for p in paths}
        config = ctx.architecture()
        for layer in config["config"]["layers"]:
            if layer["config"].get("name") in layers:
                layer["config"]["trainable"] = self.trainable
        ctx.rebuild(config, seed=None, field="selector")
        report = EditReport(self.name, architecture_changed=True)
        report.variables = [p for p, r in ctx.records.items() if r.layer in layers]
        return report


@dataclass(frozen=True)
class LayerToAppend:
    """A builtin layer for `replace_head`: class name and constructor arguments."""

    class_name: str
    config: dict[str, Any] = field(default_factory=dict)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass(frozen=True)
class ReplaceHead(EditOp):
    """Keep the model up to `cut_at_layer`, append new layers, rebuild.

    New layers without a `name` get `head_<class>` (made unique). Their
    variables start from their initializers (seeded with `seed`).
    """

    cut_at_layer: str
    layers: tuple[LayerToAppend, ...]
    seed: int | None = None
    name = "replace_head"

    def apply(self, ctx: EditContext) -> EditReport:
        import keras

        check_seed(self.seed, field="seed", maximum=MAX_GLOBAL_SEED)
        if not self.layers:
            raise InvalidArgument(
                "Received no layers to append; give at least one, for example a Dense layer.",
                reason="NO_LAYERS",
                field="layers",
            )
        # Graft onto a throwaway copy on the CPU: the resident model is never touched.
        graft = architecture.rebuild(json.dumps(ctx.architecture()), device="/CPU:0")
        try:
            tensor = graft.get_layer(self.cut_at_layer).output
        except (ValueError, AttributeError) as exc:
            raise InvalidArgument(
                f"Cannot cut at layer {self.cut_at_layer[:100]!r}: {excerpt(exc, 300)}. GetModel lists "
                "the layers.",
                reason="UNKNOWN_LAYER",
                field="cut_at_layer",
            ) from exc
        taken = {layer.name for layer in graft.layers}
        for index, spec in enumerate(self.layers):
            where = f"layers[{index}]"
            config = dict(spec.config)
            if "name" not in config:
                base = f"head_{_snake(spec.class_name)}"
                config["name"] = next(
                    n for n in (base, *(f"{base}_{i}" for i in range(1, 1000))) if n not in taken
                )
            taken.add(str(config["name"]))
            serialized = architecture.layer_config(spec.class_name, config, field=where)
            try:
                tensor = keras.layers.deserialize(serialized)(tensor)
            except Exception as exc:  # bad arguments, or a layer that does not fit here
                raise InvalidArgument(
                    f"Cannot append {excerpt(spec.class_name, 100)} with {excerpt(config, 300)}: "
                    f"{excerpt(exc, 300)}",
                    reason="INVALID_LAYER",
                    field=where,
                ) from exc
        try:
            grafted = keras.Model(graft.inputs, tensor, name=graft.name)
        except Exception as exc:
            raise InvalidArgument(
                f"The new head does not form a model: {str(exc)[:300]}",
                reason="INVALID_LAYER",
                field="layers",
            ) from exc
        added = ctx.rebuild(json.loads(grafted.to_json()), seed=self.seed, field="layers")
        report = EditReport(self.name, variables=added, architecture_changed=True, seed=self.seed or 0)
        for path in added:  # new variables: their change is from nothing to their initial values
            value = ctx.value(path).astype(np.float64)
            report.elements_changed += int(np.count_nonzero(value))
            report._delta_squared += float(np.dot(value.ravel(), value.ravel()))
        report.delta_l2 = math.sqrt(report._delta_squared)
        return report
