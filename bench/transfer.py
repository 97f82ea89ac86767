"""Weight transfer throughput: ReadWeights / WriteWeights vs raw gRPC byte streams.

Both servers run as their own processes on loopback; the client is this
process. For a VGG16-sized model (553 MB, `weights=None`), each round times:

- raw download / upload of the same number of bytes with the same chunk
  size through a bare grpc.aio service with identity serializers;
- `Client.read_weights` (all variables, assembled into new numpy arrays),
  the same into the arrays of the previous read (`out=`, which saves the
  page faults of fresh memory), and `Client.write_weights` (all variables;
  the server validates, stages on disk, fsyncs, commits a revision and
  hands the values to the model).

A and B alternate for several rounds; the table gives the median ratio
weightsmith/raw and its spread (min-max). Results go to
bench/results/transfer.json.

    python bench/transfer.py [--rounds 5] [--architecture VGG16] [--chunk-kb 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
from harness import free_port, timed, weightsmith_server

import weightsmith

HERE = Path(__file__).resolve().parent


def _raw_download(channel: grpc.Channel, total: int, chunk: int) -> int:
    call = channel.unary_stream(
        "/bench.RawBytes/Download", request_serializer=lambda m: m, response_deserializer=lambda m: m
    )
    return sum(len(part) for part in call(f"{total}:{chunk}".encode()))


def _raw_upload(channel: grpc.Channel, total: int, chunk: int) -> int:
    call = channel.stream_unary(
        "/bench.RawBytes/Upload", request_serializer=lambda m: m, response_deserializer=lambda m: m
    )
    buffer = memoryview(bytes(total))

    def parts():
        for offset in range(0, total, chunk):
            yield bytes(buffer[offset : offset + chunk])

    return int(call(parts()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--architecture", default="VGG16")
    parser.add_argument("--chunk-kb", type=int, default=2048)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "transfer.json")
    args = parser.parse_args()
    chunk = args.chunk_kb * 1024

    raw_address = f"127.0.0.1:{free_port()}"
    with weightsmith_server("--chunk-kb", str(args.chunk_kb)) as (ws_address, _):
        raw = subprocess.Popen(
            [sys.executable, str(HERE / "raw_stream_server.py"), "--address", raw_address],
            stdout=subprocess.PIPE,
        )
        try:
            assert raw.stdout is not None and raw.stdout.readline().strip() == b"ready"
            rows = _measure(ws_address, raw_address, args.architecture, chunk, args.rounds)
        finally:
            raw.terminate()
            raw.wait(60)
    _report(rows, args)


def _measure(ws_address: str, raw_address: str, architecture: str, chunk: int, rounds: int) -> dict:
    with (
        weightsmith.Client(ws_address, timeout=600) as client,
        grpc.insecure_channel(
            raw_address,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        ) as raw,
    ):
        model = client.create_model("bench", architecture=architecture, seed=0)
        total = model.weight_bytes
        weights = client.read_weights("bench", chunk_size_bytes=chunk)  # warm-up, and data to write
        _raw_download(raw, total, chunk)
        reused = client.read_weights("bench", chunk_size_bytes=chunk)
        samples: dict[str, list[float]] = {
            k: [] for k in ("raw_read", "ws_read", "ws_read_out", "raw_write", "ws_write")
        }
        for _ in range(rounds):
            samples["raw_read"].append(timed(_raw_download, raw, total, chunk))
            samples["ws_read"].append(timed(lambda: client.read_weights("bench", chunk_size_bytes=chunk)))
            samples["ws_read_out"].append(
                timed(lambda: client.read_weights("bench", chunk_size_bytes=chunk, out=reused))
            )
            samples["raw_write"].append(timed(_raw_upload, raw, total, chunk))
            samples["ws_write"].append(
                timed(lambda: client.write_weights("bench", weights, chunk_size_bytes=chunk))
            )
        check = client.read_weights("bench")
        assert all(check[k].tobytes() == weights[k].tobytes() for k in weights), "round trip not bit-exact"
    return {"bytes": total, "chunk_bytes": chunk, "samples_s": samples}


def _report(rows: dict, args: argparse.Namespace) -> None:
    total = rows["bytes"]
    samples = rows["samples_s"]
    result = {
        "architecture": args.architecture,
        "bytes": total,
        "chunk_bytes": rows["chunk_bytes"],
        "rounds": args.rounds,
        "samples_s": samples,
        "ratios": {},
    }
    print(
        f"\n{args.architecture}: {total / 1e6:.0f} MB, chunks of {rows['chunk_bytes'] // 1024} KiB, "
        f"{args.rounds} alternating rounds\n"
    )
    print(f"{'direction':<12} {'raw GB/s':>9} {'weightsmith GB/s':>17} {'ratio (median)':>15} {'spread':>15}")
    for direction, raw_key, ws_key in (
        ("read", "raw_read", "ws_read"),
        ("read (out=)", "raw_read", "ws_read_out"),
        ("write", "raw_write", "ws_write"),
    ):
        raw_times = samples[raw_key]
        ws_times = samples[ws_key]
        ratios = [r / w for r, w in zip(raw_times, ws_times, strict=True)]
        median = statistics.median(ratios)
        result["ratios"][direction] = {"median": median, "min": min(ratios), "max": max(ratios)}
        print(
            f"{direction:<12} {total / statistics.median(raw_times) / 1e9:>9.2f} "
            f"{total / statistics.median(ws_times) / 1e9:>17.2f} {median:>15.2f} "
            f"{min(ratios):>7.2f}-{max(ratios):<7.2f}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
