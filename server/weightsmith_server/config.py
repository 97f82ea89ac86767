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

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * MIB

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
)


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
    if config.log_format not in ("text", "json"):
        parser.error(f"--log-format must be `text` or `json`, received {config.log_format!r}")
    return config
