"""Resident models, reached only through the model host seam.

- `host`: `ModelHost`, the interface every caller uses (operations, edits,
  jobs, revisions); where a model lives is the host's business
- `local_host`: `LocalModelHost`, models in this process
- `resident`: one model in memory, its committed state and its locks
- `budget`: the memory budget per device and the least-recently-used idle
  models that make room (the host unloads them)
- `creation`: building a new model (catalog, config, upload, job output)
- `inference`: Predict on a committed state
- `description`: what GetModel reports
- `architecture`: Keras models from the catalog, configs and `.keras` files
- `export`: `.keras` files and SavedModel tars
"""
