"""ModelService operations: the lifecycle of models, Predict, export, server info, Evaluate."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from weightsmith_server import __version__, access
from weightsmith_server.datasets import DatasetSplit, DatasetStore
from weightsmith_server.devices import DeviceInfo
from weightsmith_server.jobs.evaluation import Evaluation, evaluate
from weightsmith_server.limits import InputLimits
from weightsmith_server.models import architecture, creation, inference
from weightsmith_server.models.batching import Batcher, BatchingPolicy
from weightsmith_server.models.description import ModelInfo
from weightsmith_server.models.export import ExportFormat, write_model
from weightsmith_server.models.host import ModelHost
from weightsmith_server.models.resident import ResidentModel
from weightsmith_server.models.serving import BatchingOverrides, ServingSettings, validate
from weightsmith_server.resources import check_upload_size, claim, receive_file, remove_later
from weightsmith_server.workers import Blocking


@dataclass(frozen=True)
class ServerLimits:
    """The limits a client must respect, as GetServerInfo reports them."""

    max_message_bytes: int
    max_upload_bytes: int
    chunk_bytes: int
    max_decompressed_bytes: int = 0
    max_member_bytes: int = 0
    max_config_bytes: int = 0
    max_image_pixels: int = 0
    max_string_bytes: int = 0
    stream_idle_seconds: float = 0.0
    stream_deadline_seconds: float = 0.0
    max_write_streams: int = 0
    max_staging_bytes: int = 0
    max_error_bytes: int = 0
    # Dynamic batching of Predict (models/batching.py): the server's default policy.
    batch_max_size: int = 32
    batch_wait_ms: float = 5.0


@dataclass(frozen=True)
class SecuritySettings:
    """How the server authenticates: a principals file, TLS, client certificates."""

    authentication: bool = False
    tls: bool = False
    client_certificates: bool = False


@dataclass(frozen=True)
class SecurityInfo:
    """GetServerInfo's `security`: the server's settings and the caller's own identity."""

    settings: SecuritySettings
    principal: str
    scopes: list[str]
    model_patterns: list[str]


@dataclass(frozen=True)
class DeviceUsage:
    """One device, its memory and the models placed on it."""

    device: DeviceInfo
    memory_used_bytes: int
    memory_total_bytes: int
    model_ids: list[str]
    memory_budget_bytes: int = 0
    resident_bytes: int = 0


@dataclass(frozen=True)
class ServerInfo:
    """What GetServerInfo reports."""

    version: str
    tensorflow_version: str
    keras_version: str
    devices: list[DeviceUsage]
    limits: ServerLimits
    catalog_architectures: list[str]
    security: SecurityInfo | None = None


@dataclass(frozen=True)
class Prediction:
    """Predict's answer: named outputs, requested layer outputs, the revision that ran."""

    outputs: list[tuple[str, np.ndarray]]
    layer_outputs: list[tuple[str, np.ndarray]]
    revision: int


