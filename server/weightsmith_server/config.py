"""Server configuration from command-line flags and `WEIGHTSMITH_*` variables.

Each flag `--some-option` has the environment equivalent
`WEIGHTSMITH_SOME_OPTION`; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class Config:
    """Everything the server needs to start. Defaults suit a laptop."""

    address: str = "127.0.0.1:50051"
    store: Path = Path("weightsmith-data")
    device: str = "auto"
    max_message_mb: int = 64
    max_upload_mb: int = 4096
    chunk_kb: int = 2048
    workers: int = 8
    retain_revisions: int = 0
    dataset_roots: str = ""
    max_running_jobs: int = 1
    grace_seconds: float = 10.0
    metrics_address: str = ""
    log_format: str = "text"
    log_level: str = "INFO"
    # Trust boundary (issue 8).
    auth_tokens: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    insecure: bool = False
    # Bounds on what one input can make the server spend.
    max_decompressed_mb: int = 8192
    max_member_mb: int = 4096
    max_config_mb: int = 16
    max_image_pixels: int = 4_194_304
    max_string_bytes: int = 4096
    stream_idle_seconds: float = 60.0
    stream_deadline_seconds: float = 3600.0
    max_write_streams: int = 16
    max_staging_mb: int = 4096
    memory_budget_mb: int = 0
    # Dynamic batching of Predict (inference): the default policy of every model.
    batch_max_size: int = 32
    batch_wait_ms: float = 5.0
    # Background warm-up of each installed model's compiled Predict (models/warmup.py).
    warm_up: bool = True

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * MIB

    @property
    def max_decompressed_bytes(self) -> int:
        return self.max_decompressed_mb * MIB

    @property
    def max_member_bytes(self) -> int:
        return self.max_member_mb * MIB

    @property
    def max_config_bytes(self) -> int:
        return self.max_config_mb * MIB

    @property
    def max_staging_bytes(self) -> int:
        return self.max_staging_mb * MIB

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory_budget_mb * MIB

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_kb * 1024

    @property
    def dataset_root_paths(self) -> list[Path]:
        return [Path(p.strip()).resolve() for p in self.dataset_roots.split(",") if p.strip()]


_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("address", str, "host:port to listen on (port 0 picks a free port)"),
    ("store", Path, "root folder of the durable store"),
    ("device", str, "`auto` (GPUs when visible), `cpu`, `gpu`, or a list like `gpu:0,gpu:1`"),
    ("max-message-mb", int, "largest gRPC message sent or received, in MiB"),
    ("max-upload-mb", int, "largest `.keras` upload, in MiB"),
    ("chunk-kb", int, "size of the weight chunks the server sends, in KiB (64 to 4096)"),
    ("workers", int, "threads for blocking request work"),
    ("retain-revisions", int, "keep only the last N revisions of each model (0 keeps all)"),
    (
        "dataset-roots",
        str,
        "comma-separated folders CreateDataset may read from (besides the store's imports/)",
    ),
    ("max-running-jobs", int, "jobs that train at the same time (one per device is the sensible most)"),
    ("grace-seconds", float, "how long SIGTERM waits for in-flight calls"),
    ("metrics-address", str, "host:port of the Prometheus endpoint; empty disables it"),
    ("log-format", str, "`text` or `json`"),
    ("log-level", str, "DEBUG, INFO, WARNING or ERROR"),
    ("auth-tokens", str, "JSON principals file (tokens as SHA-256, scopes, model patterns); empty: no auth"),
    ("tls-cert", str, "PEM server certificate chain; with --tls-key the server speaks TLS only"),
    ("tls-key", str, "PEM private key of --tls-cert"),
    ("tls-client-ca", str, "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"),
    ("insecure", bool, "allow a non-loopback address without authentication (warns at every start)"),
    ("max-decompressed-mb", int, "total decompressed bytes of one archive or `.keras` file, in MiB"),
    ("max-member-mb", int, "largest single member of an archive or `.keras` file, in MiB"),
    ("max-config-mb", int, "largest Keras model config (JSON), in MiB"),
    ("max-image-pixels", int, "largest decoded image or resize target, in pixels (height x width)"),
    ("max-string-bytes", int, "largest string field of a request (ids, messages, names), in bytes"),
    ("stream-idle-seconds", float, "a client stream silent this long is closed"),
    ("stream-deadline-seconds", float, "longest a client stream (upload, write) may stay open"),
    ("max-write-streams", int, "concurrent WriteWeights and upload streams"),
    ("max-staging-mb", int, "memory held by in-flight writes and uploads together, in MiB"),
    ("memory-budget-mb", int, "memory per device for resident models, in MiB (0: automatic)"),
    # Dynamic batching of Predict (inference).
    ("batch-max-size", int, "rows concurrent Predicts on one model may be batched into (1: no batching)"),
    (
        "batch-wait-ms",
        float,
        "under load, how long a next Predict batch not yet full may wait for more calls, in ms "
        "(also at most a quarter of the last batch's run time; a lone call never waits; 0: off)",
    ),
    # Background warm-up (models/warmup.py).
    (
        "warm-up",
        bool,
        "trace and run each installed model's compiled Predict once in the background, so the first "
        "Predict does not (costs memory per resident model; --no-warm-up: the first Predict traces)",
    ),
)


def _truthy(value: object) -> bool:
    """A boolean from a default or an environment string (`1`, `true`, `yes`, `on`)."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build a `Config`: defaults, overridden by the environment, then by flags."""
    environ = os.environ if environ is None else environ
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="weightsmith-server",
        description="Serve Keras models for remote weight reads, writes and edits.",
    )
    for flag, kind, help_text in _FLAGS:
        attribute = flag.replace("-", "_")
        env_name = f"WEIGHTSMITH_{attribute.upper()}"
        default = environ.get(env_name, getattr(defaults, attribute))
        if kind is bool:
            parser.add_argument(
                f"--{flag}",
                action=argparse.BooleanOptionalAction,
                default=_truthy(default),
                help=f"{help_text} (env {env_name}=1; default: %(default)s)",
            )
            continue
        parser.add_argument(
            f"--{flag}",
            type=kind,
            default=kind(default),
            help=f"{help_text} (env {env_name}; default: %(default)s)",
        )
    args = parser.parse_args(argv)
    config = Config(**{f.replace("-", "_"): getattr(args, f.replace("-", "_")) for f, _, _ in _FLAGS})
    if not 64 <= config.chunk_kb <= 4096:
        parser.error(f"--chunk-kb must be between 64 and 4096, received {config.chunk_kb}")
    if config.max_message_mb < 5:
        parser.error(f"--max-message-mb must be at least 5, received {config.max_message_mb}")
    if config.max_running_jobs < 1:
        parser.error(f"--max-running-jobs must be at least 1, received {config.max_running_jobs}")
    if config.retain_revisions < 0:
        parser.error(f"--retain-revisions must be 0 or more, received {config.retain_revisions}")
    for name in (
        "max_decompressed_mb",
        "max_member_mb",
        "max_config_mb",
        "max_image_pixels",
        "max_string_bytes",
        "max_write_streams",
        "max_staging_mb",
    ):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, received {getattr(config, name)}")
    for name in ("stream_idle_seconds", "stream_deadline_seconds"):
        if getattr(config, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, received {getattr(config, name)}")
    if config.batch_max_size < 1 or not 0 <= config.batch_wait_ms <= 1000:
        parser.error(
            f"--batch-max-size must be at least 1 and --batch-wait-ms 0 to 1000, received "
            f"{config.batch_max_size} and {config.batch_wait_ms}"
        )
    if config.memory_budget_mb < 0:
        parser.error(f"--memory-budget-mb must be 0 (automatic) or more, received {config.memory_budget_mb}")
    if bool(config.tls_cert) != bool(config.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if config.log_format not in ("text", "json"):
        parser.error(f"--log-format must be `text` or `json`, received {config.log_format!r}")
    return config
