"""Building Keras models safely: the catalog, config JSON and `.keras` uploads.

Only builtin Keras objects are ever deserialized. Keras' own `safe_mode`
refuses Python lambdas; `check_builtin_config` also refuses, before Keras
sees the config, every object from outside the `keras` package, custom
registered objects, and the builtin layers that load or run foreign code.
"""

from __future__ import annotations

import contextlib
import math
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith_server.errors import InvalidArgument
from weightsmith_server.limits import (
    InputLimits,
    check_config_size,
    check_zip_listing,
    excerpt,
    iter_member,
    parse_config_json,
    read_member,
)

# Builtin layers that execute code or load artifacts of their own.
_FORBIDDEN_CLASSES = frozenset(
    {"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "__lambda__"}
)

# Keras keeps global state (random seed, layer name counters) while building.
_BUILD_LOCK = threading.Lock()
# How much of a Keras error a reply quotes: Keras often echoes the whole config.
_KERAS_ERROR_CHARS = 1000
# A `.keras` file's config member.
_CONFIG_MEMBER = "config.json"


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
                    metadata={"class_name": excerpt(class_name)},
                )
            if module is not None and not (module == "keras" or str(module).startswith("keras.")):
                raise InvalidArgument(
                    f"The model refers to `{excerpt(module)}.{excerpt(class_name)}`, from outside "
                    "Keras; only builtin Keras objects are accepted.",
                    reason="UNSAFE_MODEL",
                    field=field,
                    metadata={"module": excerpt(module), "class_name": excerpt(class_name)},
                )
            if registered is not None and registered != class_name:
                raise InvalidArgument(
                    f"The model uses the custom object `{excerpt(registered)}`; only builtin Keras "
                    "objects are accepted.",
                    reason="UNSAFE_MODEL",
                    field=field,
                    metadata={"registered_name": excerpt(registered)},
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


def _catalog_arguments(spec: CatalogSpec, weights_path: Path | None) -> dict[str, Any]:
    """The `keras.applications` constructor's arguments for the spec."""
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
    return kwargs


def build_from_catalog(spec: CatalogSpec, *, seed: int | None, device: str, weights_path: Path | None) -> Any:
    """Build a catalog architecture on `device`, never downloading anything.

    `weights_path` is `spec.weights_file` resolved inside the store's imports.
    """
    import keras
    import tensorflow as tf

    if spec.name not in catalog_names():
        raise InvalidArgument(
            f"Received an unknown catalog architecture, expected a `keras.applications` "
            f"constructor name such as `ResNet50` (GetServerInfo lists them). "
            f"Received: {excerpt(spec.name)!r}",
            reason="UNKNOWN_ARCHITECTURE",
            field="catalog.name",
        )
    kwargs = _catalog_arguments(spec, weights_path)
    constructor = getattr(keras.applications, spec.name)
    with _BUILD_LOCK, tf.device(device):
        if seed is not None:
            keras.utils.set_random_seed(seed)
        try:
            return constructor(**kwargs)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(
                f"{spec.name} rejected its arguments: {excerpt(exc, _KERAS_ERROR_CHARS)}",
                reason="INVALID_ARCHITECTURE_ARGUMENTS",
                field="catalog",
            ) from exc


def build_from_config(
    config_json: str, *, seed: int | None, device: str, field: str, limits: InputLimits
) -> Any:
    """Build a model from a Keras config JSON of builtin objects on `device`.

    The config is bounded (size, nesting depth) before Keras, which recurses
    and reads it whole, ever sees it.
    """
    import keras
    import tensorflow as tf

    config = parse_config_json(config_json, limits, field=field, reason="INVALID_MODEL_CONFIG")
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
                f"Keras could not build the model config: {excerpt(exc, _KERAS_ERROR_CHARS)}",
                reason="INVALID_MODEL_CONFIG",
                field=field,
            ) from exc
    return _require_built(model, field)


def _corrupt_upload(detail: object, field: str) -> InvalidArgument:
    return InvalidArgument(
        f"The upload is not a readable `.keras` file: {excerpt(detail)}.",
        reason="CORRUPT_MODEL_FILE",
        field=field,
    )


