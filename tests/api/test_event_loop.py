"""No blocking I/O on the event loop: file work and TensorFlow run on worker threads.

A server runs with asyncio's debug mode (slow callbacks are logged) while
file-system calls are watched: any made from the event loop's own thread is
a blocking call that would stall every other RPC. A representative call of
each kind goes through it.
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import weightsmith
from tests.conftest import ServerHandle, _start_in_thread, _stop_in_thread, tiny_config
from weightsmith import edits, jobs

WATCHED: list[tuple[Any, str]] = [
    (os, "fsync"),
    (os, "rename"),
    (os, "replace"),
    (os, "listdir"),
    (os, "scandir"),
    (os, "unlink"),
    (shutil, "rmtree"),
    (builtins, "open"),
    (io, "open"),
]


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "took" in message and "Executing" in message:
            self.messages.append(message)


@pytest.fixture
def watched_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ServerHandle, list[str], _SlowCallbacks]]:
    handle, thread = _start_in_thread(tmp_path / "store")
    assert handle.loop is not None
    loop_thread = thread
    blocking: list[str] = []

    def watch(owner: Any, name: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is loop_thread:
                blocking.append(f"{getattr(owner, '__name__', owner)}.{name}{args[:1]!r}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, guarded)

    for owner, name in WATCHED:
        watch(owner, name)

    def debug() -> None:
        handle.loop.set_debug(True)  # type: ignore[union-attr]
        handle.loop.slow_callback_duration = 0.5  # type: ignore[union-attr]

    handle.loop.call_soon_threadsafe(debug)
    slow = _SlowCallbacks()
    logging.getLogger("asyncio").addHandler(slow)
    try:
        yield handle, blocking, slow
    finally:
        logging.getLogger("asyncio").removeHandler(slow)
        monkeypatch.undo()
        _stop_in_thread(handle, thread)


def test_rpcs_do_no_blocking_io_on_the_event_loop(
    watched_server: tuple[ServerHandle, list[str], _SlowCallbacks], tmp_path: Path
) -> None:
    handle, blocking, slow = watched_server
    rng = np.random.default_rng(0)
    with weightsmith.Client(handle.address, author="tests") as client:
        client.create_model("loop", keras_config=tiny_config())
        client.get_model("loop")
        client.list_models()
        client.write_weights("loop", {"logits/bias": np.ones(2, np.float32)})
        client.read_weights("loop", "logits/*")
        client.read_weights("loop", "logits/bias", revision=1)
        client.apply_edits("loop", [edits.scale("logits/kernel", 0.5)])
        client.list_revisions("loop")
        client.get_revision("loop", 2)
        client.diff_revisions("loop", 1, 3)
        client.revert_model("loop", 1)
        client.predict("loop", np.zeros((1, 4), np.float32))
        export = tmp_path / "loop.keras"
        client.export_model("loop", path=export)
        client.upload_model(export, "uploaded")
        x = rng.normal(size=(32, 4)).astype(np.float32)
        y = rng.integers(0, 2, 32)
        dataset = client.upload_dataset({"x": x, "y": y}, "loop-data")
        client.get_dataset(dataset.dataset_id)
        client.list_datasets()
        job = client.create_job(
            jobs.spec(
                "loop",
                "loop-data",
                epochs=1,
                batch_size=8,
                optimizer=jobs.sgd(0.01),
                loss="sparse_categorical_crossentropy",
            )
        )
        client.wait_job(job.job_id, timeout=120)
        list(client.watch_job(job.job_id))
        client.list_job_events(job.job_id)
        client.list_jobs()
        client.evaluate("loop", "loop-data", loss="sparse_categorical_crossentropy")
        client.delete_model("uploaded")
        client.delete_dataset("loop-data")
    assert not blocking, f"blocking calls on the event loop: {blocking}"
    assert not slow.messages, f"slow callbacks on the event loop: {slow.messages}"
