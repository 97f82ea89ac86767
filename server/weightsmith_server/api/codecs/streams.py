"""Client streams: the header that opens them, and the payload messages after it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from weightsmith.v1 import weight_service_pb2
from weightsmith.wire import ChunkView
from weightsmith_server.api.codecs.tensors import MalformedMessage
from weightsmith_server.errors import InvalidArgument


async def header(requests: AsyncIterator[Any], what: str) -> Any:
    """The header of a stream whose first message must carry it in its `header` field."""
    first = await anext(aiter(requests), None)
    if not hasattr(first, "WhichOneof") or first.WhichOneof("payload") != "header":
        raise InvalidArgument(
            f"The first message of {what} must be the header.", reason="MISSING_HEADER", field="header"
        )
    return first.header


async def upload_chunks(requests: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """The file bytes of an upload stream after its header."""
    async for request in requests:
        if request.WhichOneof("payload") != "chunk":
            raise InvalidArgument(
                "Received a second header; an upload has one header, then file chunks.",
                reason="UNEXPECTED_HEADER",
                field="header",
            )
        yield request.chunk


async def write_chunks(
    requests: AsyncIterator[ChunkView | weight_service_pb2.WriteWeightsRequest | MalformedMessage],
) -> AsyncIterator[ChunkView]:
    """The tensor chunks of a WriteWeights stream after its header."""
    index = 0
    async for request in requests:
        if isinstance(request, MalformedMessage):
            raise InvalidArgument(
                f"Received a malformed message: {request.problem}.",
                reason="MALFORMED_CHUNK",
                field=f"chunks[{index}]",
            )
        if not isinstance(request, ChunkView):
            raise InvalidArgument(
                "Received a message that is not a tensor chunk after the header (a second "
                "header, or a malformed message).",
                reason="UNEXPECTED_MESSAGE",
                field=f"chunks[{index}]",
            )
        index += 1
        yield request
