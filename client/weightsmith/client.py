# Generated from _async_client.py by scripts/unasync.py: do not edit.
# Edit _async_client.py, then run `python scripts/unasync.py` (`make test` checks they agree).
"""The weightsmith client, written once for asyncio and generated for blocking calls.

`_async_client.py` is the source; `scripts/unasync.py` generates `client.py`
from it: coroutines become blocking methods, async generators plain ones,
and the grpc.aio transport the grpc one (`_transport`). Edit the source, then
run `python scripts/unasync.py`; `make test` fails while the two differ.

Every method is a short delegation: check the arguments and build the request
(`_requests`, `_uploads`, `_streams`), make the call through `_send`, the one
funnel that adds the deadline and the author and token metadata and raises every
failure as a `WeightsmithError`, then decode the response.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import EllipsisType, TracebackType
from typing import Any

import grpc
import numpy as np

from weightsmith import _requests, _rpcs
from weightsmith._channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    DEFAULT_UPLOAD_CHUNK_BYTES,
    ChannelOptions,
    ClientSettings,
)
from weightsmith._datasets import DatasetSourceLike, FeatureSpecLike
from weightsmith._requests import BatchingLike, PredictInputs
from weightsmith._rpcs import Rpc
from weightsmith._streams import COPIER, ExportReceiver, WeightsReader, partial_path, write_weights_messages
from weightsmith._tls import TLS
from weightsmith._transport import SyncTransport
from weightsmith._types import PredictResult, SelectorLike
from weightsmith._uploads import Upload, dataset_upload, model_upload
from weightsmith._watch import DEFAULT_MAX_RECONNECTS, TERMINAL_JOB_STATES, JobWatch
from weightsmith.errors import WeightsmithError
from weightsmith.v1 import (
    dataset_pb2,
    edits_pb2,
    job_pb2,
    model_pb2,
    model_service_pb2,
    revision_pb2,
    training_service_pb2,
    weight_service_pb2,
)


class Client:
    """A client of a weightsmith server: one channel, every RPC as a method.

    The blocking and the asyncio client have the same methods and the same
    keyword-only options; the asyncio client's methods are coroutines, or
    async generators for `iter_*` and `watch_job`. Use a client as a context
    manager or call `close()`. Every failure raises a
    `weightsmith.WeightsmithError` subclass, one per gRPC status code.

    The blocking client may be shared between threads. The asyncio client
    opens its channel on the first call, so it may be created outside the
    event loop that uses it, and runs blocking file work (reading uploads,
    writing exports, zipping image folders) in worker threads, off the loop.

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
            `user@hostname`. Printable ASCII. A server with authentication
            records the caller's principal name instead.
        max_message_bytes: Largest message sent or received, in bytes.
        token: The bearer token of a server with authentication
            (`--auth-tokens`), sent as `authorization: Bearer <token>` on
            every call. Refused over plaintext to another machine unless
            `insecure` is True.
        tls: A `weightsmith.TLS` (the CA that signed the server's
            certificate, and for mutual TLS the client's certificate and
            key), or True for TLS trusting the system's root certificates;
            None (the default) for a plaintext channel.
        insecure: Allow `token` over a plaintext channel to another
            machine, when the network protects it (a service mesh).
        credentials: gRPC channel credentials, in place of `tls`, for
            anything `tls` does not cover.
        options: Extra gRPC channel options as `(key, value)` pairs; they
            override the client's own.

    Example:

    ```python
    import weightsmith

    with weightsmith.Client("127.0.0.1:50051") as client:
        model = client.create_model(
            "mnv2", architecture="MobileNetV2", input_shape=[96, 96, 3], classes=10, seed=0
        )
        kernels = client.read_weights("mnv2", "*/kernel")
        print(model.revision, len(kernels))
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
        token: str | None = None,
        tls: TLS | bool | None = None,
        insecure: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
    ) -> None:
        self._settings = ClientSettings(
            target,
            timeout=timeout,
            stream_timeout=stream_timeout,
            author=author,
            max_message_bytes=max_message_bytes,
            credentials=credentials,
            options=options,
            token=token,
            tls=tls,
            insecure=insecure,
        )
        self._transport = SyncTransport(self._settings)

    @property
    def target(self) -> str:
        """The server address the client connects to."""
        return self._settings.target

    @property
    def author(self) -> str:
        """The `weightsmith-author` recorded on the revisions this client commits."""
        return self._settings.author

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- the call funnel ------------------------------------------------------

    def _send(self, rpc: Rpc, request: Any, *, timeout: float | EllipsisType | None = ...) -> Any:
        """Make one call: the funnel every RPC of the client goes through.

        It adds the author and token metadata and the deadline: `timeout` seconds
        (None for none), or by default the client's `stream_timeout` for
        streaming calls and its `timeout` for the others. Failures raise
        `WeightsmithError`s. It returns the response (to await, on asyncio)
        or, for a server stream, its responses, to iterate inside a `with`
        block that cancels the call if the block fails.
        """
        deadline = self._settings.deadline(rpc) if isinstance(timeout, EllipsisType) else timeout
        return self._transport.call(rpc, request, timeout=deadline, metadata=self._settings.metadata)

    def _paginate(self, list_page: Callable[..., Any], field: str, **options: Any) -> Iterator[Any]:
        """Yield the items of every page of a `list_*` method, following `next_page_token`."""
        page_token = ""
        while True:
            page = list_page(page_token=page_token, **options)
            yield from getattr(page, field)
            page_token = page.next_page_token
            if not page_token:
                return

    def _upload(self, rpc: Rpc, upload: Upload, chunk_size_bytes: int) -> Any:
        """Stream an upload: its header, then its bytes in chunks (read off the event loop on asyncio)."""

        def requests() -> Iterator[Any]:
            yield upload.header
            file = self._transport.run_blocking(upload.open)
            try:
                while block := self._transport.run_blocking(file.read, chunk_size_bytes):
                    yield upload.chunk(block)
            finally:
                file.close()

        try:
            return self._send(rpc, requests())
        finally:
            upload.close()

    # --- models ---------------------------------------------------------------

    def create_model(
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
        batching: BatchingLike | None = None,
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
            batching: The model's Predict batching policy, a `BatchingPolicy`
                or a dict with `max_batch_size` (1 turns batching off) and/or
                `max_wait_seconds`; fields left out follow the server's
                defaults. `Model.batching` reports the policy in effect.

        Returns:
            The created `Model`.

        Example:

        ```python
        model = client.create_model(
            "tiny", architecture="MobileNetV3Small", input_shape=[64, 64, 3], classes=5, seed=1
        )
        ```
        """
        request = _requests.create_model(
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
            batching=batching,
        )
        return self._send(_rpcs.CREATE_MODEL, request).model

    def upload_model(
        self,
        source: str | os.PathLike[str] | bytes,
        model_id: str = "",
        *,
        message: str = "",
        chunk_size_bytes: int = DEFAULT_UPLOAD_CHUNK_BYTES,
        batching: BatchingLike | None = None,
    ) -> model_pb2.Model:
        """Upload a `.keras` file as a new model at revision 1.

        The server loads it in Keras safe mode; a file that would run code is
        refused with `InvalidArgumentError`.

        Args:
            source: The file's path, or its bytes.
            model_id: The new id; the server picks one when empty.
            message: Recorded on revision 1.
            chunk_size_bytes: Bytes per streamed message.
            batching: The model's Predict batching policy, as for
                `create_model`.

        Returns:
            The uploaded `Model`.

        Example:

        ```python
        model = client.upload_model("classifier.keras", "classifier")
        ```
        """
        upload = model_upload(source, model_id, message)
        if batching is not None:
            upload.header.header.batching.CopyFrom(_requests.batching_policy(batching)[0])
        chunk_size = self._settings.upload_chunk_size(chunk_size_bytes)
        return self._upload(_rpcs.UPLOAD_MODEL, upload, chunk_size).model

    def get_model(self, model_id: str) -> model_pb2.Model:
        """Return a model's description: revision, layers, variables, device.

        Args:
            model_id: The model's id.

        Returns:
            The `Model`.
        """
        request = model_service_pb2.GetModelRequest(model_id=model_id)
        return self._send(_rpcs.GET_MODEL, request).model

    def list_models(
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
        return self._send(_rpcs.LIST_MODELS, request)

    def iter_models(self, *, page_size: int = 0) -> Iterator[model_pb2.Model]:
        """Yield every model, ordered by id, fetching pages as needed.

        Args:
            page_size: Models per page; 0 for the server's default.

        Returns:
            An iterator of `Model`s.

        Example:

        ```python
        ids = [model.model_id for model in client.iter_models()]
        ```
        """
        yield from self._paginate(self.list_models, "models", page_size=page_size)

    def update_model(self, model_id: str, *, batching: BatchingLike) -> model_pb2.Model:
        """Change a model's Predict batching policy, durably; no new revision.

        Only the fields given change; a field given as None goes back to the
        server's default (`--batch-max-size`, `--batch-wait-ms`).

        Args:
            model_id: The model's id.
            batching: A dict with `max_batch_size` (1 to 65536; 1 turns
                batching off) and/or `max_wait_seconds` (0 to 1), or a
                `BatchingPolicy` (its set fields).

        Returns:
            The `Model`, whose `batching` is the policy now in effect.

        Example:

        ```python
        model = client.update_model("tiny", batching={"max_batch_size": 1})
        ```
        """
        request = _requests.update_model(model_id, batching)
        return self._send(_rpcs.UPDATE_MODEL, request).model

    def delete_model(self, model_id: str) -> None:
        """Delete a model and its whole history.

        Args:
            model_id: The model's id.
        """
        self._send(_rpcs.DELETE_MODEL, model_service_pb2.DeleteModelRequest(model_id=model_id))

    def export_model(
        self,
        model_id: str,
        *,
        revision: int = 0,
        format: str = "keras",
        path: str | os.PathLike[str] | None = None,
    ) -> bytes | pathlib.Path:
        """Download a model as a `.keras` file or a SavedModel tar archive.

        With `path`, the file is written next to it under a temporary name
        and renamed into place once every byte arrived, so `path` never holds
        a partial export.

        Args:
            model_id: The model's id.
            revision: The revision to export; 0 for the current one.
            format: `"keras"` or `"saved_model"`.
            path: Where to write the file; None to return its bytes.

        Returns:
            The file's bytes, or `path` as a `pathlib.Path`.

        Example:

        ```python
        client.export_model("tiny", path="tiny.keras")
        ```
        """
        request = _requests.export_model(model_id, revision, format)
        receiver = ExportReceiver()
        with self._send(_rpcs.EXPORT_MODEL, request) as responses:
            if path is None:
                parts = [receiver.add(response) for response in responses]
                receiver.finish()
                return b"".join(parts)
            destination = pathlib.Path(path)
            partial = partial_path(destination)
            try:
                file = self._transport.run_blocking(partial.open, "wb")
                try:
                    for response in responses:
                        self._transport.run_blocking(file.write, receiver.add(response))
                finally:
                    self._transport.run_blocking(file.close)
                receiver.finish()
                self._transport.run_blocking(os.replace, partial, destination)
            finally:
                self._transport.run_blocking(partial.unlink, missing_ok=True)
            return destination

    def predict(
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
        probabilities = client.predict("tiny", batch).output
        ```
        """
        request = _requests.predict(model_id, inputs, output_layers)
        return _requests.predict_result(self._send(_rpcs.PREDICT, request))

    def evaluate(
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
        result = client.evaluate(
            "tiny", "toy", loss="sparse_categorical_crossentropy", metrics=["accuracy"], split="validation"
        )
        print(result.loss, result.metrics["accuracy"])
        ```
        """
        request = _requests.evaluate(
            model_id,
            dataset_id,
            loss=loss,
            metrics=metrics,
            batch_size=batch_size,
            revision=revision,
            split=split,
            rescale=rescale,
        )
        return self._send(_rpcs.EVALUATE, request)

    def server_info(self) -> model_service_pb2.GetServerInfoResponse:
        """Return the server's versions, devices, limits and catalog names."""
        return self._send(_rpcs.GET_SERVER_INFO, model_service_pb2.GetServerInfoRequest())

    # --- weights --------------------------------------------------------------

    def read_weights(
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
            Arrays keyed by variable path, in the model's order: writable
            arrays the caller owns. On Linux a new array of 4 MiB or more
            sits in its own mapping; once every array and view on it is
            freed, the client keeps the mapping up to 30 s for a later
            read's tensor of the same size, which then skips the cost of
            fresh memory (`weightsmith.zerocopy`).

        Example:

        ```python
        weights = client.read_weights("tiny", weightsmith.Selector(layers=["predictions"]))
        kernel = weights["predictions/kernel"]
        ```
        """
        request = _requests.read_weights(model_id, selector, revision, chunk_size_bytes)
        reader = WeightsReader(out)
        with self._send(_rpcs.READ_WEIGHTS, request) as responses:
            for message in responses:
                reader.add(message)
        # Queued behind the chunk copies, so it waits for none of them.
        return self._transport.run_blocking(reader.finish, executor=COPIER)

    def write_weights(
        self,
        model_id: str,
        weights: Mapping[str, np.ndarray],
        *,
        expected_revision: int | None = None,
        message: str = "",
        allow_non_finite: bool = False,
        chunk_size_bytes: int = 0,
    ) -> revision_pb2.Revision:
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
        weights = client.read_weights("tiny", "predictions/*")
        weights = {path: array * 0.5 for path, array in weights.items()}
        revision = client.write_weights("tiny", weights, message="halve the head")
        ```
        """
        requests = write_weights_messages(
            model_id,
            weights,
            expected_revision=expected_revision,
            message=message,
            allow_non_finite=allow_non_finite,
            chunk_size_bytes=chunk_size_bytes,
        )
        return self._send(_rpcs.WRITE_WEIGHTS, requests).revision

    # --- revisions ------------------------------------------------------------

    def list_revisions(
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
        return self._send(_rpcs.LIST_REVISIONS, request)

    def iter_revisions(self, model_id: str, *, page_size: int = 0) -> Iterator[revision_pb2.Revision]:
        """Yield every revision of a model, newest first, fetching pages as needed.

        Args:
            model_id: The model's id.
            page_size: Revisions per page; 0 for the server's default.

        Returns:
            An iterator of `Revision`s.
        """
        pages = self._paginate(self.list_revisions, "revisions", model_id=model_id, page_size=page_size)
        yield from pages

    def get_revision(self, model_id: str, revision: int) -> revision_pb2.Revision:
        """Return one revision of a model.

        Args:
            model_id: The model's id.
            revision: The revision number, at least 1.

        Returns:
            The `Revision`.
        """
        request = weight_service_pb2.GetRevisionRequest(model_id=model_id, revision=revision)
        return self._send(_rpcs.GET_REVISION, request).revision

    # --- edits ----------------------------------------------------------------

    def apply_edits(
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

        response = client.apply_edits(
            "tiny",
            [edits.prune("*/kernel", 0.5), edits.quantize("*/kernel", bits=8)],
            message="prune and quantize",
        )
        print(response.revision.revision, [r.elements_changed for r in response.results])
        ```
        """
        request = _requests.apply_edits(
            model_id, edits, expected_revision=expected_revision, message=message, dry_run=dry_run
        )
        return self._send(_rpcs.APPLY_EDITS, request)

    def diff_revisions(
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
        diff = client.diff_revisions("tiny", 1)
        for variable in diff.changed:
            print(variable.path, variable.delta_l2, variable.fraction_changed)
        ```
        """
        request = _requests.diff_revisions(model_id, from_revision, to_revision)
        return self._send(_rpcs.DIFF_REVISIONS, request)

    def revert_model(
        self,
        model_id: str,
        to_revision: int,
        *,
        expected_revision: int | None = None,
        message: str = "",
    ) -> revision_pb2.Revision:
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
        revision = client.revert_model("tiny", 1, message="undo the pruning")
        ```
        """
        request = _requests.revert_model(
            model_id, to_revision, expected_revision=expected_revision, message=message
        )
        return self._send(_rpcs.REVERT_MODEL, request).revision

    # --- datasets -------------------------------------------------------------

    def upload_dataset(
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
    ) -> dataset_pb2.Dataset:
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
        dataset = client.upload_dataset({"x": x, "y": y}, "cifar-toy")
        flowers = client.upload_dataset("flower_photos/", "flowers", image_size=(96, 96))
        ```
        """
        chunk_size = self._settings.upload_chunk_size(chunk_size_bytes)
        upload = self._transport.run_blocking(
            dataset_upload,
            source,
            dataset_id,
            format=format,
            tfrecord_features=tfrecord_features,
            tfrecord_labels=tfrecord_labels,
            image_size=image_size,
            channels=channels,
        )
        return self._upload(_rpcs.UPLOAD_DATASET, upload, chunk_size).dataset

    def create_dataset(
        self,
        uri: str,
        dataset_id: str = "",
        *,
        format: str,
        tfrecord_features: FeatureSpecLike | None = None,
        tfrecord_labels: FeatureSpecLike | None = None,
        image_size: Sequence[int] | None = None,
        channels: int = 3,
    ) -> dataset_pb2.Dataset:
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
        dataset = client.create_dataset(
            "/data/mnist.tfrecord", "mnist", format="tfrecord",
            tfrecord_features=("image", "uint8", [28, 28, 1]),
            tfrecord_labels=("label", "int64", []),
        )
        ```
        """
        request = _requests.create_dataset(
            uri,
            dataset_id,
            format=format,
            tfrecord_features=tfrecord_features,
            tfrecord_labels=tfrecord_labels,
            image_size=image_size,
            channels=channels,
        )
        return self._send(_rpcs.CREATE_DATASET, request).dataset

    def get_dataset(self, dataset_id: str) -> dataset_pb2.Dataset:
        """Return a dataset's description.

        Args:
            dataset_id: The dataset's id.

        Returns:
            The `Dataset`.
        """
        request = training_service_pb2.GetDatasetRequest(dataset_id=dataset_id)
        return self._send(_rpcs.GET_DATASET, request).dataset

    def list_datasets(
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
        return self._send(_rpcs.LIST_DATASETS, request)

    def iter_datasets(self, *, page_size: int = 0) -> Iterator[dataset_pb2.Dataset]:
        """Yield every dataset, ordered by id, fetching pages as needed.

        Args:
            page_size: Datasets per page; 0 for the server's default.

        Returns:
            An iterator of `Dataset`s.

        Example:

        ```python
        ids = [dataset.dataset_id for dataset in client.iter_datasets()]
        ```
        """
        yield from self._paginate(self.list_datasets, "datasets", page_size=page_size)

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset; `FailedPreconditionError` while a queued or running job uses it.

        Args:
            dataset_id: The dataset's id.
        """
        request = training_service_pb2.DeleteDatasetRequest(dataset_id=dataset_id)
        self._send(_rpcs.DELETE_DATASET, request)

    # --- jobs -----------------------------------------------------------------

    def create_job(self, spec: job_pb2.JobSpec, job_id: str = "") -> job_pb2.Job:
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

        spec = jobs.spec("tiny", "toy", epochs=2, batch_size=32, optimizer=jobs.adam(1e-3),
                         loss="sparse_categorical_crossentropy")
        job = client.create_job(spec)
        ```
        """
        return self._send(_rpcs.CREATE_JOB, _requests.create_job(spec, job_id)).job

    def get_job(self, job_id: str) -> job_pb2.Job:
        """Return a job: its state, progress and result.

        Args:
            job_id: The job's id.

        Returns:
            The `Job`.
        """
        request = training_service_pb2.GetJobRequest(job_id=job_id)
        return self._send(_rpcs.GET_JOB, request).job

    def list_jobs(self, *, page_size: int = 0, page_token: str = "") -> training_service_pb2.ListJobsResponse:
        """Return one page of jobs, newest first.

        Args:
            page_size: Most jobs to return, 1 to 1000; 0 for the server's 100.
            page_token: `next_page_token` of the previous page; "" for the first.

        Returns:
            The page: `jobs` and `next_page_token` ("" on the last page).
        """
        request = training_service_pb2.ListJobsRequest(page_size=page_size, page_token=page_token)
        return self._send(_rpcs.LIST_JOBS, request)

    def iter_jobs(self, *, page_size: int = 0) -> Iterator[job_pb2.Job]:
        """Yield every job, newest first, fetching pages as needed.

        Args:
            page_size: Jobs per page; 0 for the server's default.

        Returns:
            An iterator of `Job`s.

        Example:

        ```python
        running = [job.job_id for job in client.iter_jobs()
                   if job.state == job_pb2.JOB_STATE_RUNNING]
        ```
        """
        yield from self._paginate(self.list_jobs, "jobs", page_size=page_size)

    def cancel_job(self, job_id: str) -> job_pb2.Job:
        """Cancel a queued or running job; it commits nothing.

        Args:
            job_id: The job's id.

        Returns:
            The `Job`; CANCELLED once it has stopped (within one progress
            interval), so `wait_job` may be needed to see the final state.
        """
        request = training_service_pb2.CancelJobRequest(job_id=job_id)
        return self._send(_rpcs.CANCEL_JOB, request).job

    def list_job_events(
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
        request = _requests.list_job_events(job_id, after_sequence, page_size, page_token)
        return self._send(_rpcs.LIST_JOB_EVENTS, request)

    def watch_job(
        self,
        job_id: str,
        *,
        after_sequence: int = 0,
        reconnect: bool = True,
        max_reconnects: int = DEFAULT_MAX_RECONNECTS,
    ) -> Iterator[job_pb2.JobEvent]:
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
            An iterator of `JobEvent`s; it ends when the job has ended.

        Example:

        ```python
        for event in client.watch_job(job.job_id):
            if event.WhichOneof("kind") == "epoch_ended":
                print(event.epoch_ended.epoch, dict(event.epoch_ended.validation_metrics))
        ```
        """
        watch = JobWatch(
            job_id,
            after_sequence=after_sequence,
            reconnect=reconnect,
            max_reconnects=max_reconnects,
            stream_timeout=self._settings.stream_timeout,
        )
        yield from self._watch(watch)

    def _watch(self, watch: JobWatch) -> Iterator[job_pb2.JobEvent]:
        """Yield a job's new events, reconnecting after connection failures as `watch` decides."""
        while True:
            try:
                call = self._send(_rpcs.WATCH_JOB, watch.request(), timeout=watch.call_timeout())
                with call as responses:
                    for response in responses:
                        if watch.accept(response.event):
                            yield response.event
                return
            except WeightsmithError as exc:
                delay = watch.reconnect_delay(exc)
                if delay is None:
                    raise
            self._transport.sleep(delay)

    def wait_job(self, job_id: str, *, timeout: float | None = None) -> job_pb2.Job:
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
        job = client.wait_job(job.job_id, timeout=3600)
        if job.state == job_pb2.JOB_STATE_SUCCEEDED:
            print("committed revision", job.result_revision)
        ```
        """
        watch = JobWatch(job_id, stream_timeout=self._settings.stream_timeout, timeout=timeout)
        job = self.get_job(job_id)
        if job.state in TERMINAL_JOB_STATES:
            return job
        watch.last_sequence = job.last_sequence
        for _ in self._watch(watch):
            pass
        return self.get_job(job_id)
