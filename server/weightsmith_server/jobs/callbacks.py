"""The Keras callback through which a training run reports progress and hears stop requests.

It stays cheap per step: between progress reports a step costs one counter
increment and one stop check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from weightsmith_server.jobs.events import EpochEnded, StepProgress
from weightsmith_server.jobs.spec import TrainingSpec
from weightsmith_server.jobs.training import JobStopped, Reporter

_NON_FINITE = "the loss became NaN or infinite; lower the learning rate or check the data"


def rate_at(rate: Any, step: int) -> float:
    """The learning rate used by the optimizer step `step` (counted from 0)."""
    return float(rate) if isinstance(rate, float) else float(keras.ops.convert_to_numpy(rate(step)))


def _scalars(logs: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}


class JobProgress(keras.callbacks.Callback):
    """Reports progress and epoch ends, checkpoints, and stops training when asked.

    A stop request raises `JobStopped` out of `fit` at the next step (no
    validation pass or epoch end for the partial epoch); a non-finite loss
    raises `FloatingPointError` on the step that reports it.

    Args:
        reporter: Where events go and stop requests come from.
        spec: The job's spec (progress and checkpoint intervals, epochs, batch size).
        steps_per_epoch: Batches in one epoch.
        rate: The learning rate: a float or a Keras schedule.
        global_step: Steps already done (a resumed job's checkpoint).
        checkpoint: Called with (epoch, global_step) at every checkpoint interval.
    """

    def __init__(
        self,
        reporter: Reporter,
        spec: TrainingSpec,
        steps_per_epoch: int,
        rate: Any,
        global_step: int,
        checkpoint: Callable[[int, int], None],
    ) -> None:
        super().__init__()
        self.reporter = reporter
        self.spec = spec
        self.steps_per_epoch = steps_per_epoch
        self.rate = rate
        self.global_step = global_step
        self.checkpoint = checkpoint
        self.epoch = 0
        self.last_logs: dict[str, float] = {}
        self._mark = (time.perf_counter(), global_step)
        self._started = self._mark

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.global_step += 1
        step = batch + 1
        if self.reporter.should_stop():
            raise JobStopped()
        if self.global_step % self.spec.progress_interval and step != self.steps_per_epoch:
            return
        self.reporter.emit(self._progress(step, _scalars(logs)))

    def _progress(self, step: int, scalars: dict[str, float]) -> StepProgress:
        loss = scalars.pop("loss", float("nan"))
        if not math.isfinite(loss):
            raise FloatingPointError(_NON_FINITE)
        now = time.perf_counter()
        then, steps_then = self._mark
        self._mark = (now, self.global_step)
        total = self.spec.epochs * self.steps_per_epoch
        per_step = (now - self._started[0]) / max(self.global_step - self._started[1], 1)
        return StepProgress(
            epoch=self.epoch,
            step=step,
            steps_per_epoch=self.steps_per_epoch,
            global_step=self.global_step,
            loss=loss,
            metrics=scalars,
            learning_rate=rate_at(self.rate, self.global_step - 1),
            samples_per_second=(self.global_step - steps_then) * self.spec.batch_size / max(now - then, 1e-9),
            eta_seconds=per_step * max(total - self.global_step, 0),
        )

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        scalars = _scalars(logs)
        self.last_logs = scalars
        if not math.isfinite(scalars.get("loss", 0.0)):
            raise FloatingPointError(_NON_FINITE)
        self.reporter.emit(
            EpochEnded(
                epoch=epoch + 1,
                train_metrics={k: v for k, v in scalars.items() if not k.startswith("val_")},
                validation_metrics={
                    k.removeprefix("val_"): v for k, v in scalars.items() if k.startswith("val_")
                },
            )
        )
        if (epoch + 1) % self.spec.checkpoint_interval == 0:
            self.checkpoint(epoch + 1, self.global_step)
