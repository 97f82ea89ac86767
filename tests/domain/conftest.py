"""Fixtures of the domain tests: a DatasetStore on a fresh root, its executor and an allowed folder."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from datasets_support import MAX_UPLOAD

from weightsmith_server.datasets import DatasetStore


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    folder = tmp_path / "allowed"
    folder.mkdir()
    return folder


@pytest.fixture
def store(tmp_path: Path, executor: ThreadPoolExecutor, allowed: Path) -> DatasetStore:
    datasets = DatasetStore(
        tmp_path / "store", executor, allowed_roots=[allowed], max_upload_bytes=MAX_UPLOAD
    )
    datasets.restore()
    return datasets
