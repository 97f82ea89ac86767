"""Resident models: the Keras models in (GPU) memory, their state and their locks.

Each model's committed state is an immutable `ModelState` that a commit swaps
in whole, so readers that take `resident.state` once see one revision
throughout. Variable values change in place on commit, under the write side
of the model's readers-writer lock; Predict holds the read side. Mutations of
one model are serialized by its commit lock, and each is durable on disk
before it becomes visible.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from weightsmith_server import architecture
from weightsmith_server.devices import Devices
from weightsmith_server.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from weightsmith_server.naming import new_id, validate_id
from weightsmith_server.rwlock import ReadWriteLock
from weightsmith_server.selectors import Selector, select
from weightsmith_server.store import (
    Manifest,
    ModelRecord,
    RevisionRecord,
    StagedRevision,
    Store,
    VariableRecord,
)
from weightsmith_server.tensor_spec import TensorSpecInfo
from weightsmith_server.variables import model_variables
from weightsmith_server.zerocopy import adopt, snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")

# Distinct `output_layers` combinations kept built per model (clients choose them).
_FEATURE_MODEL_CACHE = 8

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def utc_now() -> str:
    """The current time as an RFC 3339 string, as stored in the JSON files."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class LayerInfo:
    index: int
    name: str
    class_name: str
    trainable: bool


@dataclass(frozen=True)
class ModelInfo:
    """Everything GetModel reports."""

    model_id: str
    revision: int
    architecture: str
    source: str
    device: str
    parameter_count: int
    weight_bytes: int
    inputs: list[TensorSpecInfo]
    outputs: list[TensorSpecInfo]
    layers: list[LayerInfo]
    variables: tuple[VariableRecord, ...]
    create_time: str
    update_time: str


@dataclass(frozen=True)
class ModelState:
    """One committed revision of a resident model; swapped in whole on commit."""

    revision: RevisionRecord
    manifest: Manifest
    keras_model: Any
    variables: dict[str, Any]
    feature_models: dict[tuple[str, ...], Any] = field(default_factory=dict)


def _spec(tensor: Any, name: str) -> TensorSpecInfo:
    return TensorSpecInfo(
        name=name,
        dtype=str(tensor.dtype),
        shape=tuple(-1 if d is None else int(d) for d in tensor.shape),
    )


def _output_names(model: Any) -> list[str]:
    """Functional models name outputs after their layers; a Sequential's is its last layer."""
    names = list(getattr(model, "output_names", None) or [model.layers[-1].name])
    return names if len(names) == len(model.outputs) else [f"output_{i}" for i in range(len(model.outputs))]


def _pack_inputs(model: Any, arrays: list[np.ndarray]) -> Any:
    """Arrange inputs the way the model was built: one tensor, a list or a dict."""
    import keras

    structure = getattr(model, "_inputs_struct", None)
    if structure is not None:
        return keras.tree.pack_sequence_as(structure, arrays)
    return arrays[0] if len(arrays) == 1 else arrays


