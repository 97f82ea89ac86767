"""weightsmith: read, write and version the weights of Keras models kept resident on a server.

The client needs only grpcio, protobuf and numpy; it never imports TensorFlow.
`Client` blocks, `AsyncClient` is its asyncio twin with the same methods.
Every failure raises a `WeightsmithError` subclass, one per gRPC status code,
carrying the server's field violations and reason; `ErrorReason` is the
documented catalog of those reasons. `weightsmith.edits` builds the typed
edits (scale, prune, quantize, interpolate, replace_head, ...) that
`apply_edits` commits as one revision. `weightsmith.jobs` builds fine-tuning
job specs for `create_job`; `progress_bar` renders `watch_job` with tqdm
(installed separately). `TLS` names the certificates of a TLS or mutual-TLS
channel; `token=` authenticates to a server started with `--auth-tokens`.

Example:

```python
import numpy as np
import weightsmith

with weightsmith.Client("127.0.0.1:50051") as client:
    client.create_model("tiny", architecture="MobileNetV3Small",
                        input_shape=[64, 64, 3], classes=5, seed=0)
    head = client.read_weights("tiny", weightsmith.Selector(layer_range=(-1, None)))
    client.write_weights("tiny", {p: a * 0.5 for p, a in head.items()},
                         message="halve the head")
    client.apply_edits("tiny", [weightsmith.edits.prune("*/kernel", 0.3)], message="prune")
    print(client.diff_revisions("tiny", 1).changed[0].path)

    x = np.random.rand(64, 64, 64, 3).astype(np.float32)
    client.upload_dataset({"x": x, "y": np.arange(64) % 5}, "toy")
    job = client.create_job(weightsmith.jobs.spec(
        "tiny", "toy", epochs=2, batch_size=16, optimizer=weightsmith.jobs.adam(1e-3),
        loss="sparse_categorical_crossentropy"))
    print(client.wait_job(job.job_id).result_revision)
```
"""

from weightsmith import edits, jobs
from weightsmith._async_client import AsyncClient
from weightsmith._tls import TLS
from weightsmith._types import PredictResult, Selector
from weightsmith.client import Client
from weightsmith.errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    WeightsmithError,
)
from weightsmith.progress import async_progress_bar, progress_bar
from weightsmith.v1.error_reason_pb2 import ErrorReason

__version__ = "0.1.0"

# Plain sorted order (tests/client/test_packaging.py), which puts `TLS` after `Selector`.
__all__ = [  # noqa: RUF022
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "CancelledError",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "ErrorReason",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PredictResult",
    "ResourceExhaustedError",
    "Selector",
    "TLS",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "WeightsmithError",
    "async_progress_bar",
    "edits",
    "jobs",
    "progress_bar",
]
