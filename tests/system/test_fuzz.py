"""Fuzzing every RPC with hypothesis: generated requests and valid requests mutated one step.

Properties, checked after every call: the answer is never INTERNAL or
UNKNOWN (nor a dropped connection or a hang), every rejection names a reason
from the ErrorReason catalog in a reply of at most 16 KiB that does not show
the store's absolute path, the health service still says SERVING, and a
rejected request left the store exactly as it was (file names and contents,
`tmp/` aside). Accepted requests may change the store: the world is then put
back (extra models and datasets deleted, changed models reverted, jobs
finished) and the store snapshot taken again.

The RPCs come from the service descriptors, so a new RPC is fuzzed as soon
as it exists, and `test_every_rpc_has_a_valid_request` fails until the world
below knows a valid request for it. Short in `make test`; `make stress`
(WEIGHTSMITH_STRESS=1) runs many more examples. WEIGHTSMITH_FUZZ_SEED
replays a run: a failure prints its seed.
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

import weightsmith
from tests.conftest import ServerHandle, _start_in_thread, _stop_in_thread, tiny_config
from tests.fuzz_support import (
    FAILURE_CODES,
    Rpc,
    all_rpcs,
    call,
    diff_digests,
    messages,
    mutate_stream,
    store_digest,
)
from weightsmith import edits, jobs, wire
from weightsmith.v1 import (
    dataset_pb2,
    error_reason_pb2,
    job_pb2,
    model_pb2,
    model_service_pb2,
    selector_pb2,
    tensor_pb2,
    training_service_pb2,
    weight_service_pb2,
)
from weightsmith_server.api.status import MAX_ERROR_BYTES

pytestmark = pytest.mark.stress

STRESS = os.environ.get("WEIGHTSMITH_STRESS") == "1"
# Examples per RPC, for each of generation and mutation; WEIGHTSMITH_FUZZ_EXAMPLES overrides.
EXAMPLES = int(os.environ.get("WEIGHTSMITH_FUZZ_EXAMPLES") or (300 if STRESS else 30))
CALL_TIMEOUT = 60.0
JOB_SECONDS = 60.0  # an accepted job, cancelled at once, must end within this
REASONS = frozenset(error_reason_pb2.ErrorReason.keys())
RPCS = all_rpcs()
TERMINAL_JOBS = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
MODELS = ("fz-base", "fz-other", "fz-victim")
DATASETS = ("fz-data", "fz-victim-data")

_seed_text = os.environ.get("WEIGHTSMITH_FUZZ_SEED")
SEED = int(_seed_text) if _seed_text else random.SystemRandom().randrange(2**32)


def _npz() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(
        buffer, x=rng.normal(size=(8, 4)).astype(np.float32), y=rng.normal(size=(8, 2)).astype(np.float32)
    )
    return buffer.getvalue()


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def _chunk(name: str, array: np.ndarray, offset: int = 0, end: int | None = None) -> tensor_pb2.TensorChunk:
    data = array.tobytes()
    return tensor_pb2.TensorChunk(
        name=name, dtype=wire.wire_dtype(array.dtype), shape=array.shape, offset=offset, data=data[offset:end]
    )


class World:
    """The fuzz server's store: fixed models, datasets and a job that valid requests name."""

    def __init__(self, handle: ServerHandle, store: Path) -> None:
        self.handle = handle
        self.store = store
        self.channel = grpc.insecure_channel(
            handle.address, options=[("grpc.max_receive_message_length", 256 << 20)]
        )
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.client = weightsmith.Client(handle.address, author="fuzz")
        self.npz = _npz()
        self.config = tiny_config()
        self.calls: dict[str, dict[str, int]] = {}
        self.heads: dict[str, int] = {}  # each model's revision once restored

    def setup(self) -> None:
        (self.store / "imports").mkdir(parents=True, exist_ok=True)
        (self.store / "imports" / "fz.npz").write_bytes(self.npz)
        self.restore()
        self.keras = self.client.export_model("fz-base")
        spec = self.job_spec()
        spec.output_model_id = "fz-trained"
        self.client.create_job(spec, job_id="fz-job")
        assert self.client.wait_job("fz-job", timeout=300).state == job_pb2.JOB_STATE_SUCCEEDED
        self.client.delete_model("fz-trained")

    def close(self) -> None:
        self.client.close()
        self.channel.close()

    # -- keeping the world as valid requests expect it ---------------------------

    def restore(self) -> None:
        """Finish jobs, delete what accepted calls created, recreate or revert what they changed."""
        for job in self.client.iter_jobs():
            if job.state not in TERMINAL_JOBS:
                self.client.cancel_job(job.job_id)
                deadline = time.monotonic() + JOB_SECONDS
                while self.client.get_job(job.job_id).state not in TERMINAL_JOBS:
                    assert time.monotonic() < deadline, (
                        f"job {job.job_id} still runs {JOB_SECONDS} s after CancelJob"
                    )
                    time.sleep(0.05)
        models = {model.model_id: model for model in self.client.iter_models()}
        for model_id, model in models.items():
            if model_id not in MODELS:
                self.client.delete_model(model_id)
            elif model.revision != self.heads.get(model_id):
                self.heads[model_id] = self.client.revert_model(model_id, 1).revision
        for seed_value, model_id in enumerate(MODELS):
            if model_id not in models:
                created = self.client.create_model(model_id, keras_config=self.config, seed=seed_value)
                self.heads[model_id] = created.revision
        datasets = {dataset.dataset_id for dataset in self.client.iter_datasets()}
        for dataset_id in datasets - set(DATASETS):
            self.client.delete_dataset(dataset_id)
        for dataset_id in set(DATASETS) - datasets:
            self.client.upload_dataset(self.npz, dataset_id=dataset_id, format="npz")

    # -- one valid request per RPC ---------------------------------------------------

    def job_spec(self) -> job_pb2.JobSpec:
        return job_pb2.JobSpec(
            model_id="fz-base",
            output_model_id="fz-job-output",
            train_dataset_id="fz-data",
            validation_dataset_id="fz-data",
            epochs=1,
            batch_size=4,
            optimizer=jobs.sgd(0.01, momentum=0.5),
            loss="mse",
            metrics=["mae"],
            trainable=job_pb2.TrainableSelection(freeze=selector_pb2.VariableSelector(patterns=["hidden/*"])),
            early_stopping=job_pb2.EarlyStopping(monitor="val_loss", patience=1),
            checkpoint_every_epochs=1,
            progress_every_steps=1,
            seed=3,
            shuffle=True,
        )

    def valid(self, rpc: Rpc) -> list[Message]:
        """A request for `rpc` the server accepts, as a list of messages.

        The same every time (no revision numbers that move), so that hypothesis
        replays a mutation exactly.
        """
        return self.builders()[rpc.name]()

    def builders(self) -> dict[str, Callable[[], list[Message]]]:
        m, w, t = model_service_pb2, weight_service_pb2, training_service_pb2
        bias = np.array([0.25, -0.5], np.float32)
        hidden = np.array([0.1, 0.2, 0.3], np.float32)
        selector = selector_pb2.VariableSelector
        return {
            "CreateModel": lambda: [
                m.CreateModelRequest(model_id="fz-new", keras_config_json=self.config, seed=5, message="m")
            ],
            "UploadModel": lambda: [
                m.UploadModelRequest(
                    header=m.UploadModelHeader(model_id="fz-up", size_bytes=len(self.keras), message="m")
                ),
                *(m.UploadModelRequest(chunk=part) for part in _split(self.keras, 8192)),
            ],
            "GetModel": lambda: [m.GetModelRequest(model_id="fz-base")],
            "ListModels": lambda: [m.ListModelsRequest(page_size=2)],
            "DeleteModel": lambda: [m.DeleteModelRequest(model_id="fz-victim")],
            "UpdateModel": lambda: [
                m.UpdateModelRequest(
                    model_id="fz-other",
                    batching=model_pb2.BatchingPolicy(max_batch_size=8, max_wait_seconds=0.002),
                    update_mask=field_mask_pb2.FieldMask(paths=["batching"]),
                )
            ],
            "ExportModel": lambda: [
                m.ExportModelRequest(model_id="fz-base", revision=1, format=m.EXPORT_FORMAT_KERAS)
            ],
            "Predict": lambda: [
                m.PredictRequest(
                    model_id="fz-base",
                    inputs=[
                        tensor_pb2.NamedTensor(
                            name="features", tensor=wire.tensor_to_proto(np.ones((2, 4), np.float32))
                        )
                    ],
                    output_layers=["hidden"],
                )
            ],
            "GetServerInfo": lambda: [m.GetServerInfoRequest()],
            "Evaluate": lambda: [
                m.EvaluateRequest(
                    model_id="fz-base",
                    dataset_id="fz-data",
                    batch_size=4,
                    revision=1,
                    loss="mse",
                    metrics=["mae"],
                    split=m.DATASET_SPLIT_TRAIN,
                    rescale=0.5,
                )
            ],
            "ReadWeights": lambda: [
                w.ReadWeightsRequest(
                    model_id="fz-base",
                    selector=selector(patterns=["*"], layer_range=selector_pb2.LayerRange(start=0)),
                    revision=1,
                    chunk_size_bytes=64 * 1024,
                )
            ],
            "WriteWeights": lambda: [
                w.WriteWeightsRequest(header=w.WriteWeightsHeader(model_id="fz-base", message="m")),
                w.WriteWeightsRequest(chunk=_chunk("logits/bias", bias)),
                w.WriteWeightsRequest(chunk=_chunk("hidden/bias", hidden, 0, 8)),
                w.WriteWeightsRequest(chunk=_chunk("", hidden, 8)),
            ],
            "ListRevisions": lambda: [w.ListRevisionsRequest(model_id="fz-base", page_size=2)],
            "GetRevision": lambda: [w.GetRevisionRequest(model_id="fz-base", revision=1)],
            "ApplyEdits": lambda: [
                w.ApplyEditsRequest(
                    model_id="fz-base",
                    message="m",
                    edits=[
                        edits.assign("logits/bias", bias),
                        edits.assign("hidden/kernel", np.ones((1, 2), np.float32), begin=[1, 1]),
                        edits.scale("logits/*", 1.5),
                        edits.add(selector(layers=["hidden"]), 0.1),
                        edits.add_noise("hidden/kernel", stddev=0.01, seed=1),
                        edits.clip("logits/kernel", min=-1.0, max=1.0),
                        edits.reinitialize("hidden/bias", "RandomNormal", seed=2, stddev=0.1),
                        edits.set_trainable("hidden/*", True),
                        edits.prune("hidden/kernel", 0.5),
                        edits.quantize("logits/kernel", bits=8),
                        edits.interpolate("fz-other", 0.5, selector="hidden/*"),
                        edits.task_vector("fz-other", "fz-victim", 0.5),
                        edits.copy_from("fz-other", selector="logits/bias", source_revision=1),
                        edits.replace_head(
                            "hidden", [edits.layer("Dense", units=2, activation="softmax")], seed=4
                        ),
                    ],
                )
            ],
            "DiffRevisions": lambda: [
                w.DiffRevisionsRequest(model_id="fz-base", from_revision=1, to_revision=0)
            ],
            "RevertModel": lambda: [w.RevertModelRequest(model_id="fz-base", to_revision=1, message="m")],
            "UploadDataset": lambda: [
                t.UploadDatasetRequest(
                    header=t.UploadDatasetHeader(
                        dataset_id="fz-up-data",
                        source=dataset_pb2.DatasetSource(format=dataset_pb2.DATASET_FORMAT_NPZ),
                        size_bytes=len(self.npz),
                    )
                ),
                *(t.UploadDatasetRequest(chunk=part) for part in _split(self.npz, 256)),
            ],
            "CreateDataset": lambda: [
                t.CreateDatasetRequest(
                    dataset_id="fz-new-data",
                    source=dataset_pb2.DatasetSource(format=dataset_pb2.DATASET_FORMAT_NPZ),
                    uri="fz.npz",
                )
            ],
            "GetDataset": lambda: [t.GetDatasetRequest(dataset_id="fz-data")],
            "ListDatasets": lambda: [t.ListDatasetsRequest(page_size=1)],
            "DeleteDataset": lambda: [t.DeleteDatasetRequest(dataset_id="fz-victim-data")],
            "CreateJob": lambda: [t.CreateJobRequest(spec=self.job_spec())],
            "GetJob": lambda: [t.GetJobRequest(job_id="fz-job")],
            "ListJobs": lambda: [t.ListJobsRequest(page_size=1)],
            "CancelJob": lambda: [t.CancelJobRequest(job_id="fz-job")],
            "WatchJob": lambda: [t.WatchJobRequest(job_id="fz-job", after_sequence=1)],
            "ListJobEvents": lambda: [t.ListJobEventsRequest(job_id="fz-job", page_size=3, after_sequence=1)],
        }

    # -- the properties -----------------------------------------------------------------

    def check(self, rpc: Rpc, frames: list[bytes]) -> grpc.StatusCode:
        """Call `rpc` with `frames` and assert every property; returns the code."""
        before = store_digest(self.store)
        outcome = call(self.channel, rpc, frames, CALL_TIMEOUT)
        counts = self.calls.setdefault(str(rpc), {})
        counts[outcome.code.name] = counts.get(outcome.code.name, 0) + 1
        note(f"{rpc}: {outcome.code.name} {outcome.reason} {outcome.details[:300]!r} (seed {SEED})")
        assert outcome.code not in FAILURE_CODES, (
            f"{rpc} answered {outcome.code.name}: {outcome.details[:500]}"
        )
        reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        if outcome.code == grpc.StatusCode.OK:
            self.restore()
            return outcome.code
        assert outcome.reason in REASONS, f"{rpc} answered {outcome.code.name} without a catalogued reason"
        assert outcome.reply_bytes <= MAX_ERROR_BYTES, f"{rpc}: a reply of {outcome.reply_bytes} bytes"
        assert str(self.store).encode() not in outcome.details.encode() + outcome.trailers, (
            f"{rpc}: the reply shows the store's absolute path"
        )
        changes = diff_digests(before, store_digest(self.store))
        assert not changes, f"{rpc} was refused ({outcome.reason}) yet changed the store: {changes[:20]}"
        return outcome.code


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    store = tmp_path_factory.mktemp("fuzz") / "store"
    handle, thread = _start_in_thread(store)
    world = World(handle, store)
    try:
        world.setup()
        yield world
    finally:
        world.close()
        _stop_in_thread(handle, thread)


