"""Baseline for bench/transfer.py: raw bytes over grpc.aio, no protobuf at all.

`Download(total:chunk)` streams `total` bytes in `chunk`-sized messages sliced
from one buffer; `Upload` counts the bytes of a client stream. Identity
serializers: this is the fastest a Python gRPC stream of these sizes goes.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc

SERVICE = "bench.RawBytes"


async def download(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    total, chunk = (int(x) for x in request.decode().split(":"))
    buffer = memoryview(bytes(total))
    for offset in range(0, total, chunk):
        yield bytes(buffer[offset : offset + chunk])


async def upload(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    received = 0
    async for message in requests:
        received += len(message)
    return str(received).encode()


async def serve(address: str, max_message_bytes: int) -> None:
    identity = lambda data: data  # noqa: E731
    handlers = {
        "Download": grpc.unary_stream_rpc_method_handler(
            download, request_deserializer=identity, response_serializer=identity
        ),
        "Upload": grpc.stream_unary_rpc_method_handler(
            upload, request_deserializer=identity, response_serializer=identity
        ),
    }
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(address)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024)
    args = parser.parse_args()
    asyncio.run(serve(args.address, args.max_message_bytes))
