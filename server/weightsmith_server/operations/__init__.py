"""The application layer: one method per RPC, over the domain (KServe's DataPlane, TF Serving's ServerCore).

Servicers decode a request, await one operation and encode its result.
Operations know no protos; they move blocking domain work (TensorFlow,
disk) off the event loop and are where the domain packages meet:

- `models`: ModelService (create, upload, get, list, delete, export, predict, info, evaluate)
- `weights`: WeightService (read, write, history, edits, diff, revert)
- `training`: TrainingService (datasets and jobs)
"""