class ResidentModel:
    """A model in memory, with the locks that keep its revisions whole."""

    def __init__(self, record: ModelRecord, device: str, state: ModelState) -> None:
        self.record = record
        self.model_id = record.model_id
        self.device = device
        self.state = state
        self.lock = ReadWriteLock()
        self.commit_lock = threading.Lock()
        # Set under `commit_lock`: a deleted model accepts no more commits.
        self.deleted = False
        # The in-place job training this model, which alone may commit meanwhile.
        self.job: str | None = None

    def reserve_for_job(self, job_id: str) -> bool:
        """Lock the model for an in-place job; False if another job holds it."""
        with self.commit_lock:
            if self.job not in (None, job_id):
                return False
            self.job = job_id
            return True

    def release_job(self, job_id: str) -> None:
        with self.commit_lock:
            if self.job == job_id:
                self.job = None

    def check_not_busy(self, field: str = "model_id", job_id: str | None = None) -> None:
        """FAILED_PRECONDITION while an in-place job (other than `job_id`) trains the model."""
        if self.job is not None and self.job != job_id:
            raise FailedPrecondition(
                f"Model {self.model_id!r} is being trained in place by job {self.job!r}; mutations wait "
                "until it ends (CancelJob stops it). Predict and ReadWeights keep working.",
                reason="MODEL_BUSY",
                field=field,
                metadata={"job_id": self.job},
            )

    @property
    def revision(self) -> int:
        return self.state.revision.revision

    def install(self, prepared: Prepared, manifest: Manifest) -> None:
        """Make a committed revision the resident state, atomically for readers.

        A rebuilt model gets its values before it becomes visible; otherwise
        the new values go into the live variables under the write lock.
        """
        if prepared.keras_model is not None:
            variables = {entry.path: v for entry, v in model_variables(prepared.keras_model)}
            for path, value in prepared.values.items():
                adopt(variables[path], value)
            with self.lock.write():
                self.state = ModelState(prepared.record, manifest, prepared.keras_model, variables)
            return
        state = self.state
        with self.lock.write():
            for path, value in prepared.values.items():
                adopt(state.variables[path], value)
            self.state = ModelState(
                revision=prepared.record,
                manifest=manifest,
                keras_model=state.keras_model,
                variables=state.variables,
                feature_models=state.feature_models,
            )

    def describe(self) -> ModelInfo:
        state = self.state
        model = state.keras_model
        variables = state.manifest.variables
        return ModelInfo(
            model_id=self.model_id,
            revision=state.revision.revision,
            architecture=self.record.architecture,
            source=self.record.source,
            device=self.device,
            parameter_count=sum(int(np.prod(v.shape, dtype=np.int64)) for v in variables),
            weight_bytes=sum(v.nbytes for v in variables),
            inputs=[_spec(t, t.name) for t in model.inputs],
            outputs=[_spec(t, n) for t, n in zip(model.outputs, _output_names(model), strict=True)],
            layers=[
                LayerInfo(i, layer.name, type(layer).__name__, bool(layer.trainable))
                for i, layer in enumerate(model.layers)
            ],
            variables=variables,
            create_time=self.record.create_time,
            update_time=state.revision.create_time,
        )

    def predict(
        self, inputs: Sequence[tuple[str, np.ndarray]], output_layers: Sequence[str]
    ) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]], int]:
        """Run the model on a batch; returns outputs, layer outputs and the revision."""
        import keras
        import tensorflow as tf

        with self.lock.read():
            state = self.state
            model = state.keras_model
            arrays = _order_inputs(model, inputs)
            runner = model
            if output_layers:
                runner = self._feature_model(state, tuple(output_layers))
            with tf.device(self.device):
                result = runner(_pack_inputs(runner, arrays), training=False)
            flat = [np.asarray(t) for t in keras.tree.flatten(result)]
            revision = state.revision.revision
        count = len(model.outputs)
        outputs = list(zip(_output_names(model), flat[:count], strict=True))
        layer_outputs = list(zip(output_layers, flat[count:], strict=True))
        return outputs, layer_outputs, revision

    @staticmethod
    def _feature_model(state: ModelState, names: tuple[str, ...]) -> Any:
        import keras

        cached = state.feature_models.get(names)
        if cached is not None:
            return cached
        if len(state.feature_models) >= _FEATURE_MODEL_CACHE:
            state.feature_models.pop(next(iter(state.feature_models)))
        model = state.keras_model
        tensors = []
        for index, name in enumerate(names):
            try:
                tensors.append(model.get_layer(name).output)
            except (ValueError, AttributeError) as exc:
                raise InvalidArgument(
                    f"Cannot return the output of layer {name!r}: {exc}. GetModel lists the layers.",
                    reason="UNKNOWN_LAYER",
                    field=f"output_layers[{index}]",
                ) from exc
        runner = keras.Model(model.inputs, [*model.outputs, *tensors])
        state.feature_models[names] = runner
        return runner


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


@dataclass
class Prepared:
    """A revision ready to commit, built by a mutation under the commit lock.

    `manifest` lists every variable (staged entries under `tensors/`);
    `values` holds the new values by path. When the architecture changes,
    `architecture_json` is its config and `keras_model` the rebuilt model,
    and `values` covers every one of its variables.
    """

    record: RevisionRecord
    manifest: Manifest
    values: dict[str, np.ndarray]
    architecture_json: str | None = None
    keras_model: Any = None