def _fuzz(examples: int = EXAMPLES) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        configured = settings(
            max_examples=examples,
            deadline=None,
            derandomize=False,
            database=None,
            print_blob=True,
            suppress_health_check=list(HealthCheck),
        )(test)
        return seed(SEED)(configured)

    return decorate


def test_the_store_digest_sees_every_change_but_tmp(tmp_path: Path) -> None:
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "models" / "a" / "x.npy").write_bytes(b"1234")
    before = store_digest(tmp_path)
    (tmp_path / "tmp" / "upload-1").write_bytes(b"partial")
    assert diff_digests(before, store_digest(tmp_path)) == []
    (tmp_path / "models" / "a" / "x.npy").write_bytes(b"1235")  # same size, new content
    (tmp_path / "models" / "b").mkdir()
    assert diff_digests(before, store_digest(tmp_path)) == ["+ models/b/", "~ models/a/x.npy"]


def test_every_rpc_has_a_valid_request(world: World) -> None:
    names = {rpc.name for rpc in RPCS}
    assert len(RPCS) == len(names) >= 27
    assert {"ModelService", "WeightService", "TrainingService"} == {
        rpc.service.split(".")[-1] for rpc in RPCS
    }
    assert names == set(world.builders()), "every RPC needs a valid request in World.builders"


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_valid_requests_are_accepted(world: World, rpc: Rpc) -> None:
    frames = [message.SerializeToString() for message in world.valid(rpc)]
    outcome = call(world.channel, rpc, frames, CALL_TIMEOUT)
    assert outcome.code == grpc.StatusCode.OK or outcome.reason == "JOB_FINISHED", (
        f"{rpc}: {outcome.code.name} {outcome.reason} {outcome.details[:300]}"
    )
    world.restore()


