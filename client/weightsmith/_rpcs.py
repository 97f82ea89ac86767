"""The RPCs the client calls: path, streaming shape, response decoding, retry policy.

One `Rpc` per method of the three services, read from the generated
descriptors so the shapes cannot drift from the protos. The transports build
their multicallables from these; the channel's retry policy lists the ones
marked `retried`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from weightsmith._streams import parse_read_weights_response
from weightsmith.v1 import model_service_pb2, training_service_pb2, weight_service_pb2

_MODELS = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]
_WEIGHTS = weight_service_pb2.DESCRIPTOR.services_by_name["WeightService"]
_TRAINING = training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"]
MODEL_SERVICE = _MODELS.full_name
WEIGHT_SERVICE = _WEIGHTS.full_name
TRAINING_SERVICE = _TRAINING.full_name


@dataclass(frozen=True)
class Rpc:
    """One method of a service, as the transports call it.

    Attributes:
        service: The service's full name, `weightsmith.v1.ModelService`.
        method: The method's name, `GetModel`.
        request_streams: The client sends a stream of requests.
        response_streams: The server answers with a stream of responses.
        deserialize: Parses one response message.
        retried: Retried on UNAVAILABLE by the channel: reads only, since
            replaying a mutation could commit it twice.
    """

    service: str
    method: str
    request_streams: bool
    response_streams: bool
    deserialize: Callable[[bytes], Any]
    retried: bool

    @property
    def path(self) -> str:
        """The HTTP/2 path of the method, `/weightsmith.v1.ModelService/GetModel`."""
        return f"/{self.service}/{self.method}"

    @property
    def streams(self) -> bool:
        """Whether either side streams; such calls get the client's `stream_timeout`."""
        return self.request_streams or self.response_streams


def _rpc(
    service: ServiceDescriptor,
    method: str,
    *,
    retried: bool = False,
    deserialize: Callable[[bytes], Any] | None = None,
) -> Rpc:
    descriptor = service.methods_by_name[method]
    response: type[Message] = message_factory.GetMessageClass(descriptor.output_type)
    return Rpc(
        service=service.full_name,
        method=method,
        request_streams=descriptor.client_streaming,
        response_streams=descriptor.server_streaming,
        deserialize=deserialize or response.FromString,
        retried=retried,
    )


def serialize_request(message: Message | bytes) -> bytes:
    """Serialize a request; the WriteWeights chunks arrive already encoded by `weightsmith.wire`."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


CREATE_MODEL = _rpc(_MODELS, "CreateModel")
UPLOAD_MODEL = _rpc(_MODELS, "UploadModel")
GET_MODEL = _rpc(_MODELS, "GetModel", retried=True)
LIST_MODELS = _rpc(_MODELS, "ListModels", retried=True)
UPDATE_MODEL = _rpc(_MODELS, "UpdateModel")
DELETE_MODEL = _rpc(_MODELS, "DeleteModel")
EXPORT_MODEL = _rpc(_MODELS, "ExportModel")
PREDICT = _rpc(_MODELS, "Predict", retried=True)
GET_SERVER_INFO = _rpc(_MODELS, "GetServerInfo", retried=True)
EVALUATE = _rpc(_MODELS, "Evaluate", retried=True)

# The weight streams bypass the generated message classes on the hot path:
# chunks are parsed as views and written pre-encoded (`weightsmith.wire`).
READ_WEIGHTS = _rpc(_WEIGHTS, "ReadWeights", retried=True, deserialize=parse_read_weights_response)
WRITE_WEIGHTS = _rpc(_WEIGHTS, "WriteWeights")
LIST_REVISIONS = _rpc(_WEIGHTS, "ListRevisions", retried=True)
GET_REVISION = _rpc(_WEIGHTS, "GetRevision", retried=True)
APPLY_EDITS = _rpc(_WEIGHTS, "ApplyEdits")
DIFF_REVISIONS = _rpc(_WEIGHTS, "DiffRevisions", retried=True)
REVERT_MODEL = _rpc(_WEIGHTS, "RevertModel")

UPLOAD_DATASET = _rpc(_TRAINING, "UploadDataset")
CREATE_DATASET = _rpc(_TRAINING, "CreateDataset")
GET_DATASET = _rpc(_TRAINING, "GetDataset", retried=True)
LIST_DATASETS = _rpc(_TRAINING, "ListDatasets", retried=True)
DELETE_DATASET = _rpc(_TRAINING, "DeleteDataset")
CREATE_JOB = _rpc(_TRAINING, "CreateJob")
GET_JOB = _rpc(_TRAINING, "GetJob", retried=True)
LIST_JOBS = _rpc(_TRAINING, "ListJobs", retried=True)
CANCEL_JOB = _rpc(_TRAINING, "CancelJob")
# Not retried by the channel: `watch_job` reconnects itself from the last event seen.
WATCH_JOB = _rpc(_TRAINING, "WatchJob")
LIST_JOB_EVENTS = _rpc(_TRAINING, "ListJobEvents", retried=True)

ALL_RPCS: tuple[Rpc, ...] = tuple(value for value in list(globals().values()) if isinstance(value, Rpc))
RETRIED_METHODS: tuple[tuple[str, str], ...] = tuple((r.service, r.method) for r in ALL_RPCS if r.retried)
