"""WeightService: decode the request, await one weight operation, encode the answer.

ReadWeights and WriteWeights move tensors through the zero-copy chunk codec
(`weightsmith.wire`): their (de)serializers are swapped in at registration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from weightsmith import wire
from weightsmith.v1 import weight_service_pb2 as pb
from weightsmith_server.api.codecs import edits as edit_codecs
from weightsmith_server.api.codecs import revisions as codecs
from weightsmith_server.api.codecs import streams, tensors
from weightsmith_server.api.codecs.selectors import selector
from weightsmith_server.api.identity import author
from weightsmith_server.operations.weights import WeightOperations

SERVICE = pb.DESCRIPTOR.services_by_name["WeightService"]
REQUEST_DESERIALIZERS = {"WriteWeights": tensors.parse_write_request}
RESPONSE_SERIALIZERS = {"ReadWeights": tensors.serialize_read_response}


def _expected(message: object) -> int | None:
    return message.expected_revision if message.HasField("expected_revision") else None  # type: ignore[attr-defined]


class WeightServicer:
    """Read and write weights, edit them, and walk and restore their history."""

    def __init__(self, operations: WeightOperations, chunk_bytes: int) -> None:
        self._weights = operations
        self._chunk_bytes = chunk_bytes

    async def ReadWeights(
        self, request: pb.ReadWeightsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        chunk_bytes = tensors.chunk_size(request.chunk_size_bytes, self._chunk_bytes)
        revision, arrays = await self._weights.read_weights(
            request.model_id, selector(request.selector), request.revision
        )
        for path, array in arrays:
            for message in tensors.encode_read_chunks(path, array, chunk_bytes, revision):
                yield message

    async def WriteWeights(
        self,
        request_iterator: AsyncIterator[wire.ChunkView | pb.WriteWeightsRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.WriteWeightsResponse:
        header = await streams.header(request_iterator, "a weight write")
        record = await self._weights.write_weights(
            header.model_id,
            streams.write_chunks(request_iterator),
            expected_revision=_expected(header),
            message=header.message,
            allow_non_finite=header.allow_non_finite,
            author=author(context),
        )
        return pb.WriteWeightsResponse(revision=codecs.revision(record))

    async def ListRevisions(
        self, request: pb.ListRevisionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRevisionsResponse:
        records, token = await self._weights.list_revisions(
            request.model_id, request.page_size, request.page_token
        )
        return pb.ListRevisionsResponse(
            revisions=[codecs.revision(r) for r in records], next_page_token=token
        )

    async def GetRevision(
        self, request: pb.GetRevisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRevisionResponse:
        record = await self._weights.get_revision(request.model_id, request.revision)
        return pb.GetRevisionResponse(revision=codecs.revision(record))

    async def ApplyEdits(
        self, request: pb.ApplyEditsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyEditsResponse:
        record, reports = await self._weights.apply_edits(
            request.model_id,
            edit_codecs.edit_ops(request.edits),
            expected_revision=_expected(request),
            message=request.message,
            dry_run=request.dry_run,
            author=author(context),
        )
        return pb.ApplyEditsResponse(
            revision=codecs.revision(record) if record is not None else None,
            results=[codecs.edit_result(r) for r in reports],
        )

    async def DiffRevisions(
        self, request: pb.DiffRevisionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DiffRevisionsResponse:
        return codecs.diff(
            await self._weights.diff_revisions(request.model_id, request.from_revision, request.to_revision)
        )

    async def RevertModel(
        self, request: pb.RevertModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevertModelResponse:
        record = await self._weights.revert(
            request.model_id,
            request.to_revision,
            expected_revision=_expected(request),
            message=request.message,
            author=author(context),
        )
        return pb.RevertModelResponse(revision=codecs.revision(record))
