"""A job survives kill -9 of its server: the restarted server resumes it from its checkpoint."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

import weightsmith
from tests.conftest import spawn_server
from tests.jobs_support import cnn_config, digits, digits_spec
from weightsmith.v1 import job_pb2


@pytest.mark.slow
def test_restart_resumes_a_running_job_from_its_checkpoint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = spawn_server(store)
    try:
        with weightsmith.Client(first.address) as client:
            client.create_model("digits", keras_config=cnn_config(), seed=0)
            dataset = client.upload_dataset(digits(0, 4, part="train"), "low")
            job = client.create_job(
                digits_spec("digits", "low", epochs=6, progress_every_steps=5), "resumable"
            )
            for event in client.watch_job(job.job_id):
                if event.HasField("checkpoint_saved") and event.checkpoint_saved.epoch == 2:
                    break
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(30)

    second = spawn_server(store)
    try:
        with weightsmith.Client(second.address) as client:
            done = client.wait_job("resumable", timeout=300)
            assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
            events = list(client.watch_job("resumable"))
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            resumed = [
                e for e in events if e.HasField("state_changed") and "resumed" in e.state_changed.detail
            ]
            assert len(resumed) == 1
            steps_per_epoch = int(np.ceil(dataset.example_count / 32))
            result = next(e.result for e in events if e.HasField("result"))
            assert result.epochs_completed == 6
            assert result.steps_completed == 6 * steps_per_epoch
            assert client.get_model("digits").revision == 2
    finally:
        second.process.send_signal(signal.SIGTERM)
        second.process.wait(60)
