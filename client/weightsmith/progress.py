"""Progress bars over a job's events: `progress_bar` and `async_progress_bar`.

They render the `JobEvent`s of `watch_job` (or any iterable of them) as a
tqdm bar over training steps, with the loss, learning rate and throughput as
its postfix, and print a line per finished epoch, log line and final state.
tqdm is not a dependency of the client: install it with `pip install tqdm`.
It is imported on the first call, never by `import weightsmith`.

Example:

```python
import weightsmith
from weightsmith import jobs

with weightsmith.Client("127.0.0.1:50051") as client:
    job = client.create_job(jobs.spec("tiny", "toy", epochs=3, batch_size=32,
                                      optimizer=jobs.adam(1e-3),
                                      loss="sparse_categorical_crossentropy"))
    result = weightsmith.progress_bar(client.watch_job(job.job_id), total_epochs=3)
    print(result.revision if result is not None else client.get_job(job.job_id).error)
```
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Mapping
from typing import IO, Any

import numpy as np

from weightsmith.v1 import job_pb2

__all__ = ["async_progress_bar", "progress_bar"]

_ENDED_STATES = {
    job_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    job_pb2.JOB_STATE_FAILED: "failed",
    job_pb2.JOB_STATE_CANCELLED: "cancelled",
}
# An unset or unknown level prints as INFO, the level of the server's own notes.
_LOG_LEVELS = {
    job_pb2.LOG_LEVEL_DEBUG: "DEBUG",
    job_pb2.LOG_LEVEL_INFO: "INFO",
    job_pb2.LOG_LEVEL_WARNING: "WARNING",
    job_pb2.LOG_LEVEL_ERROR: "ERROR",
}


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(
            "Received a call to `progress_bar`, which needs tqdm, expected it installed; weightsmith "
            "does not depend on it. Install it with `pip install tqdm`."
        ) from exc
    return tqdm


def _check_total_epochs(total_epochs: int | None) -> int | None:
    if total_epochs is None:
        return None
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, (int, np.integer)) or total_epochs < 1:
        raise ValueError(
            f"Received an invalid `total_epochs`, expected a positive int (the job spec's `epochs`) "
            f"or None. Received: total_epochs={total_epochs!r}"
        )
    return int(total_epochs)


def _metrics(metrics: Mapping[str, float], prefix: str = "") -> list[str]:
    names = sorted(metrics, key=lambda name: (name != "loss", name))
    return [
        f"{name if not prefix or name.startswith(prefix) else prefix + name}={metrics[name]:.4g}"
        for name in names
    ]


class _Renderer:
    """Turns events into bar updates and printed lines; shared by both functions."""

    def __init__(self, total_epochs: int | None, file: IO[str] | None) -> None:
        self._total_epochs = _check_total_epochs(total_epochs)
        self._tqdm = _tqdm()
        self._file = file
        self._bar = self._tqdm(total=None, unit="step", file=file, dynamic_ncols=True, desc="waiting")
        self.result: job_pb2.JobResult | None = None

    def _write(self, line: str) -> None:
        self._tqdm.write(line, file=self._file)

    def _epoch(self, epoch: int) -> str:
        return f"epoch {epoch}/{self._total_epochs}" if self._total_epochs else f"epoch {epoch}"

    def add(self, event: job_pb2.JobEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "progress":
            progress = event.progress
            if self._total_epochs and progress.steps_per_epoch:
                total = progress.steps_per_epoch * self._total_epochs
                if self._bar.total != total:
                    self._bar.total = total
            self._bar.set_description(self._epoch(progress.epoch), refresh=False)
            self._bar.set_postfix(
                {
                    "loss": f"{progress.loss:.4f}",
                    "lr": f"{progress.learning_rate:.3g}",
                    "samples/s": f"{progress.samples_per_second:.1f}",
                },
                refresh=False,
            )
            # A job resumed from a checkpoint may step back: then set, not add.
            delta = progress.global_step - self._bar.n
            if delta >= 0:
                self._bar.update(delta)
            else:
                self._bar.n = progress.global_step
                self._bar.refresh()
        elif kind == "epoch_ended":
            ended = event.epoch_ended
            parts = _metrics(ended.train_metrics) + _metrics(ended.validation_metrics, "val_")
            self._write(f"{self._epoch(ended.epoch)}: {' '.join(parts)}")
        elif kind == "state_changed":
            changed = event.state_changed
            if changed.state == job_pb2.JOB_STATE_RUNNING:
                self._bar.set_description("running")
            if changed.state in _ENDED_STATES or changed.detail:
                name = (
                    _ENDED_STATES.get(changed.state)
                    or job_pb2.JobState.Name(changed.state).removeprefix("JOB_STATE_").lower()
                )
                self._write(f"job {name}" + (f": {changed.detail}" if changed.detail else ""))
        elif kind == "log":
            self._write(f"{_LOG_LEVELS.get(event.log.level, 'INFO')}: {event.log.message}")
        elif kind == "result":
            result = event.result
            self.result = result
            if result.steps_completed > self._bar.n:
                self._bar.update(result.steps_completed - self._bar.n)
            self._write(
                f"result: {result.model_id} revision {result.revision} after "
                f"{result.epochs_completed} epochs: {' '.join(_metrics(result.metrics))}"
            )

    def close(self) -> None:
        self._bar.close()


def progress_bar(
    events: Iterable[job_pb2.JobEvent],
    *,
    total_epochs: int | None = None,
    file: IO[str] | None = None,
) -> job_pb2.JobResult | None:
    """Render a job's events as a tqdm progress bar until they end.

    The bar counts training steps (`StepProgress.global_step`) out of
    `steps_per_epoch * total_epochs`, with the running loss, the learning
    rate and samples per second as its postfix; each finished epoch, log
    line, failure and the result are printed above it with `tqdm.write`
    (to `file`, or stdout).

    Args:
        events: The events, usually `client.watch_job(job_id)`.
        total_epochs: The job's `epochs`, for the bar's total and percentage;
            None for a bar without a total.
        file: Where to draw; tqdm's default (stderr) when None.

    Returns:
        The job's `JobResult` (its last `result` event), or None when the
        events ended without one (the job failed or was cancelled).

    Raises:
        ImportError: tqdm is not installed (`pip install tqdm`).

    Example:

    ```python
    result = weightsmith.progress_bar(client.watch_job(job.job_id), total_epochs=5)
    ```
    """
    renderer = _Renderer(total_epochs, file)
    try:
        for event in events:
            renderer.add(event)
    finally:
        renderer.close()
    return renderer.result


async def async_progress_bar(
    events: AsyncIterable[job_pb2.JobEvent],
    *,
    total_epochs: int | None = None,
    file: IO[str] | None = None,
) -> job_pb2.JobResult | None:
    """Render a job's events as a tqdm progress bar until they end; `progress_bar` for async iterables.

    Args:
        events: The events, usually `client.watch_job(job_id)` of an `AsyncClient`.
        total_epochs: The job's `epochs`, for the bar's total and percentage;
            None for a bar without a total.
        file: Where to draw; tqdm's default (stderr) when None.

    Returns:
        The job's `JobResult`, or None when the events ended without one.

    Raises:
        ImportError: tqdm is not installed (`pip install tqdm`).

    Example:

    ```python
    result = await weightsmith.async_progress_bar(client.watch_job(job.job_id), total_epochs=5)
    ```
    """
    renderer = _Renderer(total_epochs, file)
    try:
        async for event in events:
            renderer.add(event)
    finally:
        renderer.close()
    return renderer.result