def check_expected_revision(resident: ResidentModel, expected: int | None, field: str) -> None:
    """Raise `Aborted` when the model moved past the revision the caller expects."""
    if expected is not None and expected != resident.revision:
        raise Aborted(
            f"Model {resident.model_id!r} is at revision {resident.revision}, not the expected "
            f"revision {expected}; re-read it and retry.",
            reason="REVISION_MISMATCH",
            field=field,
            metadata={"current_revision": str(resident.revision), "expected_revision": str(expected)},
        )


def require_revision_number(value: int, field: str) -> None:
    """INVALID_ARGUMENT unless `value` can be a revision number (from 1)."""
    if value < 1:
        raise InvalidArgument(
            f"Received {field}={value}, expected a revision number of at least 1.",
            reason="INVALID_REVISION",
            field=field,
        )


def encode_page_token(value: str) -> str:
    """An opaque page token for the last item of a page."""
    return base64.urlsafe_b64encode(value.encode()).decode()


def decode_page_token(token: str, field: str = "page_token") -> str:
    """The item a page token stands for; INVALID_ARGUMENT for a token we did not make."""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            "Received an invalid page token; pass `next_page_token` from the previous page.",
            reason="INVALID_PAGE_TOKEN",
            field=field,
        ) from exc


def decode_number_token(token: str) -> int:
    """A page token that stands for a number (a revision, a sequence number)."""
    value = decode_page_token(token)
    if not (value.isascii() and value.isdigit()):
        raise InvalidArgument(
            "Received an invalid page token; pass `next_page_token` from the previous page.",
            reason="INVALID_PAGE_TOKEN",
            field="page_token",
        )
    return int(value)


