"""The working state of one edit batch, and what each edit reports.

Edits read and replace whole variable values here, never the resident model:
nothing is visible until the batch commits, and a failing edit anywhere
leaves the model untouched. Values start as zero-copy snapshots of the
committed revision and are replaced by new arrays as edits change them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from weightsmith_server.dtypes import numpy_dtype
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.limits import excerpt
from weightsmith_server.manifests import VariableRecord
from weightsmith_server.models import architecture
from weightsmith_server.numerics import all_finite, change_stats
from weightsmith_server.selectors import Selector, select
from weightsmith_server.variables import model_variables
from weightsmith_server.zerocopy import ALIGNMENT, aligned_empty, snapshot

if TYPE_CHECKING:
    from weightsmith_server.models.host import ModelHost
    from weightsmith_server.models.resident import ResidentModel


@dataclass
class EditReport:
    """What one edit did: stored in the revision and returned to the caller."""

    op: str
    variables: list[str] = field(default_factory=list)
    elements_changed: int = 0
    delta_l2: float = 0.0
    architecture_changed: bool = False
    seed: int = 0
    _delta_squared: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "variables": self.variables,
            "elements_changed": self.elements_changed,
            "delta_l2": self.delta_l2,
            "architecture_changed": self.architecture_changed,
            "seed": self.seed,
        }


_GLOB = re.compile(r"[*?[]")


def is_floating(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


class EditContext:
    """A model's variables as a batch of edits sees and changes them."""

    def __init__(self, host: ModelHost, resident: ResidentModel) -> None:
        self.host = host
        self.resident = resident
        # Taken once: the batch sees one revision throughout.
        self.state = resident.state
        self.layer_count = self.state.manifest.layer_count
        self.records: dict[str, VariableRecord] = self.state.manifest.by_path()
        self.changed: set[str] = set()
        self.architecture_json: str | None = None
        self.keras_model: Any = None
        self._values: dict[str, np.ndarray] = {}
        # Floating-point changes whose statistics `settle` has yet to count: (report, new, old).
        self._unsettled: list[tuple[EditReport, np.ndarray, np.ndarray]] = []

    # --- reading -------------------------------------------------------------

    def other_model(
        self, model_id: str, revision: int, *, field: str
    ) -> tuple[dict[str, VariableRecord], Callable[[VariableRecord], np.ndarray]]:
        """Another model's variables at a revision (0: current), read from the store.

        Reads committed files only, so the values are those of exactly that
        revision whatever commits meanwhile; takes no lock.
        """
        _, manifest = self.host.revision(model_id, revision, field=field, model_field=field)
        return manifest.by_path(), lambda record: self.host.store.load_tensor(model_id, record)

    def select(self, selector: Selector, *, field: str = "selector") -> list[str]:
        if selector.layers or selector.layer_range is not None or not selector.has_picks:
            entries = [r.entry for r in self.records.values()]
        else:
            # Exact paths and literal patterns (no glob characters) only match their own
            # variables: select among those instead of matching every variable of the model.
            globs = [p for p in selector.patterns if _GLOB.search(p)]
            if globs:
                entries = [r.entry for r in self.records.values()]
            else:
                named = {*selector.paths, *selector.patterns}
                entries = [r.entry for r in self.records.values() if r.path in named]
        return select(selector, entries, self.layer_count, field=field)

    def value(self, path: str) -> np.ndarray:
        """The working value of a variable (read-only until replaced)."""
        if path not in self._values:
            self._values[path] = snapshot(self.state.variables[path])
        return self._values[path]

    def floating(self, paths: list[str], *, field: str = "selector") -> list[np.ndarray]:
        """The values of `paths`, which must all be floating-point variables."""
        for path in paths:
            dtype = numpy_dtype(self.records[path].dtype)
            if not is_floating(dtype):
                raise InvalidArgument(
                    f"Variable {path!r} is {dtype.name}; this edit applies to floating-point "
                    "variables only. Narrow the selector.",
                    reason="NOT_FLOATING_POINT",
                    field=field,
                )
        return [self.value(p) for p in paths]

    def architecture(self) -> dict[str, Any]:
        """The model's Keras config as it stands in this batch."""
        if self.architecture_json is None:
            model_id = self.resident.model_id
            text = self.host.store.read_architecture(model_id, self.state.revision.revision)
        else:
            text = self.architecture_json
        return json.loads(text)

    # --- writing -------------------------------------------------------------

    def new_value(self, path: str) -> np.ndarray:
        """An uninitialized array for a variable's next value, for ops that compute with `out=`.

        Page-aligned: the resident variable adopts it without a copy on
        install, and the store writes it with `O_DIRECT`.
        """
        record = self.records[path]
        return aligned_empty(record.shape, numpy_dtype(record.dtype))

    def put(self, path: str, new: np.ndarray, report: EditReport, *, field: str = "selector") -> None:
        """Replace a variable's working value, after checking its shape and that it is finite.

        The change goes into `report` (its variables now; for floating-point
        values the changed count and delta L2 once `settle` counts them).
        """
        record = self.records[path]
        dtype = numpy_dtype(record.dtype)
        new = np.asarray(new)
        if new.shape != record.shape:
            raise InvalidArgument(
                f"The edit produced shape {list(new.shape)} for {path!r}, expected {list(record.shape)}.",
                reason="WRONG_SHAPE",
                field=field,
            )
        if new.dtype != dtype or not new.flags.c_contiguous or new.ctypes.data % ALIGNMENT:
            # One copy here instead of one at install (a misaligned buffer cannot be adopted).
            aligned = aligned_empty(record.shape, dtype)
            with np.errstate(over="ignore", invalid="ignore"):  # reported below as non-finite
                np.copyto(aligned, new, casting="unsafe")
            new = aligned
        old = self.value(path)
        if is_floating(dtype):
            if not all_finite(new):
                raise InvalidArgument(
                    f"The edit made {path!r} non-finite (NaN or infinite); check its arguments.",
                    reason="NON_FINITE_RESULT",
                    field=field,
                )
            # Counted by `settle`, which the engine overlaps with writing the new values.
            self._unsettled.append((report, new, old))
        else:
            report.elements_changed += int(np.count_nonzero(new != old))
        if path not in report.variables:
            report.variables.append(path)
        self._values[path] = new
        self.changed.add(path)

    def settle(self) -> None:
        """Account every floating-point change made so far (changed count, delta L2) in its report."""
        pending, self._unsettled = self._unsettled, []
        for report, new, old in pending:
            changed, squares = change_stats(new, old)
            report.elements_changed += changed
            report._delta_squared += squares
            report.delta_l2 = math.sqrt(report._delta_squared)

    def rebuild(self, config: dict[str, Any], *, seed: int | None, field: str) -> list[str]:
        """Switch the batch to a new architecture; returns the paths it added.

        Variables that keep their path, shape and dtype keep their values;
        new ones start from the rebuilt model's initialization.
        """
        config_json = json.dumps(config)
        try:
            model = architecture.rebuild(config_json, device=self.resident.device, seed=seed)
        except Exception as exc:  # Keras raises many types for a graph it cannot build
            raise InvalidArgument(
                f"Keras could not build the edited model: {excerpt(exc, 1000)}",
                reason="INVALID_ARCHITECTURE",
                field=field,
            ) from exc
        try:
            found = model_variables(model)
        except InvalidArgument as exc:
            raise exc.with_field_prefix(field) from None
        records: dict[str, VariableRecord] = {}
        added: list[str] = []
        for entry, variable in found:
            dtype = np.dtype(variable.dtype) if variable.dtype != "bfloat16" else numpy_dtype("bfloat16")
            shape = tuple(int(d) for d in variable.shape)
            old = self.records.get(entry.path)
            if old is not None and old.shape == shape and old.dtype == dtype.name:
                self.value(entry.path)  # pin the kept value before the old state goes
                records[entry.path] = replace(
                    old, layer=entry.layer, layer_index=entry.layer_index, trainable=entry.trainable
                )
                continue
            records[entry.path] = VariableRecord(
                path=entry.path,
                dtype=dtype.name,
                shape=shape,
                file="",
                layer=entry.layer,
                layer_index=entry.layer_index,
                trainable=entry.trainable,
            )
            self._values[entry.path] = np.array(variable.numpy())
            self.changed.add(entry.path)
            added.append(entry.path)
        self.records = records
        self.layer_count = len(model.layers)
        self.keras_model = model
        self.architecture_json = model.to_json()
        return added

    def values_to_install(self) -> dict[str, np.ndarray]:
        """Changed values; every value when the model was rebuilt."""
        if self.keras_model is not None:
            return {path: self.value(path) for path in self.records}
        return {path: self._values[path] for path in self.changed}
