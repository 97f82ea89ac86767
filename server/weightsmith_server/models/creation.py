"""How a new model comes to be: what to build, and what its first revision says.

A `NewModel` carries a `build(device)` function that returns the Keras
model with its values, the model's architecture name and source, and the
draft of revision 1. The model host runs the build on the chosen device and
commits revision 1 through the commit path.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weightsmith_server.errors import InvalidArgument
from weightsmith_server.limits import MAX_GLOBAL_SEED, InputLimits, check_seed, excerpt, parse_config_json
from weightsmith_server.models import architecture
from weightsmith_server.models.resident import ModelState
from weightsmith_server.revisions.record import RevisionDraft, RevisionKind
from weightsmith_server.store import Store
from weightsmith_server.variables import model_variables


class ModelSource(enum.StrEnum):
    """Where a model came from (GetModel's `source`)."""

    CATALOG = "catalog"
    CONFIG = "config"
    UPLOAD = "upload"
    JOB = "job"


@dataclass(frozen=True)
class NewModel:
    """A model to create: how to build it and what revision 1 says.

    `architecture` names it (a catalog name); None takes the built model's
    Keras class name (`Functional`, `Sequential`).
    """

    source: ModelSource
    build: Callable[[str], Any]
    draft: RevisionDraft
    architecture: str | None = None
    # The bytes its variables will hold, known before anything is allocated
    # (0: unknown until built): the host refuses a model no budget can hold.
    declared_bytes: Callable[[], int] = lambda: 0
    # JSON files the model's folder starts with (its serving settings), committed with revision 1.
    files: Mapping[str, Any] = field(default_factory=dict)


def _draft(kind: RevisionKind, message: str, author: str, job_id: str = "") -> RevisionDraft:
    # The summary names what was built; the host fills it in once it knows.
    return RevisionDraft(kind=kind, author=author, message=message, summary="", job_id=job_id)


def import_path(store: Store, relative: str) -> Path:
    """A weights file under the store's `imports/` folder; INVALID_ARGUMENT if there is none."""
    path = store.resolve_import(relative)
    if path is None or not path.is_file():
        raise InvalidArgument(
            f"Received weights_file={excerpt(relative)!r}, expected the path of a file under the "
            f"store's `imports/` folder, relative to it.",
            reason="WEIGHTS_FILE_NOT_FOUND",
            field="catalog.weights_file",
        )
    return path


def from_catalog(
    spec: architecture.CatalogSpec, *, seed: int | None, weights_path: Path | None, message: str, author: str
) -> NewModel:
    """A `keras.applications` architecture, with fresh or imported weights."""
    check_seed(seed, field="seed", maximum=MAX_GLOBAL_SEED)

    def build(device: str) -> Any:
        return architecture.build_from_catalog(spec, seed=seed, device=device, weights_path=weights_path)

    return NewModel(
        ModelSource.CATALOG,
        build,
        _draft(RevisionKind.CREATE, message, author),
        spec.name,
        lambda: architecture.catalog_declared_bytes(spec),
    )


def from_config(
    config_json: str, *, seed: int | None, message: str, author: str, limits: InputLimits
) -> NewModel:
    """A Keras model config of builtin layers, within the config limits."""
    check_seed(seed, field="seed", maximum=MAX_GLOBAL_SEED)

    def build(device: str) -> Any:
        return architecture.build_from_config(
            config_json, seed=seed, device=device, field="keras_config_json", limits=limits
        )

    def declared() -> int:
        config = parse_config_json(
            config_json, limits, field="keras_config_json", reason="INVALID_MODEL_CONFIG"
        )
        if not isinstance(config, dict):
            return 0  # the build refuses it with its reason
        architecture.check_builtin_config(config, field="keras_config_json")
        return architecture.config_declared_bytes(config_json)

    return NewModel(ModelSource.CONFIG, build, _draft(RevisionKind.CREATE, message, author), None, declared)


def from_upload(path: Path, *, message: str, author: str, limits: InputLimits) -> NewModel:
    """A received `.keras` file, checked against the limits, loaded in safe mode; removed once read."""

    def build(device: str) -> Any:
        try:
            return architecture.load_upload(path, device=device, field="chunk", limits=limits)
        finally:
            path.unlink(missing_ok=True)

    def declared() -> int:
        config = architecture.read_keras_config(path, field="chunk", limits=limits)
        if not isinstance(config, dict):
            return 0  # the build refuses it with its reason
        architecture.check_builtin_config(config, field="chunk")
        return architecture.config_declared_bytes(json.dumps(config))

    return NewModel(ModelSource.UPLOAD, build, _draft(RevisionKind.UPLOAD, message, author), None, declared)


def from_values(
    config_json: str, values: Mapping[str, np.ndarray], *, message: str, author: str, job_id: str
) -> NewModel:
    """A config and every variable's value: a job's output model."""

    def build(device: str) -> Any:
        model = architecture.rebuild(config_json, device=device)
        for entry, variable in model_variables(model):
            variable.assign(values[entry.path])
        return model

    return NewModel(
        ModelSource.JOB,
        build,
        _draft(RevisionKind.CREATE, message, author, job_id),
        None,
        lambda: architecture.config_declared_bytes(config_json),
    )


def materialize(store: Store, model_id: str, revision: int, device: str) -> ModelState:
    """Build a stored revision's model, its variables initialized bit-exactly from the stored values.

    Each value is read from its (memory-mapped) file straight into its
    variable: one copy, no initializer run first (see `rebuild_with_values`).
    """
    record = store.read_revision(model_id, revision)
    manifest = store.read_manifest(model_id, revision)
    stored = {entry.path: entry for entry in manifest.variables}

    def value_of(path: str) -> np.ndarray:
        entry = stored.pop(path, None)
        if entry is None:
            raise ValueError(f"revision {revision} of {model_id!r} stores no value for {path!r}")
        return np.asarray(store.load_tensor(model_id, entry))

    config = store.read_architecture(model_id, revision)
    keras_model = architecture.rebuild_with_values(config, value_of, device=device)
    if stored:
        raise ValueError(
            f"revision {revision} of {model_id!r} stores values for unknown variables {sorted(stored)}"
        )
    return ModelState.of(record, manifest, keras_model)
