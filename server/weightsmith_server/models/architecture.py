"""Building Keras models safely: the catalog, config JSON and `.keras` uploads.

Only builtin Keras objects are ever deserialized. Keras' own `safe_mode`
refuses Python lambdas; `check_builtin_config` also refuses, before Keras
sees the config, every object from outside the `keras` package, custom
registered objects, and the builtin layers that load or run foreign code.
"""

from __future__ import annotations

import contextlib
import json
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith_server.errors import InvalidArgument

# Builtin layers that execute code or load artifacts of their own.
_FORBIDDEN_CLASSES = frozenset(
    {"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "__lambda__"}
)

# Keras keeps global state (random seed, layer name counters) while building.
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class CatalogSpec:
    """A `keras.applications` constructor and its arguments."""

    name: str
    include_top: bool = True
    input_shape: tuple[int, ...] | None = None
    classes: int = 1000
    pooling: str | None = None
    weights_file: str = ""
    classifier_activation: str | None = None


def catalog_names() -> list[str]:
    """Every `keras.applications` constructor name, sorted."""
    import keras

    return sorted(
        name
        for name in dir(keras.applications)
        if name[:1].isupper() and callable(getattr(keras.applications, name))
    )


def check_builtin_config(config: Any, *, field: str) -> None:
    """Refuse any serialized object that is not a plain builtin Keras object."""
    stack: list[Any] = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if "class_name" in node:
            class_name = node.get("class_name")
            module = node.get("module")
            registered = node.get("registered_name")
            if class_name in _FORBIDDEN_CLASSES:
                raise InvalidArgument(
                    f"The model contains a `{class_name}` layer, which can execute arbitrary "
                    "code and is not accepted. Rebuild the model from builtin layers only.",
                    reason="UNSAFE_MODEL",
                    field=field,
                    metadata={"class_name": str(class_name)},
                )
            if module is not None and not (module == "keras" or str(module).startswith("keras.")):
                raise InvalidArgument(
                    f"The model refers to `{module}.{class_name}`, from outside Keras; only "
                    "builtin Keras objects are accepted.",
                    reason="UNSAFE_MODEL",
                    field=field,
                    metadata={"module": str(module), "class_name": str(class_name)},
                )
            if registered is not None and registered != class_name:
                raise InvalidArgument(
                    f"The model uses the custom object `{registered}`; only builtin Keras "
                    "objects are accepted.",
                    reason="UNSAFE_MODEL",
                    field=field,
                    metadata={"registered_name": str(registered)},
                )
        stack.extend(node.values())


def _require_built(model: Any, field: str) -> Any:
    if not model.built or not model.weights:
        raise InvalidArgument(
            "The model has no weights after building: its config lacks an input shape. "
            "Start it with `keras.Input(shape=...)`.",
            reason="MODEL_NOT_BUILT",
            field=field,
        )
    return model


def build_from_catalog(spec: CatalogSpec, *, seed: int | None, device: str, weights_path: Path | None) -> Any:
    """Build a catalog architecture on `device`, never downloading anything.

    `weights_path` is `spec.weights_file` resolved inside the store's imports.
    """
    import keras
    import tensorflow as tf

    if spec.name not in catalog_names():
        raise InvalidArgument(
            f"Received an unknown catalog architecture, expected a `keras.applications` "
            f"constructor name such as `ResNet50` (GetServerInfo lists them). Received: {spec.name!r}",
            reason="UNKNOWN_ARCHITECTURE",
            field="catalog.name",
        )
    kwargs: dict[str, Any] = {
        "weights": str(weights_path) if weights_path else None,
        "include_top": spec.include_top,
        "input_shape": spec.input_shape,
        "pooling": spec.pooling,
    }
    if spec.include_top:
        kwargs["classes"] = spec.classes
    if spec.classifier_activation:
        kwargs["classifier_activation"] = spec.classifier_activation
    constructor = getattr(keras.applications, spec.name)
    with _BUILD_LOCK, tf.device(device):
        if seed is not None:
            keras.utils.set_random_seed(seed)
        try:
            return constructor(**kwargs)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(
                f"{spec.name} rejected its arguments: {exc}",
                reason="INVALID_ARCHITECTURE_ARGUMENTS",
                field="catalog",
            ) from exc


def build_from_config(config_json: str, *, seed: int | None, device: str, field: str) -> Any:
    """Build a model from a Keras config JSON of builtin objects on `device`."""
    import keras
    import tensorflow as tf

    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"Received a model config that is not valid JSON: {exc}",
            reason="INVALID_MODEL_CONFIG",
            field=field,
        ) from exc
    if not isinstance(config, dict) or "class_name" not in config:
        raise InvalidArgument(
            "Received a model config without `class_name`, expected the output of `model.to_json()`.",
            reason="INVALID_MODEL_CONFIG",
            field=field,
        )
    check_builtin_config(config, field=field)
    with _BUILD_LOCK, tf.device(device):
        if seed is not None:
            keras.utils.set_random_seed(seed)
        try:
            model = keras.models.model_from_json(config_json)
        except Exception as exc:  # Keras raises many types for a bad config.
            raise InvalidArgument(
                f"Keras could not build the model config: {exc}",
                reason="INVALID_MODEL_CONFIG",
                field=field,
            ) from exc
    return _require_built(model, field)


def load_upload(path: Path, *, device: str, field: str) -> Any:
    """Load an uploaded `.keras` file after checking it holds only builtin objects."""
    import keras
    import tensorflow as tf

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"The upload is not a readable `.keras` file: {exc}",
            reason="CORRUPT_MODEL_FILE",
            field=field,
        ) from exc
    check_builtin_config(config, field=field)
    with _BUILD_LOCK, tf.device(device):
        try:
            model = keras.models.load_model(path, safe_mode=True, compile=False)
        except Exception as exc:  # corrupt weights, bad config, refused by safe mode
            raise InvalidArgument(
                f"Keras could not load the `.keras` file: {exc}",
                reason="CORRUPT_MODEL_FILE",
                field=field,
            ) from exc
    return _require_built(model, field)


def rebuild(config_json: str, *, device: str, seed: int | None = None) -> Any:
    """Rebuild a checked architecture; `seed` fixes the fresh variables' values.

    An empty `device` leaves placement to the caller (a distribution strategy).
    """
    import keras
    import tensorflow as tf

    with _BUILD_LOCK, tf.device(device) if device else contextlib.nullcontext():
        if seed is not None:
            keras.utils.set_random_seed(seed)
        return keras.models.model_from_json(config_json)


def layer_config(class_name: str, config: dict[str, Any], *, field: str) -> dict[str, Any]:
    """A serialized builtin Keras layer, checked: only `keras.layers` classes."""
    import keras

    candidate = getattr(keras.layers, class_name, None) if class_name.isidentifier() else None
    if (
        class_name in _FORBIDDEN_CLASSES
        or not isinstance(candidate, type)
        or not issubclass(candidate, keras.layers.Layer)
    ):
        raise InvalidArgument(
            f"Received layer class {class_name[:100]!r}, expected a builtin layer of `keras.layers` "
            "such as `Dense`, `Dropout` or `GlobalAveragePooling2D` (code-running layers such as "
            "`Lambda` are refused).",
            reason="UNKNOWN_LAYER_CLASS",
            field=f"{field}.class_name",
        )
    serialized = {
        "module": "keras.layers",
        "class_name": class_name,
        "config": config,
        "registered_name": None,
    }
    check_builtin_config(serialized, field=f"{field}.config")
    return serialized
