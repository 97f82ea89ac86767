"""WeightService: weight streams and revision history.

ReadWeights and WriteWeights are registered with the zero-copy chunk codec
(`tensors.serialize_read_response`, `tensors.parse_write_request`) instead of
the generated message classes; the bytes on the wire are the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from weightsmith import _wire
from weightsmith.v1 import weight_service_pb2, weight_service_pb2_grpc
from weightsmith_server import revisions, tensors, weights
from weightsmith_server.api import convert
from weightsmith_server.edits.engine import apply_edits
from weightsmith_server.errors import InvalidArgument
from weightsmith_server.registry import Registry

SERVICE_NAME = "weightsmith.v1.WeightService"


class WeightServicer(weight_service_pb2_grpc.WeightServiceServicer):
    """Read and write weights; list and get revisions."""

    def __init__(self, registry: Registry, chunk_bytes: int) -> None:
        self._registry = registry
        self._chunk_bytes = chunk_bytes

    async def ReadWeights(
        self, request: weight_service_pb2.ReadWeightsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        chunk_bytes = _chunk_size(request.chunk_size_bytes, self._chunk_bytes)
        revision, arrays = await self._registry.read_weights(
            request.model_id, convert.selector(request.selector), request.revision
        )
        for path, array in arrays:
            for message in tensors.encode_read_chunks(path, array, chunk_bytes, revision):
                yield message

    async def WriteWeights(
        self,
        request_iterator: AsyncIterator[_wire.ChunkView | weight_service_pb2.WriteWeightsRequest],
        context: grpc.aio.ServicerContext,
    ) -> weight_service_pb2.WriteWeightsResponse:
        first = await anext(aiter(request_iterator), None)
        if (
            not isinstance(first, weight_service_pb2.WriteWeightsRequest)
            or first.WhichOneof("payload") != "header"
        ):
            raise InvalidArgument(
                "The first message of a weight write must be the header.",
                reason="MISSING_HEADER",
                field="header",
            )
        header = first.header
        record = await weights.write_weights(
            self._registry,
            header.model_id,
            expected_revision=header.expected_revision if header.HasField("expected_revision") else None,
            message=header.message,
            allow_non_finite=header.allow_non_finite,
            author=convert.author(context),
            chunks=convert.write_chunks(request_iterator),
        )
        return weight_service_pb2.WriteWeightsResponse(revision=convert.revision(record))

    async def ListRevisions(
        self, request: weight_service_pb2.ListRevisionsRequest, context: grpc.aio.ServicerContext
    ) -> weight_service_pb2.ListRevisionsResponse:
        records, token = self._registry.list_revisions(
            request.model_id, request.page_size, request.page_token
        )
        return weight_service_pb2.ListRevisionsResponse(
            revisions=[convert.revision(r) for r in records], next_page_token=token
        )

    async def GetRevision(
        self, request: weight_service_pb2.GetRevisionRequest, context: grpc.aio.ServicerContext
    ) -> weight_service_pb2.GetRevisionResponse:
        record = self._registry.get_revision(request.model_id, request.revision)
        return weight_service_pb2.GetRevisionResponse(revision=convert.revision(record))

    async def ApplyEdits(
        self, request: weight_service_pb2.ApplyEditsRequest, context: grpc.aio.ServicerContext
    ) -> weight_service_pb2.ApplyEditsResponse:
        record, reports = await apply_edits(
            self._registry,
            request.model_id,
            convert.edit_ops(request.edits),
            expected_revision=request.expected_revision if request.HasField("expected_revision") else None,
            message=request.message,
            dry_run=request.dry_run,
            author=convert.author(context),
        )
        return weight_service_pb2.ApplyEditsResponse(
            revision=convert.revision(record) if record is not None else None,
            results=[convert.edit_result(r) for r in reports],
        )

    async def DiffRevisions(
        self, request: weight_service_pb2.DiffRevisionsRequest, context: grpc.aio.ServicerContext
    ) -> weight_service_pb2.DiffRevisionsResponse:
        result = await revisions.diff(
            self._registry, request.model_id, request.from_revision, request.to_revision
        )
        return weight_service_pb2.DiffRevisionsResponse(
            from_revision=result.from_revision,
            to_revision=result.to_revision,
            changed=[convert.variable_diff(d) for d in result.changed],
            added=result.added,
            removed=result.removed,
            unchanged_count=result.unchanged_count,
            architecture_changed=result.architecture_changed,
        )

    async def RevertModel(
        self, request: weight_service_pb2.RevertModelRequest, context: grpc.aio.ServicerContext
    ) -> weight_service_pb2.RevertModelResponse:
        record = await revisions.revert(
            self._registry,
            request.model_id,
            request.to_revision,
            expected_revision=request.expected_revision if request.HasField("expected_revision") else None,
            message=request.message,
            author=convert.author(context),
        )
        return weight_service_pb2.RevertModelResponse(revision=convert.revision(record))


def _chunk_size(requested: int, default: int) -> int:
    if requested == 0:
        return default
    if not _wire.MIN_CHUNK_BYTES <= requested <= _wire.MAX_CHUNK_BYTES:
        raise InvalidArgument(
            f"Received chunk_size_bytes={requested}, expected 0 (server default) or "
            f"{_wire.MIN_CHUNK_BYTES} to {_wire.MAX_CHUNK_BYTES}.",
            reason="INVALID_CHUNK_SIZE",
            field="chunk_size_bytes",
        )
    return requested


def add_to_server(servicer: WeightServicer, server: grpc.aio.Server) -> None:
    """Register the service, with the chunk codec on its two streaming methods."""
    pb = weight_service_pb2
    handlers = {
        "ReadWeights": grpc.unary_stream_rpc_method_handler(
            servicer.ReadWeights,
            request_deserializer=pb.ReadWeightsRequest.FromString,
            response_serializer=tensors.serialize_read_response,
        ),
        "WriteWeights": grpc.stream_unary_rpc_method_handler(
            servicer.WriteWeights,
            request_deserializer=tensors.parse_write_request,
            response_serializer=pb.WriteWeightsResponse.SerializeToString,
        ),
    }
    for name, request, response in (
        ("ListRevisions", pb.ListRevisionsRequest, pb.ListRevisionsResponse),
        ("GetRevision", pb.GetRevisionRequest, pb.GetRevisionResponse),
        ("ApplyEdits", pb.ApplyEditsRequest, pb.ApplyEditsResponse),
        ("DiffRevisions", pb.DiffRevisionsRequest, pb.DiffRevisionsResponse),
        ("RevertModel", pb.RevertModelRequest, pb.RevertModelResponse),
    ):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