def read_keras_config(path: Path, *, field: str, limits: InputLimits) -> Any:
    """A `.keras` file's parsed config, after checking every member against the limits.

    Declared sizes are checked from the zip's headers first; then every
    compressed member is inflated in pieces and counted (zipfile stops at the
    declared size and checks the CRC), so a lying header is caught too,
    before Keras reads anything.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_listing(archive, limits, field=field, reason="CORRUPT_MODEL_FILE")
            info = archive.getinfo(_CONFIG_MEMBER)
            check_config_size(
                info.file_size, limits.max_config_bytes, field=field, what="`.keras` file's config.json"
            )
            with archive.open(info) as stream:
                raw = read_member(
                    stream, _CONFIG_MEMBER, limits.max_config_bytes, field=field, flag="--max-config-mb"
                )
            for member in archive.infolist():
                if member.compress_type != zipfile.ZIP_STORED and member is not info:
                    with archive.open(member) as stream:
                        for _ in iter_member(stream, member.filename, limits.max_member_bytes, field=field):
                            pass
    except KeyError as exc:
        raise _corrupt_upload("it has no config.json", field) from exc
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise _corrupt_upload(exc, field) from exc
    return parse_config_json(
        raw, limits, field=field, reason="CORRUPT_MODEL_FILE", what="`.keras` file's config.json"
    )


def load_upload(path: Path, *, device: str, field: str, limits: InputLimits) -> Any:
    """Load an uploaded `.keras` file after checking its sizes and that it holds only builtin objects."""
    import keras
    import tensorflow as tf

    config = read_keras_config(path, field=field, limits=limits)
    if not isinstance(config, dict):
        raise _corrupt_upload("its config.json is not a JSON object", field)
    check_builtin_config(config, field=field)
    with _BUILD_LOCK, tf.device(device):
        try:
            model = keras.models.load_model(path, safe_mode=True, compile=False)
        except Exception as exc:  # corrupt weights, bad config, refused by safe mode
            raise InvalidArgument(
                f"Keras could not load the `.keras` file: "
                f"{excerpt(str(exc).replace(str(path), 'the upload'), _KERAS_ERROR_CHARS)}",
                reason="CORRUPT_MODEL_FILE",
                field=field,
            ) from exc
    return _require_built(model, field)


def declared_bytes(build: Callable[[], Any]) -> int:
    """Bytes of the variables the model `build()` makes would hold, found without allocating them.

    Keras creates variables inside a stateless scope as shape and dtype
    only, so a config declaring a 10^6 x 10^6 Dense layer costs nothing
    here. A build that fails reports 0: the real build then raises the error
    the caller expects.
    """
    import numpy as np
    from keras.src.backend.common import global_state
    from keras.src.backend.common.stateless_scope import StatelessScope

    with _BUILD_LOCK:
        try:
            with StatelessScope(initialize_variables=False):
                model = build()
                return sum(
                    math.prod(variable.shape) * np.dtype(variable.dtype).itemsize
                    for variable in model.variables
                )
        except Exception:  # the real build reports it, with its own reason
            return 0
        finally:
            global_state.set_global_attribute("uninitialized_variables", [])


def config_declared_bytes(config_json: str) -> int:
    """`declared_bytes` of a Keras model config (JSON)."""
    import keras

    return declared_bytes(lambda: keras.models.model_from_json(config_json))


def catalog_declared_bytes(spec: CatalogSpec) -> int:
    """`declared_bytes` of a catalog architecture, built without weights."""
    import keras

    if spec.name not in catalog_names():
        return 0
    constructor = getattr(keras.applications, spec.name)
    return declared_bytes(lambda: constructor(**_catalog_arguments(spec, None)))


def rebuild(config_json: str, *, device: str, seed: int | None = None, initialize: bool = True) -> Any:
    """Rebuild a checked architecture; `seed` fixes the fresh variables' values.

    An empty `device` leaves placement to the caller (a distribution strategy).
    `initialize=False` allocates no variable (shapes and dtypes only): for a
    model that is only described, never run.
    """
    import keras
    import tensorflow as tf
    from keras.src.backend.common import global_state
    from keras.src.backend.common.stateless_scope import StatelessScope

    with _BUILD_LOCK, tf.device(device) if device else contextlib.nullcontext():
        if seed is not None:
            keras.utils.set_random_seed(seed)
        if initialize:
            return keras.models.model_from_json(config_json)
        try:
            with StatelessScope(initialize_variables=False):
                return keras.models.model_from_json(config_json)
        finally:
            global_state.set_global_attribute("uninitialized_variables", [])


def rebuild_with_values(config_json: str, value_of: Callable[[str], Any], *, device: str) -> Any:
    """Rebuild a checked architecture whose weights start as `value_of(path)` (paths of `model_variables`).

    The variables are created uninitialized (a stateless scope, as in
    `declared_bytes`) and each is then initialized once, from its value:
    no initializer runs and no fresh value is allocated only to be
    overwritten, so a restored model holds one copy of its weights. Other
    state (random-generator seeds) is initialized as usual. A value whose
    shape differs from the variable's raises ValueError.
    """
    import keras
    import tensorflow as tf
    from keras.src.backend.common import global_state
    from keras.src.backend.common.stateless_scope import StatelessScope

    from weightsmith_server.dtypes import numpy_dtype
    from weightsmith_server.variables import model_variables

    with _BUILD_LOCK, tf.device(device) if device else contextlib.nullcontext():
        try:
            with StatelessScope(initialize_variables=False):
                model = keras.models.model_from_json(config_json)
        finally:
            global_state.set_global_attribute("uninitialized_variables", [])
        for entry, variable in model_variables(model):
            value = value_of(entry.path)
            if tuple(value.shape) != tuple(variable.shape) or value.dtype != numpy_dtype(str(variable.dtype)):
                raise ValueError(
                    f"{entry.path}: stored {value.dtype}{list(value.shape)}, the architecture declares "
                    f"{variable.dtype}{list(variable.shape)}"
                )
            # Keras' own deferred initialization (in an init scope), with the value as initializer.
            variable._initializer = lambda shape, dtype, value=value: value
            variable._deferred_initialize()
        for variable in model.variables:
            if variable._value is None:
                variable._deferred_initialize()
    return model


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
