"""Prometheus metrics, served over HTTP when `--metrics-address` is set."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPCS = Counter("weightsmith_rpcs", "RPCs finished, by method and status code.", ["method", "code"])
RPC_SECONDS = Histogram(
    "weightsmith_rpc_seconds",
    "RPC handling time in seconds, by method.",
    ["method"],
    buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0, 60.0, 600.0),
)
RESIDENT_MODELS = Gauge("weightsmith_resident_models", "Models held in memory.")
RESIDENT_BYTES = Gauge("weightsmith_resident_weight_bytes", "Bytes of weights held in memory.")
LRU_UNLOADS = Counter(
    "weightsmith_model_unloads",
    "Least-recently-used idle models unloaded to keep a device within its memory budget, by device.",
    ["device"],
)


def serve(address: str) -> None:
    """Start the `/metrics` endpoint on `host:port` in a background thread."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1")
