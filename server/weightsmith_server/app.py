"""Start-up, wiring and shutdown of the gRPC server.

`create_server(config)` returns a started server (tests bind port 0 and read
the port back); `main()` is the `weightsmith-server` command, which also
installs signal handlers for a graceful stop.

Start-up does not wait for TensorFlow nor for the models. The server lists
the stored models from their files, starts, and reports SERVING: it accepts
every call. TensorFlow imports in a background thread meanwhile, then the
stored models load in the background, most recently committed first, as the
memory budget allows. A call that needs TensorFlow or a model not resident
yet waits for them (its first call may take the model's load). The health
service `weightsmith.models` says NOT_SERVING until that background restore
is over, then SERVING; it names no model, so it stays open under auth.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from weightsmith_server import logs, metrics
from weightsmith_server.api import model_servicer, training_servicer, weight_servicer
from weightsmith_server.api.auth import Authenticator, AuthInterceptor
from weightsmith_server.api.handlers import service_handler
from weightsmith_server.api.interceptors import ErrorInterceptor
from weightsmith_server.api.limits import RequestLimits
from weightsmith_server.api.status import MAX_ERROR_BYTES, hide_folder
from weightsmith_server.api.tls import bind
from weightsmith_server.config import Config, parse_config
from weightsmith_server.datasets import DatasetStore
from weightsmith_server.devices import Devices
from weightsmith_server.jobs.manager import JobManager
from weightsmith_server.limits import InputLimits
from weightsmith_server.models.local_host import LocalModelHost
from weightsmith_server.models.warmup import WARM_UPS
from weightsmith_server.operations.models import ModelOperations, SecuritySettings, ServerLimits
from weightsmith_server.operations.training import TrainingOperations
from weightsmith_server.operations.weights import WeightOperations
from weightsmith_server.principals import PrincipalTable, principals_for
from weightsmith_server.staging import staging_memory
from weightsmith_server.store import Store
from weightsmith_server.tf_import import BackgroundImport
from weightsmith_server.workers import Blocking

log = logging.getLogger("weightsmith_server")

SERVICE_NAMES = tuple(
    module.SERVICE.full_name for module in (model_servicer, weight_servicer, training_servicer)
)
# The health service that turns SERVING once the background restore of stored models is over.
MODELS_HEALTH = "weightsmith.models"


@dataclass
class RunningServer:
    """A started server and what a caller may need from it."""

    server: grpc.aio.Server
    port: int
    host: LocalModelHost
    health: health.aio.HealthServicer
    executor: ThreadPoolExecutor
    jobs: JobManager
    principals: PrincipalTable | None = None
    # The background restore of stored models (done: `weightsmith.models` is SERVING).
    restored: asyncio.Future[None] | None = None
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)

    async def stop(self, grace: float | None) -> None:
        """Stop accepting calls, let in-flight ones finish within `grace`, release.

        Running jobs stop at their next step and stay RUNNING: the next start
        resumes them from their last checkpoint. The background restore stops
        after the model it is loading, the background warm-up after the model
        it is tracing.
        """
        self.stopping.set()
        for name in ("", *SERVICE_NAMES, MODELS_HEALTH):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.restored is not None:
            await asyncio.gather(self.restored, return_exceptions=True)
        stopping_jobs = asyncio.get_running_loop().run_in_executor(None, self.jobs.stop)
        await self.server.stop(grace)
        await stopping_jobs
        self.executor.shutdown(wait=True, cancel_futures=True)
        # No trace may still run inside TensorFlow when the process finalizes.
        await asyncio.get_running_loop().run_in_executor(None, WARM_UPS.stop)
        if self.principals is not None:
            self.principals.close()


def _server_options(config: Config) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Twice the limit: ErrorInterceptor answers messages over it with details.
        ("grpc.max_receive_message_length", 2 * config.max_message_bytes),
        # Watch and weight streams can be long: keep idle connections alive.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


def server_limits(config: Config) -> ServerLimits:
    """Every bound the server enforces, as GetServerInfo reports them."""
    return ServerLimits(
        max_message_bytes=config.max_message_bytes,
        max_upload_bytes=config.max_upload_bytes,
        chunk_bytes=config.chunk_bytes,
        max_decompressed_bytes=config.max_decompressed_bytes,
        max_member_bytes=config.max_member_bytes,
        max_config_bytes=config.max_config_bytes,
        max_image_pixels=config.max_image_pixels,
        max_string_bytes=config.max_string_bytes,
        stream_idle_seconds=config.stream_idle_seconds,
        stream_deadline_seconds=config.stream_deadline_seconds,
        max_write_streams=config.max_write_streams,
        max_staging_bytes=config.max_staging_bytes,
        max_error_bytes=MAX_ERROR_BYTES,
        batch_max_size=config.batch_max_size,
        batch_wait_ms=config.batch_wait_ms,
    )


def input_limits(config: Config) -> InputLimits:
    """The bounds on what one input (archive, `.keras` file, image, config, string) may spend."""
    return InputLimits(
        max_decompressed_bytes=config.max_decompressed_bytes,
        max_member_bytes=config.max_member_bytes,
        max_config_bytes=config.max_config_bytes,
        max_image_pixels=config.max_image_pixels,
        max_string_bytes=config.max_string_bytes,
    )


def _error_interceptor(config: Config) -> ErrorInterceptor:
    """Statuses, message sizes, stream timeouts and the cap on concurrent write and upload streams."""
    return ErrorInterceptor(
        config.max_message_bytes,
        stream_idle_seconds=config.stream_idle_seconds,
        stream_deadline_seconds=config.stream_deadline_seconds,
        max_write_streams=config.max_write_streams,
        request_limits=RequestLimits.of(config.max_string_bytes, config.max_config_bytes),
    )


def _auth_interceptor(config: Config, principals: PrincipalTable | None) -> AuthInterceptor:
    """Authentication and scopes for every rpc of the contract (all callers are anonymous without a file)."""
    services = (model_servicer.SERVICE, weight_servicer.SERVICE, training_servicer.SERVICE)
    authenticator = Authenticator(principals, client_certificates=bool(config.tls_client_ca))
    return AuthInterceptor(authenticator, services)


def _security(config: Config, principals: PrincipalTable | None) -> SecuritySettings:
    return SecuritySettings(
        authentication=principals is not None,
        tls=bool(config.tls_cert),
        client_certificates=bool(config.tls_client_ca),
    )


def _service_handlers(
    models: ModelOperations, weights: WeightOperations, training: TrainingOperations, chunk_bytes: int
) -> tuple[grpc.GenericRpcHandler, ...]:
    """One handler per service of the contract, each serving every rpc of its service."""
    return (
        service_handler(model_servicer.SERVICE, model_servicer.ModelServicer(models)),
        service_handler(
            weight_servicer.SERVICE,
            weight_servicer.WeightServicer(weights, chunk_bytes),
            request_deserializers=weight_servicer.REQUEST_DESERIALIZERS,
            response_serializers=weight_servicer.RESPONSE_SERIALIZERS,
        ),
        service_handler(training_servicer.SERVICE, training_servicer.TrainingServicer(training)),
    )


async def _restore_in_background(
    host: LocalModelHost, health_servicer: health.aio.HealthServicer, stopping: threading.Event
) -> None:
    """Load the stored models (see `LocalModelHost.restore_stored`), then `weightsmith.models` SERVING."""
    try:
        await asyncio.get_running_loop().run_in_executor(None, host.restore_stored, stopping)
    except Exception:
        log.exception("the background restore failed; models load on their first use")
        raise
    if not stopping.is_set():
        await health_servicer.set(MODELS_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        log.info("background restore done: %d model(s) resident", sum(map(len, host.placements().values())))


async def create_server(config: Config) -> RunningServer:
    """Build, bind and start the server, list the store, then report SERVING at once.

    TensorFlow and the models load in the background (see the module's
    docstring); `RunningServer.restored` completes when the models have.
    """
    principals = principals_for(config)  # refuses an exposed address without auth
    store = Store(config.store)
    hide_folder(store.root)
    # Started once the server is SERVING, or earlier by the first call that needs it.
    tensorflow = BackgroundImport(functools.partial(Devices, config.device))
    executor = ThreadPoolExecutor(config.workers, thread_name_prefix="weightsmith-work")
    WARM_UPS.enabled = config.warm_up
    blocking = Blocking(executor)
    host = LocalModelHost(
        store,
        tensorflow.future,
        config.retain_revisions,
        config.memory_budget_bytes,
        start_devices=tensorflow.start,
    )
    datasets = DatasetStore(
        store.root,
        executor,
        allowed_roots=config.dataset_root_paths,
        max_upload_bytes=config.max_upload_bytes,
        limits=input_limits(config),
    )
    jobs = JobManager(store.root, host, datasets, runners=config.max_running_jobs)
    limits = server_limits(config)

    server = grpc.aio.server(
        interceptors=[_auth_interceptor(config, principals), _error_interceptor(config)],
        options=_server_options(config),
    )
    server.add_generic_rpc_handlers(
        _service_handlers(
            ModelOperations(
                host, datasets, blocking, limits, input_limits(config), security=_security(config, principals)
            ),
            WeightOperations(host, blocking, staging_memory(config.max_staging_bytes)),
            TrainingOperations(datasets, jobs),
            config.chunk_bytes,
        )
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    for name in ("", *SERVICE_NAMES, MODELS_HEALTH):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = bind(server, config)
    await blocking(host.index)  # no TensorFlow: the files of each stored model
    await server.start()
    await blocking(datasets.restore)
    # A RUNNING in-place job holds its model: that one model is loaded before SERVING.
    await blocking(jobs.restore)
    jobs.start()
    metrics.RESIDENT_MODELS.set_function(lambda: sum(len(ids) for ids in host.placements().values()))
    metrics.RESIDENT_BYTES.set_function(lambda: sum(host.resident_bytes().values()))
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    tensorflow.start()  # now, not before: its import would slow the start-up above down (the GIL)
    bound = config.address.rpartition(":")[0]
    log.info("weightsmith serving on %s:%d (store %s)", bound, port, store.root)
    if principals is not None:
        principals.watch()
    running = RunningServer(server, port, host, health_servicer, executor, jobs, principals)
    running.restored = asyncio.ensure_future(_restore_in_background(host, health_servicer, running.stopping))
    return running


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    running = await create_server(config)
    if config.metrics_address:
        metrics.serve(config.metrics_address)
        log.info("metrics on http://%s/metrics", config.metrics_address)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    failed: list[BaseException] = []

    def devices_known(devices: Future[Devices]) -> None:
        # A device policy this machine cannot meet (or TensorFlow failing) stops the server.
        error = devices.exception()
        if error is not None:
            failed.append(error)
            loop.call_soon_threadsafe(stopping.set)

    running.host.devices_future.add_done_callback(devices_known)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    if running.principals is not None:  # SIGHUP reloads the principals file, off the event loop
        loop.add_signal_handler(signal.SIGHUP, running.executor.submit, running.principals.reload)
    await stopping.wait()
    log.info("shutting down: finishing in-flight calls (up to %.0fs)", config.grace_seconds)
    await running.stop(config.grace_seconds)
    log.info("stopped")
    if failed:
        raise failed[0]


def main(argv: Sequence[str] | None = None) -> None:
    """The `weightsmith-server` command."""
    config = parse_config(argv)
    logs.configure(config.log_format, config.log_level)
    asyncio.run(serve(config))