def _generated(rpc: Rpc) -> st.SearchStrategy[list[bytes]]:
    """Requests from the descriptor, or raw bytes, or a stream of either."""
    one = st.one_of(
        messages(rpc.input).map(lambda message: message.SerializeToString()),
        st.binary(max_size=64),
    )
    return st.lists(one, max_size=5) if rpc.client_streaming else one.map(lambda frame: [frame])


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_generated_requests(world: World, rpc: Rpc) -> None:
    @_fuzz()
    @given(frames=_generated(rpc))
    def run(frames: list[bytes]) -> None:
        world.check(rpc, frames)

    run()


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_mutated_requests(world: World, rpc: Rpc) -> None:
    codes: list[grpc.StatusCode] = []

    @_fuzz()
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        frames, what = mutate_stream(data.draw, world.valid(rpc), rpc.client_streaming)
        note(f"mutation: {what}")
        codes.append(world.check(rpc, frames))

    run()
    assert codes, f"{rpc}: no example ran"


def test_the_server_is_healthy_after_the_fuzz(world: World) -> None:
    for rpc, counts in sorted(world.calls.items()):
        print(f"{rpc}: {dict(sorted(counts.items()))}")  # what the fuzz got back, with `-s`
    started = time.monotonic()
    reply = world.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert world.client.get_model("fz-base").model_id == "fz-base"
    assert time.monotonic() - started < 10
    assert not [p for p in (world.store / "tmp").iterdir()], "tmp/ holds leftovers after the fuzz"
