"""The README quickstart as a program: create, read, write back scaled, predict.

python examples/quickstart.py                  # against a server on 127.0.0.1:50051
python examples/quickstart.py --spawn-server   # starts one on a free port first
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

import weightsmith


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with status {process.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise SystemExit("the server did not become ready in time")


def run(target: str) -> None:
    with weightsmith.Client(target) as client:
        model = client.create_model(
            "", architecture="MobileNetV2", include_top=False, input_shape=(96, 96, 3), pooling="avg", seed=0
        )
        print(f"created {model.model_id}: {model.parameter_count:,} parameters on {model.device}")
        kernel = client.read_weights(model.model_id, "Conv1/kernel")["Conv1/kernel"]
        revision = client.write_weights(
            model.model_id, {"Conv1/kernel": kernel * 0.5}, expected_revision=1, message="halve the stem"
        )
        print(f"revision {revision.revision}: {revision.summary}")
        images = np.random.default_rng(0).random((2, 96, 96, 3), dtype=np.float32)
        result = client.predict(model.model_id, images)
        for name, output in result.outputs.items():
            print(f"predict -> {name}: shape {output.shape} at revision {result.revision}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--spawn-server", action="store_true", help="start a server on a free port first")
    args = parser.parse_args()
    if not args.spawn_server:
        run(args.target)
        return
    target = f"127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory() as store:
        process = subprocess.Popen(
            [sys.executable, "-m", "weightsmith_server", "--address", target, "--store", store]
        )
        try:
            _wait_serving(target, process)
            run(target)
        finally:
            process.terminate()
            process.wait(60)


if __name__ == "__main__":
    main()
