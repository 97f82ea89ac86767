"""Model files for download: `.keras`, or a TensorFlow SavedModel as a tar."""

from __future__ import annotations

import enum
import shutil
import tarfile
from pathlib import Path
from typing import Any


class ExportFormat(enum.StrEnum):
    """The file ExportModel streams."""

    KERAS = "keras"
    SAVED_MODEL = "saved_model"


def write_model(keras_model: Any, target: Path, file_format: ExportFormat) -> Path:
    """Write `keras_model` next to `target` in `file_format`; returns the file."""
    if file_format == ExportFormat.KERAS:
        path = target.with_suffix(".keras")
        keras_model.save(path)
        return path
    folder = target.with_suffix(".savedmodel")
    keras_model.export(str(folder), format="tf_saved_model", verbose=False)
    path = target.with_suffix(".tar")
    try:
        with tarfile.open(path, "w") as archive:
            archive.add(folder, arcname="saved_model")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path
