"""Container health probe: `grpc.health.v1.Health/Check` on this container's own server, TLS or not.

Exit 0 when the server answers SERVING, 1 otherwise. It reads the server's
own settings, so one command serves the image's HEALTHCHECK, Docker Compose
and Kubernetes exec probes (Kubernetes' native gRPC probe cannot speak TLS):

    python /opt/weightsmith/healthcheck.py

- `WEIGHTSMITH_ADDRESS`: the port to call, on 127.0.0.1 (default 50051).
- Without `WEIGHTSMITH_TLS_CERT`: a plaintext call.
- With it: TLS, trusting `WEIGHTSMITH_PROBE_CA` (default: `ca.crt` next to
  the server certificate, the layout of cert-manager and of
  `kubectl create secret generic --from-file`), checking the name
  `WEIGHTSMITH_PROBE_SERVER_NAME` (default `localhost`; the certificate
  must carry it). With `WEIGHTSMITH_TLS_CLIENT_CA` (mTLS) the probe presents
  `WEIGHTSMITH_PROBE_CERT`/`WEIGHTSMITH_PROBE_KEY`, by default the server's
  own pair (issue it for both server and client authentication).

`WEIGHTSMITH_PROBE_TIMEOUT`: seconds to wait for the answer (default 4).
Health needs no token. Only the standard library, grpcio and
grpcio-health-checking, which the server image has.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _credentials(environ: dict[str, str]) -> grpc.ChannelCredentials | None:
    cert = environ.get("WEIGHTSMITH_TLS_CERT", "")
    if not cert:
        return None
    ca = environ.get("WEIGHTSMITH_PROBE_CA") or str(Path(cert).parent / "ca.crt")
    own_key, own_cert = None, None
    if environ.get("WEIGHTSMITH_TLS_CLIENT_CA"):
        own_cert = Path(environ.get("WEIGHTSMITH_PROBE_CERT") or cert).read_bytes()
        own_key = Path(environ.get("WEIGHTSMITH_PROBE_KEY") or environ["WEIGHTSMITH_TLS_KEY"]).read_bytes()
    return grpc.ssl_channel_credentials(Path(ca).read_bytes(), own_key, own_cert)


def check(environ: dict[str, str], timeout: float = 4.0) -> bool:
    """Whether the server of these settings answers SERVING for service ""."""
    port = environ.get("WEIGHTSMITH_ADDRESS", "0.0.0.0:50051").rpartition(":")[2] or "50051"
    target = f"127.0.0.1:{port}"
    credentials = _credentials(environ)
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        name = environ.get("WEIGHTSMITH_PROBE_SERVER_NAME") or "localhost"
        channel = grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main() -> int:
    """Exit status of the probe: 0 SERVING, 1 anything else (printing why)."""
    try:
        serving = check(dict(os.environ), float(os.environ.get("WEIGHTSMITH_PROBE_TIMEOUT") or 4))
    except (grpc.RpcError, OSError, KeyError, ValueError) as exc:
        print(f"weightsmith health check failed: {exc}", file=sys.stderr)
        return 1
    if not serving:
        print("weightsmith is not SERVING", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