class ModelOperations:
    """Create, upload, inspect, export, delete and run models, through the model host."""

    def __init__(
        self,
        host: ModelHost,
        datasets: DatasetStore,
        blocking: Blocking,
        limits: ServerLimits,
        inputs: InputLimits | None = None,
        security: SecuritySettings | None = None,
    ) -> None:
        self._host = host
        self._datasets = datasets
        self._blocking = blocking
        self._limits = limits
        self._inputs = inputs or InputLimits()
        self._security = security or SecuritySettings()
        self._batcher: Batcher[Prediction] = Batcher(self._predict_batch)
        # Each model's own batching fields (models/serving.py); the flags give the defaults.
        self._serving = ServingSettings(host.store.model_dir)
        self._default_batching = BatchingPolicy(limits.batch_max_size, limits.batch_wait_ms)

    @property
    def batcher(self) -> Batcher[Prediction]:
        """The Predict batcher (its `batches` and `calls` counters show how calls were grouped)."""
        return self._batcher

    def _with_batching(self, info: ModelInfo) -> ModelInfo:
        """The description with the batching policy in effect (reads the model's settings once)."""
        return replace(info, batching=self._serving.get(info.model_id).effective(self._default_batching))

    def _create_with(
        self, batching: BatchingOverrides | None, create: Callable[[Mapping[str, Any]], ModelInfo]
    ) -> ModelInfo:
        """Create with the model's batching settings in its folder, committed with revision 1."""
        info = create(self._serving.files(batching))
        self._serving.remember(info.model_id, batching)
        return self._with_batching(info)

    async def create(
        self,
        model_id: str,
        source: architecture.CatalogSpec | str,
        *,
        seed: int | None,
        message: str,
        author: str,
        batching: BatchingOverrides | None = None,
    ) -> ModelInfo:
        """A new model at revision 1, from a catalog architecture or a Keras config JSON."""
        model_id = access.require_creatable(model_id)
        if batching is not None:
            validate(batching)
        create = functools.partial(self._create, model_id, source, seed, message, author)
        return await self._blocking(self._create_with, batching, create)

    def _create(
        self,
        model_id: str,
        source: architecture.CatalogSpec | str,
        seed: int | None,
        message: str,
        author: str,
        files: Mapping[str, Any],
    ) -> ModelInfo:
        if isinstance(source, architecture.CatalogSpec):
            weights = (
                creation.import_path(self._host.store, source.weights_file) if source.weights_file else None
            )
            new = creation.from_catalog(
                source, seed=seed, weights_path=weights, message=message, author=author
            )
        else:
            new = creation.from_config(source, seed=seed, message=message, author=author, limits=self._inputs)
        # The id is reserved on this worker too: a call cancelled before it starts holds nothing.
        return self._host.create(model_id, replace(new, files=files))

    async def upload(
        self,
        model_id: str,
        size_bytes: int,
        chunks: AsyncIterator[bytes],
        *,
        message: str,
        author: str,
        batching: BatchingOverrides | None = None,
    ) -> ModelInfo:
        """Receive a `.keras` file, check it, load it safely and commit revision 1."""
        if batching is not None:
            validate(batching, "header.batching")
        check_upload_size(
            size_bytes, self._limits.max_upload_bytes, field="header.size_bytes", what="`.keras` file"
        )
        model_id = access.require_creatable(model_id, "header.model_id")
        # Released even when the call is cancelled while the reservation runs.
        model_id = await claim(
            self._blocking.executor,
            functools.partial(self._host.reserve, model_id, "header.model_id"),
            self._host.release,
        )
        path = self._host.store.tmp_dir / f"upload-{model_id}-{uuid.uuid4().hex}.keras"
        try:
            await receive_file(path, size_bytes, chunks, self._blocking.executor)
        except BaseException:
            self._host.release(model_id)
            raise
        new = creation.from_upload(path, message=message, author=author, limits=self._inputs)

        def done() -> None:
            self._host.release(model_id)
            remove_later(self._blocking.executor, path)  # the build removes it; this is for one never run

        # Released when the worker is done, or at once if the call is cancelled before it starts.
        def create(files: Mapping[str, Any]) -> ModelInfo:
            return self._host.create(model_id, replace(new, files=files), reserved=True)

        return await self._blocking.then(done, self._create_with, batching, create)

    async def get(self, model_id: str) -> ModelInfo:
        access.require_model(model_id)
        return await self._blocking(lambda: self._with_batching(self._host.describe(model_id)))

    async def list(self, page_size: int, page_token: str) -> tuple[list[ModelInfo], str]:
        """One page of the models the caller may see (filtered before paging: pages stay full)."""

        def page(may_see: Callable[[str], bool]) -> tuple[list[ModelInfo], str]:
            infos, token = self._host.list(page_size, page_token, may_see)
            return [self._with_batching(info) for info in infos], token

        return await self._blocking(page, access.current().may_see)

    async def update(
        self, model_id: str, batching: BatchingOverrides, fields: tuple[str, ...] | None
    ) -> ModelInfo:
        """Change the model's batching settings (`fields`, or those set in `batching` for None), durably.

        Not a revision: the weights, the revision number and `update_time` stay as they are.
        """
        access.require_model(model_id)
        validate(batching)

        def run() -> ModelInfo:
            info = self._host.describe(model_id)  # NOT_FOUND for an unknown model
            self._serving.update(model_id, batching, fields)
            return self._with_batching(info)

        return await self._blocking(run)

    async def delete(self, model_id: str) -> None:
        access.require_model(model_id)

        def run() -> None:
            try:
                self._host.delete(model_id)
            finally:
                self._serving.forget(model_id)  # the file went with the folder

        await self._blocking(run)

    async def export(
        self, model_id: str, revision: int, file_format: ExportFormat
    ) -> AsyncIterator[tuple[bytes, int, int]]:
        """The exported file as `(chunk, total size, revision)`; the file is removed afterwards."""
        access.require_model(model_id)
        path, number = await self._blocking(self._write_export, model_id, revision, file_format)
        handle = None
        try:
            size = (await self._blocking(path.stat)).st_size
            handle = await self._blocking(open, path, "rb")
            while chunk := await self._blocking(handle.read, self._limits.chunk_bytes):
                yield chunk, size, number
        finally:
            # Not awaited: a cancelled call must still clean up, and never on the event loop.
            self._blocking.executor.submit(_discard, path, handle)

    def _write_export(self, model_id: str, revision: int, file_format: ExportFormat) -> tuple[Path, int]:
        number, _ = self._host.revision(model_id, revision)
        # From the store, on the CPU: no lock held while saving, so Predict and
        # commits go on, and any retained revision exports the same way.
        target = self._host.store.tmp_dir / f"export-{model_id}-{number}-{uuid.uuid4().hex}"
        state = self._host.materialize(model_id, number, "/device:CPU:0")
        return write_model(state.keras_model, target, file_format), number

    async def predict(
        self, model_id: str, inputs: Sequence[tuple[str, np.ndarray]], output_layers: Sequence[str]
    ) -> Prediction:
        """Run the model on the caller's rows, batched with concurrent callers of the same signature."""
        access.require_model(model_id)
        own = self._serving.cached(model_id)
        if own is None:  # first Predict since start-up: read the model's settings off the event loop
            own = await self._blocking(self._serving.get, model_id)
        return await self._batcher.submit(
            model_id, inputs, output_layers, own.effective(self._default_batching)
        )

    async def _predict_batch(
        self, model_id: str, requests: list[Sequence[tuple[str, np.ndarray]]], output_layers: tuple[str, ...]
    ) -> list[Prediction | Exception]:
        """One batch of callers' inputs, in one hop to the worker pool; each its result or its error."""

        def run(resident: ResidentModel) -> list[Prediction | Exception]:
            return [
                o if isinstance(o, Exception) else Prediction(o.outputs, o.layer_outputs, o.revision)
                for o in inference.predict_many(resident, requests, output_layers)
            ]

        return await self._blocking(self._host.run, model_id, run)

    async def server_info(self) -> ServerInfo:
        """The server's versions, devices (with the models the caller may see), limits and security."""
        return await self._blocking(self._server_info, access.current())

    def _server_info(self, caller: access.Caller) -> ServerInfo:
        import keras
        import tensorflow as tf

        devices = self._host.devices
        placed = self._host.placements()
        budgets = self._host.memory_budgets()
        resident = self._host.resident_bytes()
        described = []
        for device in devices.devices:
            used, total = devices.memory(device)
            visible = [m for m in placed.get(device.name, []) if caller.may_see(m)]
            described.append(
                DeviceUsage(
                    device,
                    used,
                    total,
                    visible,
                    memory_budget_bytes=budgets.get(device.name, 0),
                    resident_bytes=resident.get(device.name, 0),
                )
            )
        return ServerInfo(
            version=__version__,
            tensorflow_version=tf.__version__,
            keras_version=keras.__version__,
            devices=described,
            limits=self._limits,
            catalog_architectures=architecture.catalog_names(),
            security=SecurityInfo(
                self._security, caller.owner, sorted(caller.scopes), list(caller.model_patterns)
            ),
        )

    async def evaluate(
        self,
        model_id: str,
        dataset_id: str,
        *,
        revision: int,
        loss: str,
        metrics: tuple[str, ...],
        batch_size: int,
        split: DatasetSplit,
        rescale: float | None,
    ) -> Evaluation:
        caller = access.current()
        access.require_model(model_id, caller=caller)
        if caller.authenticated:  # the dataset must be the caller's own
            access.require_dataset_owner(dataset_id, self._datasets.get(dataset_id).owner, caller=caller)
        return await self._blocking(
            evaluate,
            self._host,
            self._datasets,
            model_id,
            dataset_id,
            revision=revision,
            loss=loss,
            metrics=metrics,
            batch_size=batch_size,
            split=split,
            rescale=rescale,
        )


def _discard(path: Path, handle: BinaryIO | None) -> None:
    if handle is not None:
        handle.close()
    path.unlink(missing_ok=True)
