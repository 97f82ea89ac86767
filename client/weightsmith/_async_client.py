"""The asyncio client: `AsyncClient`, the twin of `Client` on `grpc.aio`.

Same methods, same keyword-only options, as coroutines (and async iterators
for `iter_*`). Everything that does no I/O lives in `_base._BaseClient`.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from weightsmith._base import (
    COPIER,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_RECONNECTS,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    DEFAULT_UPLOAD_CHUNK_BYTES,
    READ_WEIGHTS_METHOD,
    TERMINAL_JOB_STATES,
    WRITE_WEIGHTS_METHOD,
    ChannelOptions,
    DatasetSourceLike,
    ExportReceiver,
    FeatureSpecLike,
    JobWatch,
    PredictInputs,
    SelectorLike,
    WeightsReader,
    _BaseClient,
    cancel_on_error,
    parse_read_weights_response,
    partial_path,
    serialize_write_weights_request,
)
from weightsmith._types import PredictResult
from weightsmith.errors import translate_errors
from weightsmith.v1 import (
    edits_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    training_service_pb2,
    training_service_pb2_grpc,
    weight_service_pb2,
    weight_service_pb2_grpc,
)


@dataclass(frozen=True)
class _Connection:
    """The aio channel and the callables built on it."""

    channel: grpc.aio.Channel
    models: model_service_pb2_grpc.ModelServiceStub
    weights: weight_service_pb2_grpc.WeightServiceStub
    training: training_service_pb2_grpc.TrainingServiceStub
    read_weights: grpc.aio.UnaryStreamMultiCallable
    write_weights: grpc.aio.StreamUnaryMultiCallable


class AsyncClient(_BaseClient):
    """An asyncio client of a weightsmith server.

    The twin of `Client`: the same methods and options, awaited. The channel
    opens on the first call, so an `AsyncClient` may be created outside the
    event loop that uses it; use it with `async with` or `await close()`.
    Every failure raises a `weightsmith.WeightsmithError` subclass, one per
    gRPC status code.

    Reads (`get_model`, `list_models`, `predict`, `evaluate`,
    `server_info`, `read_weights`, `list_revisions`, `get_revision`,
    `diff_revisions`, `get_dataset`, `list_datasets`, `get_job`,
    `list_jobs`, `list_job_events`) are retried on UNAVAILABLE with
    exponential backoff; mutations (including `apply_edits`, `revert_model`,
    `create_job` and `cancel_job`) are never retried. `watch_job`
    reconnects by itself from the last event it saw.

    Args:
        target: The server address, `host:port` or any gRPC target URI.
        timeout: Deadline in seconds of each unary call; None for none.
        stream_timeout: Deadline in seconds of each streaming call (uploads,
            exports, weight reads and writes, job watches); None (the
            default) for none.
        author: Recorded as the author of every revision this client
            commits (the `weightsmith-author` metadata); defaults to
            `user@hostname`. Printable ASCII.
        max_message_bytes: Largest message sent or received, in bytes.
        credentials: TLS credentials (`grpc.ssl_channel_credentials()`);
            None for a plaintext channel.
        options: Extra gRPC channel options as `(key, value)` pairs; they
            override the client's own.

    Example:

    ```python
    import asyncio
    import weightsmith

    async def main() -> None:
        async with weightsmith.AsyncClient("127.0.0.1:50051") as client:
            weights = await client.read_weights("mnv2", "*/kernel")
            print(len(weights))

    asyncio.run(main())
    ```
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        stream_timeout: float | None = None,
        author: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            stream_timeout=stream_timeout,
            author=author,
            max_message_bytes=max_message_bytes,
            credentials=credentials,
            options=options,
        )
        self._connection: _Connection | None = None
        self._closed = False

    def _connect(self) -> _Connection:
        # A grpc.aio channel binds to the running loop when created, hence lazily.
        if self._closed:
            raise RuntimeError(
                "Received a call on a closed AsyncClient, expected an open one; create a new AsyncClient."
            )
        if self._connection is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(self._target, options=self._channel_options)
            else:
                channel = grpc.aio.secure_channel(
                    self._target, self._credentials, options=self._channel_options
                )
            self._connection = _Connection(
                channel=channel,
                models=model_service_pb2_grpc.ModelServiceStub(channel),
                weights=weight_service_pb2_grpc.WeightServiceStub(channel),
                training=training_service_pb2_grpc.TrainingServiceStub(channel),
                read_weights=channel.unary_stream(
                    READ_WEIGHTS_METHOD,
                    request_serializer=weight_service_pb2.ReadWeightsRequest.SerializeToString,
                    response_deserializer=parse_read_weights_response,
                ),
                write_weights=channel.stream_unary(
                    WRITE_WEIGHTS_METHOD,
                    request_serializer=serialize_write_weights_request,
                    response_deserializer=weight_service_pb2.WriteWeightsResponse.FromString,
                ),
            )
        return self._connection

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._closed = True
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # --- models ---------------------------------------------------------------

    async def create_model(
        self,
        model_id: str = "",
        *,
        architecture: str | None = None,
        include_top: bool | None = None,
        input_shape: Sequence[int] | None = None,
        classes: int = 0,
        pooling: str | None = None,
        weights_file: str = "",
        classifier_activation: str = "",
        keras_config: str | Mapping[str, Any] | None = None,
        seed: int | None = None,
        message: str = "",
    ) -> model_pb2.Model:
        """Create a model and commit it as revision 1.

        Give exactly one of `architecture` (a `keras.applications` constructor
        name, built without downloading weights) or `keras_config` (the JSON
        of `model.to_json()`, or its dict; builtin layers only). The other
        options apply to `architecture` only.

        Args:
            model_id: The new id, matching `[a-z0-9][a-z0-9-]{0,62}`; the
                server picks one when empty.
            architecture: A catalog name such as `"ResNet50"`.
            include_top: Whether to keep the classifier on top; the
                architecture's default (True) when None.
            input_shape: Input shape without the batch dimension.
            classes: Number of classes of the top classifier; 0 for the default.
            pooling: `"avg"` or `"max"` global pooling without the top.
            weights_file: A weights file under the server store's `imports/`.
            classifier_activation: Activation of the top layer, e.g. `"linear"`.
            keras_config: A Keras model config, as a JSON string or a dict.
            seed: Initialization seed; the same seed gives identical weights.
            message: Recorded on revision 1.

        Returns:
            The created `Model`.

        Example:

        ```python
        model = await client.create_model("tiny", architecture="MobileNetV3Small",
                                          input_shape=[64, 64, 3], classes=5, seed=1)
        ```
        """
        request = self._create_model_request(
            model_id,
            architecture=architecture,
            include_top=include_top,
            input_shape=input_shape,
            classes=classes,
            pooling=pooling,
            weights_file=weights_file,
            classifier_activation=classifier_activation,
            keras_config=keras_config,
            seed=seed,
            message=message,
        )
        with translate_errors():
            response = await self._connect().models.CreateModel(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.model

    async def upload_model(
        self,
        source: str | os.PathLike[str] | bytes,
        model_id: str = "",
        *,
        message: str = "",
        chunk_size_bytes: int = DEFAULT_UPLOAD_CHUNK_BYTES,
    ) -> model_pb2.Model:
        """Upload a `.keras` file as a new model at revision 1.

        The server loads it in Keras safe mode; a file that would run code is
        refused with `InvalidArgumentError`. The file is read off the event
        loop, in a worker thread.

        Args:
            source: The file's path, or its bytes.
            model_id: The new id; the server picks one when empty.
            message: Recorded on revision 1.
            chunk_size_bytes: Bytes per streamed message.

        Returns:
            The uploaded `Model`.

        Example:

        ```python
        model = await client.upload_model("classifier.keras", "classifier")
        ```
        """
        upload = self._upload_source(source)
        chunk_size = self._upload_chunk_size(chunk_size_bytes)
        header = self._upload_header(model_id, upload, message)

        async def requests() -> AsyncIterator[model_service_pb2.UploadModelRequest]:
            yield header
            if upload.path is None:
                for request in self._upload_data_messages(upload.data, chunk_size):
                    yield request
                return
            file = await asyncio.to_thread(upload.path.open, "rb")
            try:
                while block := await asyncio.to_thread(file.read, chunk_size):
                    yield model_service_pb2.UploadModelRequest(chunk=block)
            finally:
                file.close()

        with translate_errors():
            response = await self._connect().models.UploadModel(
                requests(), timeout=self._stream_timeout, metadata=self._metadata
            )
        return response.model

    async def get_model(self, model_id: str) -> model_pb2.Model:
        """Return a model's description: revision, layers, variables, device.

        Args:
            model_id: The model's id.

        Returns:
            The `Model`.
        """
        request = model_service_pb2.GetModelRequest(model_id=model_id)
        with translate_errors():
            response = await self._connect().models.GetModel(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.model

    async def list_models(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> model_service_pb2.ListModelsResponse:
        """Return one page of models, ordered by id.

        Args:
            page_size: Most models to return, 1 to 1000; 0 for the server's 100.
            page_token: `next_page_token` of the previous page; "" for the first.

        Returns:
            The page: `models` and `next_page_token` ("" on the last page).
        """
        request = model_service_pb2.ListModelsRequest(page_size=page_size, page_token=page_token)
        with translate_errors():
            return await self._connect().models.ListModels(
                request, timeout=self._timeout, metadata=self._metadata
            )

    async def iter_models(self, *, page_size: int = 0) -> AsyncIterator[model_pb2.Model]:
        """Yield every model, ordered by id, fetching pages as needed.

        Args:
            page_size: Models per page; 0 for the server's default.

        Returns:
            An async iterator of `Model`s.

        Example:

        ```python
        ids = [model.model_id async for model in client.iter_models()]
        ```
        """
        page_token = ""
        while True:
            page = await self.list_models(page_size=page_size, page_token=page_token)
            for model in page.models:
                yield model
            page_token = page.next_page_token
            if not page_token:
                return

    async def delete_model(self, model_id: str) -> None:
        """Delete a model and its whole history.

        Args:
            model_id: The model's id.
        """
        request = model_service_pb2.DeleteModelRequest(model_id=model_id)
        with translate_errors():
            await self._connect().models.DeleteModel(request, timeout=self._timeout, metadata=self._metadata)

    async def export_model(
        self,
        model_id: str,
        *,
        revision: int = 0,
        format: str = "keras",
        path: str | os.PathLike[str] | None = None,
    ) -> bytes | pathlib.Path:
        """Download a model as a `.keras` file or a SavedModel tar archive.

        With `path`, the file is written (off the event loop) next to it under
        a temporary name and renamed into place once every byte arrived, so
        `path` never holds a partial export.

        Args:
            model_id: The model's id.
            revision: The revision to export; 0 for the current one.
            format: `"keras"` or `"saved_model"`.
            path: Where to write the file; None to return its bytes.

        Returns:
            The file's bytes, or `path` as a `pathlib.Path`.

        Example:

        ```python
        await client.export_model("tiny", path="tiny.keras")
        ```
        """
        request = self._export_request(model_id, revision, format)
        receiver = ExportReceiver()
        with translate_errors():
            call = self._connect().models.ExportModel(
                request, timeout=self._stream_timeout, metadata=self._metadata
            )
            with cancel_on_error(call):
                if path is None:
                    parts = [receiver.add(response) async for response in call]
                    receiver.finish()
                    return b"".join(parts)
                destination = pathlib.Path(path)
                partial = partial_path(destination)
                try:
                    file = await asyncio.to_thread(partial.open, "wb")
                    try:
                        async for response in call:
                            await asyncio.to_thread(file.write, receiver.add(response))
                    finally:
                        await asyncio.to_thread(file.close)
                    receiver.finish()
                    await asyncio.to_thread(os.replace, partial, destination)
                finally:
                    await asyncio.to_thread(partial.unlink, missing_ok=True)
                return destination

    async def predict(
        self,
        model_id: str,
        inputs: PredictInputs,
        *,
        output_layers: Sequence[str] = (),
    ) -> PredictResult:
        """Run the model on a batch, from its last committed revision.

        Args:
            model_id: The model's id.
            inputs: One array per model input, batch dimension first: an
                array (single-input models), a list or tuple in positional
                order, or a dict keyed by input name. Dtypes must match the
                model's inputs (usually float32: mind that `np.asarray` of
                Python floats gives float64).
            output_layers: Names of layers whose outputs to return as well.

        Returns:
            A `PredictResult` with `outputs`, `layer_outputs` and `revision`.

        Example:

        ```python
        batch = np.zeros((2, 64, 64, 3), np.float32)
        probabilities = (await client.predict("tiny", batch)).output
        ```
        """
        request = self._predict_request(model_id, inputs, output_layers)
        with translate_errors():
            response = await self._connect().models.Predict(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return self._predict_result(response)

    async def evaluate(
        self,
        model_id: str,
        dataset_id: str,
        *,
        loss: str,
        metrics: Sequence[str] = (),
        batch_size: int = 0,
        revision: int = 0,
        split: str = "train",
        rescale: float | None = None,
    ) -> model_service_pb2.EvaluateResponse:
        """Compute a model's loss and metrics over a dataset, without training.

        Args:
            model_id: The model's id.
            dataset_id: The dataset's id.
            loss: A Keras loss name, for example `"sparse_categorical_crossentropy"`.
            metrics: Keras metric names, for example `["accuracy"]`.
            batch_size: Batch size; 0 for the server's 32.
            revision: The revision to evaluate; 0 for the current one.
            split: `"train"` or `"validation"` (the validation examples the
                dataset carries).
            rescale: Multiply inputs by this factor first, as a job's
                preprocessing would (for example `1 / 255`); None for none.

        Returns:
            The `EvaluateResponse`: `loss`, `metrics`, `example_count` and
            the `revision` evaluated.

        Example:

        ```python
        result = await client.evaluate("tiny", "toy", loss="sparse_categorical_crossentropy",
                                       metrics=["accuracy"], split="validation")
        print(result.loss, result.metrics["accuracy"])
        ```
        """
        request = self._evaluate_request(
            model_id,
            dataset_id,
            loss=loss,
            metrics=metrics,
            batch_size=batch_size,
            revision=revision,
            split=split,
            rescale=rescale,
        )
        with translate_errors():
            return await self._connect().models.Evaluate(
                request, timeout=self._timeout, metadata=self._metadata
            )

    async def server_info(self) -> model_service_pb2.GetServerInfoResponse:
        """Return the server's versions, devices, limits and catalog names."""
        request = model_service_pb2.GetServerInfoRequest()
        with translate_errors():
            return await self._connect().models.GetServerInfo(
                request, timeout=self._timeout, metadata=self._metadata
            )

    # --- weights --------------------------------------------------------------

    async def read_weights(
        self,
        model_id: str,
        selector: SelectorLike | None = None,
        *,
        revision: int = 0,
        chunk_size_bytes: int = 0,
        out: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Read variables of a model.

        Args:
            model_id: The model's id.
            selector: Which variables: a `Selector`, a glob over variable
                paths (`"dense*/kernel"`), or a list of globs; all when None.
            revision: The revision to read; 0 for the current one.
            chunk_size_bytes: Streamed chunk size, 65536 to 4194304; 0 for
                the server's default.
            out: Arrays to fill in place, keyed by path (for example the
                result of an earlier read): repeated reads then reuse their
                memory instead of allocating. Each must match the variable's
                shape and dtype (`ValueError` otherwise); other variables get
                new arrays.

        Returns:
            Arrays keyed by variable path, in the model's order.

        Example:

        ```python
        weights = await client.read_weights("tiny", weightsmith.Selector(layers=["predictions"]))
        kernel = weights["predictions/kernel"]
        ```
        """
        request = self._read_weights_request(model_id, selector, revision, chunk_size_bytes)
        reader = WeightsReader(out)
        with translate_errors():
            call = self._connect().read_weights(
                request, timeout=self._stream_timeout, metadata=self._metadata
            )
            with cancel_on_error(call):
                async for message in call:
                    reader.add(message)
        # Queued behind the chunk copies, so it waits for none of them.
        return await asyncio.wrap_future(COPIER.submit(reader.finish))

    async def write_weights(
        self,
        model_id: str,
        weights: Mapping[str, np.ndarray],
        *,
        expected_revision: int | None = None,
        message: str = "",
        allow_non_finite: bool = False,
        chunk_size_bytes: int = 0,
    ) -> weight_service_pb2.Revision:
        """Overwrite variables, committed atomically as one new revision.

        Each array must have its variable's exact shape and dtype. Nothing
        changes unless the whole stream arrives.

        Args:
            model_id: The model's id.
            weights: Arrays keyed by variable path (any subset of variables).
            expected_revision: Commit only if the model is still at this
                revision, else raise `AbortedError`; None to write regardless.
            message: Recorded on the new revision.
            allow_non_finite: Accept NaN and infinities (refused by default).
            chunk_size_bytes: Streamed chunk size, 65536 to 4194304; 0 for
                2 MiB.

        Returns:
            The committed `Revision`.

        Example:

        ```python
        weights = await client.read_weights("tiny", "predictions/*")
        weights = {path: array * 0.5 for path, array in weights.items()}
        revision = await client.write_weights("tiny", weights, message="halve the head")
        ```
        """
        requests = self._write_weights_messages(
            model_id,
            weights,
            expected_revision=expected_revision,
            message=message,
            allow_non_finite=allow_non_finite,
            chunk_size_bytes=chunk_size_bytes,
        )
        with translate_errors():
            response = await self._connect().write_weights(
                requests, timeout=self._stream_timeout, metadata=self._metadata
            )
        return response.revision

    # --- revisions ------------------------------------------------------------

    async def list_revisions(
        self, model_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> weight_service_pb2.ListRevisionsResponse:
        """Return one page of a model's revisions, newest first.

        Args:
            model_id: The model's id.
            page_size: Most revisions to return, 1 to 1000; 0 for the server's 100.
            page_token: `next_page_token` of the previous page; "" for the first.

        Returns:
            The page: `revisions` and `next_page_token` ("" on the last page).
        """
        request = weight_service_pb2.ListRevisionsRequest(
            model_id=model_id, page_size=page_size, page_token=page_token
        )
        with translate_errors():
            return await self._connect().weights.ListRevisions(
                request, timeout=self._timeout, metadata=self._metadata
            )

    async def iter_revisions(
        self, model_id: str, *, page_size: int = 0
    ) -> AsyncIterator[weight_service_pb2.Revision]:
        """Yield every revision of a model, newest first, fetching pages as needed.

        Args:
            model_id: The model's id.
            page_size: Revisions per page; 0 for the server's default.

        Returns:
            An async iterator of `Revision`s.
        """
        page_token = ""
        while True:
            page = await self.list_revisions(model_id, page_size=page_size, page_token=page_token)
            for revision in page.revisions:
                yield revision
            page_token = page.next_page_token
            if not page_token:
                return

    async def get_revision(self, model_id: str, revision: int) -> weight_service_pb2.Revision:
        """Return one revision of a model.

        Args:
            model_id: The model's id.
            revision: The revision number, at least 1.

        Returns:
            The `Revision`.
        """
        request = weight_service_pb2.GetRevisionRequest(model_id=model_id, revision=revision)
        with translate_errors():
            response = await self._connect().weights.GetRevision(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.revision

    # --- edits ----------------------------------------------------------------

    async def apply_edits(
        self,
        model_id: str,
        edits: Sequence[edits_pb2.Edit],
        *,
        expected_revision: int | None = None,
        message: str = "",
        dry_run: bool = False,
    ) -> weight_service_pb2.ApplyEditsResponse:
        """Apply a batch of typed edits atomically, committed as one new revision.

        The edits apply in order, each seeing the result of the ones before;
        if any is invalid nothing changes. Build them with `weightsmith.edits`.
        Never retried: replaying it could commit the batch twice.

        Args:
            model_id: The model's id.
            edits: The edits, at least one.
            expected_revision: Commit only if the model is still at this
                revision, else raise `AbortedError`; None to apply regardless.
            message: Recorded on the new revision.
            dry_run: Validate and report what the edits would do without
                committing anything.

        Returns:
            The response: `revision` (the committed `Revision`, unset for a
            dry run) and `results`, one `EditResult` per edit.

        Example:

        ```python
        from weightsmith import edits

        response = await client.apply_edits(
            "tiny",
            [edits.prune("*/kernel", 0.5), edits.quantize("*/kernel", bits=8)],
            message="prune and quantize",
        )
        print(response.revision.revision, [r.elements_changed for r in response.results])
        ```
        """
        request = self._apply_edits_request(
            model_id, edits, expected_revision=expected_revision, message=message, dry_run=dry_run
        )
        with translate_errors():
            return await self._connect().weights.ApplyEdits(
                request, timeout=self._timeout, metadata=self._metadata
            )

    async def diff_revisions(
        self, model_id: str, from_revision: int, to_revision: int = 0
    ) -> weight_service_pb2.DiffRevisionsResponse:
        """Compare two revisions of a model variable by variable.

        Args:
            model_id: The model's id.
            from_revision: The earlier revision, at least 1.
            to_revision: The later revision; 0 for the current one.

        Returns:
            The diff: `changed` (a `VariableDiff` per variable whose values
            differ), `added`, `removed`, `unchanged_count` and
            `architecture_changed`.

        Example:

        ```python
        diff = await client.diff_revisions("tiny", 1)
        for variable in diff.changed:
            print(variable.path, variable.delta_l2, variable.fraction_changed)
        ```
        """
        request = self._diff_revisions_request(model_id, from_revision, to_revision)
        with translate_errors():
            return await self._connect().weights.DiffRevisions(
                request, timeout=self._timeout, metadata=self._metadata
            )

    async def revert_model(
        self,
        model_id: str,
        to_revision: int,
        *,
        expected_revision: int | None = None,
        message: str = "",
    ) -> weight_service_pb2.Revision:
        """Restore an earlier revision's weights and architecture as a new revision.

        History is never rewritten: the restored state is committed on top.

        Args:
            model_id: The model's id.
            to_revision: The revision to restore, at least 1.
            expected_revision: Commit only if the model is still at this
                revision, else raise `AbortedError`; None to revert regardless.
            message: Recorded on the new revision.

        Returns:
            The committed `Revision`; its `reverted_to` is `to_revision`.

        Example:

        ```python
        revision = await client.revert_model("tiny", 1, message="undo the pruning")
        ```
        """
        request = self._revert_model_request(
            model_id, to_revision, expected_revision=expected_revision, message=message
        )
        with translate_errors():
            response = await self._connect().weights.RevertModel(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.revision

    # --- datasets -------------------------------------------------------------

    async def upload_dataset(
        self,
        source: DatasetSourceLike,
        dataset_id: str = "",
        *,
        format: str | None = None,
        tfrecord_features: FeatureSpecLike | None = None,
        tfrecord_labels: FeatureSpecLike | None = None,
        image_size: Sequence[int] | None = None,
        channels: int = 3,
        chunk_size_bytes: int = DEFAULT_UPLOAD_CHUNK_BYTES,
    ) -> training_service_pb2.Dataset:
        """Upload a dataset for training jobs and `evaluate`.

        The server validates it completely before acknowledging it; nothing
        is created otherwise. The source's form gives its format unless
        `format` says otherwise:

        - a mapping of arrays `{"x", "y"}`, optionally with `"x_val"` and
          `"y_val"`: sent as an `.npz` built in memory (`"npz"`);
        - a `.npz` file (`"npz"`) or a `.tfrecord` file (`"tfrecord"`, with
          `tfrecord_features` and `tfrecord_labels`);
        - a `.zip`, `.tar` or `.tar.gz` archive of an image folder, or the
          image folder itself, one subfolder per class, zipped on the fly
          into a temporary file (`"image_folder"`, with `image_size`);
        - the file's bytes, with `format`.

        Serializing, zipping and reading happen off the event loop, in
        worker threads.

        Args:
            source: The arrays, a path, or bytes.
            dataset_id: The new id, matching `[a-z0-9][a-z0-9-]{0,62}`; the
                server picks one when empty.
            format: `"npz"`, `"tfrecord"` or `"image_folder"`; None to tell
                from `source`.
            tfrecord_features: The input feature of each `tf.train.Example`,
                as `(name, dtype, shape)` with dtype `"float32"`, `"int64"` or
                `"uint8"` (a bytes_list of raw bytes), or a `FeatureSpec`.
            tfrecord_labels: The label feature, in the same form.
            image_size: `(height, width)` every image is resized to.
            channels: 1 (grayscale) or 3 (RGB), for image folders.
            chunk_size_bytes: Bytes per streamed message.

        Returns:
            The validated `Dataset`: example counts, feature and label specs,
            class names.

        Example:

        ```python
        x = np.random.rand(512, 32, 32, 3).astype(np.float32)
        y = np.random.randint(0, 10, 512)
        dataset = await client.upload_dataset({"x": x, "y": y}, "cifar-toy")
        flowers = await client.upload_dataset("flower_photos/", "flowers", image_size=(96, 96))
        ```
        """
        chunk_size = self._upload_chunk_size(chunk_size_bytes)
        upload = await asyncio.to_thread(
            self._dataset_upload,
            source,
            dataset_id,
            format=format,
            tfrecord_features=tfrecord_features,
            tfrecord_labels=tfrecord_labels,
            image_size=image_size,
            channels=channels,
        )

        async def requests() -> AsyncIterator[training_service_pb2.UploadDatasetRequest]:
            yield upload.header
            file = await asyncio.to_thread(upload.open)
            try:
                while block := await asyncio.to_thread(file.read, chunk_size):
                    yield training_service_pb2.UploadDatasetRequest(chunk=block)
            finally:
                file.close()

        try:
            with translate_errors():
                response = await self._connect().training.UploadDataset(
                    requests(), timeout=self._stream_timeout, metadata=self._metadata
                )
        finally:
            upload.close()
        return response.dataset

    async def create_dataset(
        self,
        uri: str,
        dataset_id: str = "",
        *,
        format: str,
        tfrecord_features: FeatureSpecLike | None = None,
        tfrecord_labels: FeatureSpecLike | None = None,
        image_size: Sequence[int] | None = None,
        channels: int = 3,
    ) -> training_service_pb2.Dataset:
        """Register a dataset from a file the server reads itself, without uploading it.

        Args:
            uri: A path (or `file://` URI) under one of the server's dataset
                roots (`--dataset-roots`), or a path inside the store's
                `imports/`.
            dataset_id: The new id; the server picks one when empty.
            format: `"npz"`, `"tfrecord"` or `"image_folder"` (a zip or tar
                archive).
            tfrecord_features: For TFRecords: the input feature, as
                `(name, dtype, shape)` or a `FeatureSpec`.
            tfrecord_labels: For TFRecords: the label feature.
            image_size: For image folders: `(height, width)`.
            channels: For image folders: 1 or 3.

        Returns:
            The validated `Dataset`.

        Example:

        ```python
        dataset = await client.create_dataset(
            "/data/mnist.tfrecord", "mnist", format="tfrecord",
            tfrecord_features=("image", "uint8", [28, 28, 1]),
            tfrecord_labels=("label", "int64", []),
        )
        ```
        """
        request = self._create_dataset_request(
            uri,
            dataset_id,
            format=format,
            tfrecord_features=tfrecord_features,
            tfrecord_labels=tfrecord_labels,
            image_size=image_size,
            channels=channels,
        )
        with translate_errors():
            response = await self._connect().training.CreateDataset(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.dataset

    async def get_dataset(self, dataset_id: str) -> training_service_pb2.Dataset:
        """Return a dataset's description.

        Args:
            dataset_id: The dataset's id.

        Returns:
            The `Dataset`.
        """
        request = training_service_pb2.GetDatasetRequest(dataset_id=dataset_id)
        with translate_errors():
            response = await self._connect().training.GetDataset(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.dataset

    async def list_datasets(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> training_service_pb2.ListDatasetsResponse:
        """Return one page of datasets, ordered by id.

        Args:
            page_size: Most datasets to return, 1 to 1000; 0 for the server's 100.
            page_token: `next_page_token` of the previous page; "" for the first.

        Returns:
            The page: `datasets` and `next_page_token` ("" on the last page).
        """
        request = training_service_pb2.ListDatasetsRequest(page_size=page_size, page_token=page_token)
        with translate_errors():
            return await self._connect().training.ListDatasets(
                request, timeout=self._timeout, metadata=self._metadata
            )

    async def iter_datasets(self, *, page_size: int = 0) -> AsyncIterator[training_service_pb2.Dataset]:
        """Yield every dataset, ordered by id, fetching pages as needed.

        Args:
            page_size: Datasets per page; 0 for the server's default.

        Returns:
            An async iterator of `Dataset`s.

        Example:

        ```python
        ids = [dataset.dataset_id async for dataset in client.iter_datasets()]
        ```
        """
        page_token = ""
        while True:
            page = await self.list_datasets(page_size=page_size, page_token=page_token)
            for dataset in page.datasets:
                yield dataset
            page_token = page.next_page_token
            if not page_token:
                return

    async def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset; `FailedPreconditionError` while a queued or running job uses it.

        Args:
            dataset_id: The dataset's id.
        """
        request = training_service_pb2.DeleteDatasetRequest(dataset_id=dataset_id)
        with translate_errors():
            await self._connect().training.DeleteDataset(
                request, timeout=self._timeout, metadata=self._metadata
            )

    # --- jobs -----------------------------------------------------------------

    async def create_job(
        self, spec: training_service_pb2.JobSpec, job_id: str = ""
    ) -> training_service_pb2.Job:
        """Validate a fine-tuning job completely and queue it.

        The job trains a working copy of the model, so `predict` and
        `read_weights` keep serving the last committed revision; on success
        it commits the result as one revision (or a new model). Never
        retried: replaying it could queue the job twice.

        Args:
            spec: Built with `weightsmith.jobs.spec`.
            job_id: The new id; the server picks one when empty.

        Returns:
            The queued `Job`.

        Example:

        ```python
        from weightsmith import jobs

        job = await client.create_job(jobs.spec("tiny", "toy", epochs=2, batch_size=32,
                                                optimizer=jobs.adam(1e-3),
                                                loss="sparse_categorical_crossentropy"))
        ```
        """
        request = self._create_job_request(spec, job_id)
        with translate_errors():
            response = await self._connect().training.CreateJob(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.job

    async def get_job(self, job_id: str) -> training_service_pb2.Job:
        """Return a job: its state, progress and result.

        Args:
            job_id: The job's id.

        Returns:
            The `Job`.
        """
        request = training_service_pb2.GetJobRequest(job_id=job_id)
        with translate_errors():
            response = await self._connect().training.GetJob(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.job

    async def list_jobs(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> training_service_pb2.ListJobsResponse:
        """Return one page of jobs, newest first.

        Args:
            page_size: Most jobs to return, 1 to 1000; 0 for the server's 100.
            page_token: `next_page_token` of the previous page; "" for the first.

        Returns:
            The page: `jobs` and `next_page_token` ("" on the last page).
        """
        request = training_service_pb2.ListJobsRequest(page_size=page_size, page_token=page_token)
        with translate_errors():
            return await self._connect().training.ListJobs(
                request, timeout=self._timeout, metadata=self._metadata
            )

    async def iter_jobs(self, *, page_size: int = 0) -> AsyncIterator[training_service_pb2.Job]:
        """Yield every job, newest first, fetching pages as needed.

        Args:
            page_size: Jobs per page; 0 for the server's default.

        Returns:
            An async iterator of `Job`s.

        Example:

        ```python
        running = [job.job_id async for job in client.iter_jobs()
                   if job.state == training_service_pb2.JOB_STATE_RUNNING]
        ```
        """
        page_token = ""
        while True:
            page = await self.list_jobs(page_size=page_size, page_token=page_token)
            for job in page.jobs:
                yield job
            page_token = page.next_page_token
            if not page_token:
                return

    async def cancel_job(self, job_id: str) -> training_service_pb2.Job:
        """Cancel a queued or running job; it commits nothing.

        Args:
            job_id: The job's id.

        Returns:
            The `Job`; CANCELLED once it has stopped (within one progress
            interval), so `wait_job` may be needed to see the final state.
        """
        request = training_service_pb2.CancelJobRequest(job_id=job_id)
        with translate_errors():
            response = await self._connect().training.CancelJob(
                request, timeout=self._timeout, metadata=self._metadata
            )
        return response.job

    async def list_job_events(
        self, job_id: str, *, after_sequence: int = 0, page_size: int = 0, page_token: str = ""
    ) -> training_service_pb2.ListJobEventsResponse:
        """Return one page of a job's events, in sequence order, for pollers.

        Args:
            job_id: The job's id.
            after_sequence: Start after this sequence number (without a page token).
            page_size: Most events to return, 1 to 1000; 0 for the server's 100.
            page_token: `next_page_token` of the previous page; "" for the first.

        Returns:
            The page: `events` and `next_page_token` (not empty while there
            may be more, also while the job runs).
        """
        request = self._list_job_events_request(job_id, after_sequence, page_size, page_token)
        with translate_errors():
            return await self._connect().training.ListJobEvents(
                request, timeout=self._timeout, metadata=self._metadata
            )

    async def watch_job(
        self,
        job_id: str,
        *,
        after_sequence: int = 0,
        reconnect: bool = True,
        max_reconnects: int = DEFAULT_MAX_RECONNECTS,
    ) -> AsyncIterator[training_service_pb2.JobEvent]:
        """Yield a job's events in sequence order, live, until the job ends.

        Events already stored are replayed first. When the stream fails
        because the connection did (UNAVAILABLE, DEADLINE_EXCEEDED, or a
        reset connection reported as INTERNAL or UNKNOWN), it reconnects from
        the last event seen after a backoff of 0.2 s doubling to 2 s, so the
        sequence stays gap-free and without repeats. Other errors raise. The
        stream has no deadline unless the client's `stream_timeout` sets one
        (each connection then lasts at most that long).

        Args:
            job_id: The job's id.
            after_sequence: Yield only events after this sequence number; 0
                for all.
            reconnect: Reconnect after a connection failure; False to raise it.
            max_reconnects: Most reconnections in a row without receiving an
                event before the failure is raised.

        Returns:
            An async iterator of `JobEvent`s; it ends when the job has ended.

        Example:

        ```python
        async for event in client.watch_job(job.job_id):
            if event.WhichOneof("kind") == "epoch_ended":
                print(event.epoch_ended.epoch, dict(event.epoch_ended.validation_metrics))
        ```
        """
        watch = self._job_watch(
            job_id, after_sequence=after_sequence, reconnect=reconnect, max_reconnects=max_reconnects
        )
        async for event in self._watch(watch):
            yield event

    async def _watch(self, watch: JobWatch) -> AsyncIterator[training_service_pb2.JobEvent]:
        with translate_errors():
            while True:
                call = self._connect().training.WatchJob(
                    watch.request(), timeout=watch.call_timeout(), metadata=self._metadata
                )
                try:
                    with cancel_on_error(call):
                        async for response in call:
                            if watch.accept(response.event):
                                yield response.event
                    return
                except grpc.RpcError as exc:
                    delay = watch.reconnect_delay(exc)
                    if delay is None:
                        raise
                await asyncio.sleep(delay)

    async def wait_job(self, job_id: str, *, timeout: float | None = None) -> training_service_pb2.Job:
        """Wait until a job has ended and return it.

        Watches the job's events (reconnecting like `watch_job`), then
        fetches the final `Job`. A failed or cancelled job is returned, not
        raised: check its `state` and `error`.

        Args:
            job_id: The job's id.
            timeout: Most seconds to wait; None to wait as long as it takes.

        Returns:
            The ended `Job`.

        Raises:
            TimeoutError: The job had not ended after `timeout` seconds (it
                keeps running; `cancel_job` stops it).

        Example:

        ```python
        job = await client.wait_job(job.job_id, timeout=3600)
        if job.state == training_service_pb2.JOB_STATE_SUCCEEDED:
            print("committed revision", job.result_revision)
        ```
        """
        watch = self._job_watch(job_id, timeout=timeout)
        job = await self.get_job(job_id)
        if job.state in TERMINAL_JOB_STATES:
            return job
        watch.last_sequence = job.last_sequence
        async for _ in self._watch(watch):
            pass
        return await self.get_job(job_id)