def page_size(value: int) -> int:
    """Apply the AIP page size rules: 0 means the default, large values are capped."""
    if value < 0:
        raise InvalidArgument(
            f"Received a negative page_size, expected 0 to {MAX_PAGE_SIZE}. Received: {value}",
            reason="INVALID_PAGE_SIZE",
            field="page_size",
        )
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class Registry:
    """All resident models of a server, backed by the store."""

    def __init__(
        self,
        store: Store,
        devices: Devices,
        executor: ThreadPoolExecutor,
        max_upload_bytes: int,
        retain_revisions: int = 0,
    ) -> None:
        self.store = store
        self.devices = devices
        self.executor = executor
        self.max_upload_bytes = max_upload_bytes
        self.retain_revisions = retain_revisions
        self._models: dict[str, ResidentModel] = {}
        self._unrestorable: dict[str, str] = {}
        self._reserved: set[str] = set()
        self._lock = threading.Lock()
        self.ready = False

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run blocking work (TensorFlow, disk) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    # --- lookup --------------------------------------------------------------

    def _require_ready(self) -> None:
        if not self.ready:
            raise Unavailable(
                "The server is still restoring its models; retry in a moment.",
                reason="STARTING",
            )

    def get(self, model_id: str, field: str = "model_id") -> ResidentModel:
        """The resident model, or NotFound (InvalidArgument for a malformed id)."""
        self._require_ready()
        validate_id(model_id, field=field)
        if model_id in self._unrestorable:
            raise FailedPrecondition(
                f"Model {model_id!r} is in the store but could not be restored at start-up: "
                f"{self._unrestorable[model_id]}. The server log has the details.",
                reason="MODEL_UNRESTORABLE",
                field=field,
            )
        try:
            return self._models[model_id]
        except KeyError:
            raise NotFound(
                f"No model with id {model_id!r}; ListModels shows the models on this server.",
                reason="MODEL_NOT_FOUND",
                field=field,
                metadata={"model_id": model_id},
            ) from None

    def models(self) -> list[ResidentModel]:
        return [self._models[k] for k in sorted(self._models)]

    def resident_bytes(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for resident in list(self._models.values()):
            totals[resident.device] = totals.get(resident.device, 0) + sum(
                v.nbytes for v in resident.state.manifest.variables
            )
        return totals

    def list_models(self, size: int, token: str) -> tuple[list[ModelInfo], str]:
        self._require_ready()
        size = page_size(size)
        after = decode_page_token(token) if token else ""
        ids = [k for k in sorted(self._models) if k > after]
        page = ids[:size]
        next_token = encode_page_token(page[-1]) if len(ids) > size else ""
        return [self._models[k].describe() for k in page], next_token

    # --- start-up ------------------------------------------------------------

    async def restore(self) -> None:
        """Load every stored model at its latest revision.

        A model that fails to load is reported (FAILED_PRECONDITION on use)
        rather than keeping the whole server from starting.
        """
        ids = self.store.model_ids()
        for model_id in ids:
            try:
                self._models[model_id] = await self.run(self._restore_one, model_id)
            except Exception as exc:
                log.exception("model %s could not be restored", model_id)
                self._unrestorable[model_id] = f"{type(exc).__name__}: {exc}"[:300]
        self.ready = True
        log.info("restored %d of %d model(s)", len(self._models), len(ids))

    def _restore_one(self, model_id: str) -> ResidentModel:
        record = self.store.read_model(model_id)
        latest = self.store.revision_numbers(model_id)[-1]
        device = self.devices.choose(self.resident_bytes())
        keras_model, manifest, revision = self.materialize(model_id, latest, device)
        variables = {entry.path: v for entry, v in model_variables(keras_model)}
        return ResidentModel(record, device, ModelState(revision, manifest, keras_model, variables))

    def materialize(self, model_id: str, revision: int, device: str) -> tuple[Any, Manifest, RevisionRecord]:
        """Build a revision's model from the store, weights assigned bit-exactly."""
        record = self.store.read_revision(model_id, revision)
        manifest = self.store.read_manifest(model_id, revision)
        keras_model = architecture.rebuild(self.store.read_architecture(model_id, revision), device=device)
        variables = {entry.path: v for entry, v in model_variables(keras_model)}
        for stored in manifest.variables:
            variables[stored.path].assign(self.store.load_tensor(model_id, stored))
        return keras_model, manifest, record

    # --- creation ------------------------------------------------------------

    def _reserve(self, model_id: str, field: str) -> str:
        self._require_ready()
        model_id = validate_id(model_id, field=field) if model_id else new_id("model")
        with self._lock:
            if (
                model_id in self._models
                or model_id in self._reserved
                or self.store.model_dir(model_id).exists()
            ):
                raise AlreadyExists(
                    f"A model with id {model_id!r} exists already; pick another id or delete it first.",
                    reason="MODEL_EXISTS",
                    field=field,
                    metadata={"model_id": model_id},
                )
            self._reserved.add(model_id)
        return model_id

    def _release(self, model_id: str) -> None:
        with self._lock:
            self._reserved.discard(model_id)

    async def _run_reserved(self, model_id: str, function: Callable[[], T]) -> T:
        """Run `function` in the executor and release `model_id` when it is done.

        Released by the worker's own completion, not the caller's: a client that
        gives up must not free the id while the build still runs.
        """
        future = self.executor.submit(function)
        future.add_done_callback(lambda _: self._release(model_id))
        return await asyncio.wrap_future(future)

    async def create_from_catalog(
        self, model_id: str, spec: architecture.CatalogSpec, seed: int | None, message: str, author: str
    ) -> ModelInfo:
        weights_path = self._import_path(spec.weights_file) if spec.weights_file else None
        model_id = self._reserve(model_id, "model_id")
        device = self.devices.choose(self.resident_bytes())

        def build() -> ResidentModel:
            model = architecture.build_from_catalog(spec, seed=seed, device=device, weights_path=weights_path)
            return self._commit_new(model_id, model, device, spec.name, "catalog", "create", message, author)

        return (await self._run_reserved(model_id, build)).describe()

    def _import_path(self, relative: str) -> Path:
        path = self.store.resolve_import(relative)
        if path is None or not path.is_file():
            raise InvalidArgument(
                f"Received weights_file={relative[:200]!r}, expected the path of a file under the "
                f"store's imports folder ({self.store.imports_dir}), relative to it.",
                reason="WEIGHTS_FILE_NOT_FOUND",
                field="catalog.weights_file",
            )
        return path

    async def create_from_config(
        self, model_id: str, config_json: str, seed: int | None, message: str, author: str
    ) -> ModelInfo:
        model_id = self._reserve(model_id, "model_id")
        device = self.devices.choose(self.resident_bytes())

        def build() -> ResidentModel:
            model = architecture.build_from_config(
                config_json, seed=seed, device=device, field="keras_config_json"
            )
            kind = type(model).__name__
            return self._commit_new(model_id, model, device, kind, "config", "create", message, author)

        return (await self._run_reserved(model_id, build)).describe()

    async def upload(
        self, model_id: str, size_bytes: int, message: str, author: str, chunks: AsyncIterator[bytes]
    ) -> ModelInfo:
        """Receive a `.keras` file, check it, load it safely and commit revision 1."""
        if size_bytes <= 0:
            raise InvalidArgument(
                f"Received size_bytes={size_bytes}, expected the exact size of the `.keras` file.",
                reason="INVALID_SIZE",
                field="header.size_bytes",
            )
        if size_bytes > self.max_upload_bytes:
            raise ResourceExhausted(
                f"The upload of {size_bytes} bytes exceeds the server's limit of "
                f"{self.max_upload_bytes} bytes (--max-upload-mb).",
                reason="UPLOAD_TOO_LARGE",
                field="header.size_bytes",
            )
        model_id = self._reserve(model_id, "header.model_id")
        path = self.store.tmp_dir / f"upload-{model_id}-{uuid.uuid4().hex}.keras"
        try:
            await self._receive_upload(path, size_bytes, chunks)
        except BaseException:
            path.unlink(missing_ok=True)
            self._release(model_id)
            raise
        device = self.devices.choose(self.resident_bytes())

        def load() -> ResidentModel:
            try:
                model = architecture.load_upload(path, device=device, field="chunk")
                kind = type(model).__name__
                return self._commit_new(model_id, model, device, kind, "upload", "upload", message, author)
            finally:
                path.unlink(missing_ok=True)

        return (await self._run_reserved(model_id, load)).describe()

    async def _receive_upload(self, path: Path, size_bytes: int, chunks: AsyncIterator[bytes]) -> None:
        received = 0
        with open(path, "wb") as handle:
            async for chunk in chunks:
                received += len(chunk)
                if received > size_bytes:
                    raise InvalidArgument(
                        f"Received more than the {size_bytes} bytes announced in the header.",
                        reason="UPLOAD_SIZE_MISMATCH",
                        field="chunk",
                    )
                await self.run(handle.write, chunk)
        if received != size_bytes:
            raise InvalidArgument(
                f"The upload is truncated: received {received} of {size_bytes} bytes.",
                reason="UPLOAD_TRUNCATED",
                field="chunk",
            )

    def create_from_values(
        self, model_id: str, config_json: str, values: dict[str, np.ndarray], *, message: str, author: str
    ) -> ModelInfo:
        """A new model from a config and values (a job's output); blocking."""
        model_id = self._reserve(model_id, "spec.output_model_id")
        try:
            device = self.devices.choose(self.resident_bytes())
            model = architecture.rebuild(config_json, device=device)
            for entry, variable in model_variables(model):
                variable.assign(values[entry.path])
            return self._commit_new(
                model_id, model, device, type(model).__name__, "job", "create", message, author
            ).describe()
        finally:
            self._release(model_id)

    def _commit_new(
        self,
        model_id: str,
        keras_model: Any,
        device: str,
        architecture_name: str,
        source: str,
        kind: str,
        message: str,
        author: str,
    ) -> ResidentModel:
        """Write revision 1 durably, then make the model resident."""
        entries = model_variables(keras_model)
        folder, staged = self.store.stage_model()
        try:
            records = tuple(staged.add_tensor(entry, np.asarray(v.numpy())) for entry, v in entries)
            manifest = Manifest(layer_count=len(keras_model.layers), variables=records)
            now = utc_now()
            revision = RevisionRecord(
                model_id=model_id,
                revision=1,
                create_time=now,
                author=author,
                message=message,
                kind=kind,
                summary=f"{kind} {architecture_name}: {len(records)} variables, "
                f"{sum(r.nbytes for r in records)} bytes",
                architecture_changed=True,
                architecture_revision=1,
                stored_bytes=staged.stored_bytes,
                changed_variables=[r.path for r in records],
            )
            committed = staged.commit(revision, manifest, keras_model.to_json())
            record = ModelRecord(model_id, architecture_name, source, now)
            self.store.commit_model(folder, record)
        except BaseException:
            if not (self.store.model_dir(model_id) / "model.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                raise
            # Renamed into place before the failure: the model exists on disk, so
            # it must exist in memory too; then report the failure.
            self._register(
                record,
                device,
                ModelState(revision, committed, keras_model, {entry.path: v for entry, v in entries}),
            )
            raise
        resident = self._register(
            record,
            device,
            ModelState(revision, committed, keras_model, {entry.path: v for entry, v in entries}),
        )
        log.info("created model %s (%s) on %s", model_id, architecture_name, device)
        return resident

    def _register(self, record: ModelRecord, device: str, state: ModelState) -> ResidentModel:
        resident = ResidentModel(record, device, state)
        with self._lock:
            self._models[record.model_id] = resident
        return resident

    async def delete(self, model_id: str) -> None:
        resident = self.get(model_id)

        def remove() -> None:
            with resident.commit_lock:
                resident.check_not_busy()
                resident.deleted = True
                with self._lock:
                    if self._models.get(model_id) is not resident:
                        raise NotFound(
                            f"No model with id {model_id!r}.", reason="MODEL_NOT_FOUND", field="model_id"
                        )
                    del self._models[model_id]
                self.store.delete_model(model_id)

        await self.run(remove)
        log.info("deleted model %s", model_id)

    # --- committing revisions ----------------------------------------------------

    def commit_revision(
        self,
        resident: ResidentModel,
        staged: StagedRevision,
        *,
        expected_revision: int | None,
        prepare: Callable[[ModelState, int], Prepared],
        field_prefix: str = "",
        job_id: str | None = None,
    ) -> RevisionRecord:
        """Commit one new revision of a resident model, or nothing at all.

        Under the model's commit lock: check it still exists and is at the
        expected revision, let `prepare` build the revision from the current
        state, rename it into place (the point of no return), then install
        it. Any failure before the rename discards the staging folder; after
        it, memory is brought in step with disk before the failure is reported.
        """
        with resident.commit_lock:
            try:
                if resident.deleted:
                    raise NotFound(
                        f"Model {resident.model_id!r} was deleted while the change was in progress.",
                        reason="MODEL_NOT_FOUND",
                        field=f"{field_prefix}model_id",
                    )
                resident.check_not_busy(f"{field_prefix}model_id", job_id)
                check_expected_revision(resident, expected_revision, f"{field_prefix}expected_revision")
                number = resident.revision + 1
                prepared = prepare(resident.state, number)
                committed = staged.commit(prepared.record, prepared.manifest, prepared.architecture_json)
            except BaseException:
                if not staged.renamed:
                    staged.discard()
                    raise
                log.exception(
                    "model %s: revision %d committed, then a step failed", resident.model_id, number
                )
                self._reload(resident, number)
                raise
            try:
                resident.install(prepared, committed)
            except Exception:
                log.exception(
                    "model %s: installing revision %d failed; reloading it", resident.model_id, number
                )
                self._reload(resident, number)
            if self.retain_revisions:
                try:
                    self.store.retain(resident.model_id, self.retain_revisions)
                except OSError:
                    log.exception("model %s: dropping old revisions failed", resident.model_id)
        log.info("model %s: revision %d, %s", resident.model_id, number, prepared.record.summary)
        return prepared.record

    def _reload(self, resident: ResidentModel, revision: int) -> None:
        """Rebuild a model's state from the store at `revision` (after a failed install)."""
        keras_model, manifest, record = self.materialize(resident.model_id, revision, resident.device)
        variables = {entry.path: v for entry, v in model_variables(keras_model)}
        with resident.lock.write():
            resident.state = ModelState(record, manifest, keras_model, variables)

    # --- reading -------------------------------------------------------------

    def revision_state(
        self, resident: ResidentModel, revision: int, field: str = "revision"
    ) -> tuple[int, Manifest]:
        """The number and manifest of `revision` (0: current) of a model."""
        state = resident.state
        if revision == 0 or revision == state.revision.revision:
            return state.revision.revision, state.manifest
        if revision < 0 or not self.store.has_revision(resident.model_id, revision):
            raise NotFound(
                f"Model {resident.model_id!r} has no revision {revision}; it is at revision "
                f"{state.revision.revision}. ListRevisions shows the retained ones.",
                reason="REVISION_NOT_FOUND",
                field=field,
                metadata={"model_id": resident.model_id, "revision": str(revision)},
            )
        return revision, self.store.read_manifest(resident.model_id, revision)

    def revision_reader(
        self, model_id: str, revision: int, *, field: str
    ) -> tuple[dict[str, VariableRecord], Callable[[VariableRecord], np.ndarray]]:
        """Another model's variables at a revision (0: current), read from the store.

        Reads committed files only, so the values are those of exactly that
        revision whatever commits meanwhile; takes no lock.
        """
        resident = self.get(model_id, field=field)
        _, manifest = self.revision_state(resident, revision, field=field)
        return manifest.by_path(), lambda record: self.store.load_tensor(model_id, record)

    async def read_weights(
        self, model_id: str, selector: Selector, revision: int
    ) -> tuple[int, list[tuple[str, np.ndarray]]]:
        """The selected variables of a revision, as read-only arrays.

        The current revision comes from the resident variables (copy-on-write
        snapshots: no copy on the CPU), older ones from the store's files.
        """
        resident = self.get(model_id)
        number, manifest = self.revision_state(resident, revision)
        paths = set(
            select(selector, [v.entry for v in manifest.variables], manifest.layer_count, field="selector")
        )
        chosen = [v for v in manifest.variables if v.path in paths]

        def load() -> tuple[int, list[tuple[str, np.ndarray]]]:
            with resident.lock.read():
                state = resident.state
                if state.revision.revision == number:
                    return number, [(v.path, snapshot(state.variables[v.path])) for v in chosen]
            return number, [(v.path, self.store.load_tensor(model_id, v)) for v in chosen]

        return await self.run(load)

    async def predict(
        self, model_id: str, inputs: Sequence[tuple[str, np.ndarray]], output_layers: Sequence[str]
    ) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]], int]:
        resident = self.get(model_id)
        return await self.run(resident.predict, inputs, output_layers)

    async def export(self, model_id: str, revision: int, file_format: str) -> tuple[Path, int]:
        """Write a revision as a `.keras` file or a SavedModel tar; returns (path, revision)."""
        from weightsmith_server import export

        resident = self.get(model_id)
        number, _ = self.revision_state(resident, revision)

        def write() -> Path:
            # From the store, on the CPU: no lock held while saving, so Predict
            # and commits go on, and any retained revision exports the same way.
            target = self.store.tmp_dir / f"export-{model_id}-{number}-{uuid.uuid4().hex}"
            keras_model, _, _ = self.materialize(model_id, number, "/device:CPU:0")
            return export.write_model(keras_model, target, file_format)

        return await self.run(write), number

    async def export_chunks(
        self, model_id: str, revision: int, file_format: str, chunk_bytes: int
    ) -> AsyncIterator[tuple[bytes, int, int]]:
        """The exported file as `(chunk, total size, revision)`, removed afterwards."""
        path, number = await self.export(model_id, revision, file_format)
        try:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                while chunk := await self.run(handle.read, chunk_bytes):
                    yield chunk, size, number
        finally:
            path.unlink(missing_ok=True)

    def list_revisions(self, model_id: str, size: int, token: str) -> tuple[list[RevisionRecord], str]:
        self.get(model_id)
        size = page_size(size)
        numbers = sorted(self.store.revision_numbers(model_id), reverse=True)
        if token:
            before = decode_number_token(token)
            numbers = [n for n in numbers if n < before]
        page = numbers[:size]
        next_token = encode_page_token(str(page[-1])) if len(numbers) > size else ""
        return [self.store.read_revision(model_id, n) for n in page], next_token

    def get_revision(self, model_id: str, revision: int) -> RevisionRecord:
        resident = self.get(model_id)
        require_revision_number(revision, "revision")
        number, _ = self.revision_state(resident, revision)
        return self.store.read_revision(model_id, number)
