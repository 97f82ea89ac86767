"""The Keras callbacks of a run: progress, stop requests and checkpoints; resumable early stopping.

`JobProgress` stays cheap per step: between progress reports and
checkpoints a step costs a counter increment, a stop check and a clock read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from weightsmith_server.jobs.checkpoints import TrainingState, restore_metrics
from weightsmith_server.jobs.events import EpochEnded, StepProgress
from weightsmith_server.jobs.spec import EarlyStoppingSpec, TrainingSpec
from weightsmith_server.jobs.training import JobStopped, Reporter

_NON_FINITE = "the loss became NaN or infinite; lower the learning rate or check the data"


def rate_at(rate: Any, step: int) -> float:
    """The learning rate used by the optimizer step `step` (counted from 0)."""
    return float(rate) if isinstance(rate, float) else float(keras.ops.convert_to_numpy(rate(step)))


def _scalars(logs: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """`keras.callbacks.EarlyStopping` whose state survives a restart and spans several `fit` calls.

    Its state is reset once, when the run starts (or set from a checkpoint
    by `resume`), never by a later `fit`; the best weights are restored by
    `finish`, once, after the last `fit` (Keras does it at every `fit` end).
    """

    STATE = ("wait", "best", "best_epoch", "stopped_epoch")

    def __init__(self, spec: EarlyStoppingSpec) -> None:
        super().__init__(
            monitor=spec.monitor,
            patience=spec.patience,
            min_delta=spec.min_delta,
            restore_best_weights=spec.restore_best_weights,
        )
        super().on_train_begin()
        self._started = False

    def resume(self, state: dict[str, Any], best_weights: list[np.ndarray] | None) -> None:
        """Take the state of a checkpoint (`snapshot` and the best weights saved with it)."""
        for name in self.STATE:
            if name in state:
                setattr(self, name, state[name])
        self.best_weights = best_weights
        self._started = True

    def snapshot(self) -> dict[str, Any]:
        """The state a checkpoint keeps, as JSON values (the best weights go separately)."""
        return {
            name: None if getattr(self, name) is None else _number(getattr(self, name)) for name in self.STATE
        }

    def on_train_begin(self, logs: Any = None) -> None:
        if not self._started:
            super().on_train_begin(logs)
            self._started = True

    def on_train_end(self, logs: Any = None) -> None:
        pass  # `finish` restores the best weights, after the last `fit`

    def finish(self, model: Any) -> None:
        """Restore the best weights when the spec asks for it (what Keras does at a `fit` end)."""
        self.set_model(model)  # a run resumed after its last epoch calls no `fit`
        super().on_train_end()


def _number(value: Any) -> int | float:
    return int(value) if isinstance(value, int | np.integer) else float(value)


class JobProgress(keras.callbacks.Callback):
    """Reports progress and epoch ends, checkpoints, and stops training when asked.

    A stop request raises `JobStopped` out of `fit` at the next step (no
    validation pass or epoch end for the partial epoch); a non-finite loss
    raises `FloatingPointError` on the step that reports it. It must come
    after the early-stopping callback, so that an epoch's checkpoint holds
    that callback's state after the epoch.

    Checkpoints are written at epoch ends (every `checkpoint_interval`
    epochs) and inside epochs: every `checkpoint_every_steps` steps, or,
    when that is 0, once the last checkpoint is `checkpoint_seconds` old.

    Args:
        reporter: Where events go and stop requests come from.
        spec: The job's spec (progress and checkpoint intervals, epochs, batch size).
        steps_per_epoch: Batches in one epoch.
        rate: The learning rate: a float or a Keras schedule.
        state: Where the run starts (a resumed job's checkpoint state), with its seed.
        checkpoint: Called with the state reached and the early-stopping best weights.
        stopping: The run's early-stopping callback, if any.
        metrics: A partial epoch's metric accumulators, restored when it resumes.
        checkpoint_seconds: The age that triggers a checkpoint inside an epoch.
    """

    def __init__(
        self,
        reporter: Reporter,
        spec: TrainingSpec,
        steps_per_epoch: int,
        rate: Any,
        state: TrainingState,
        checkpoint: Callable[[TrainingState, list[np.ndarray] | None], None],
        *,
        stopping: ResumableEarlyStopping | None = None,
        metrics: list[np.ndarray] | None = None,
        checkpoint_seconds: float = math.inf,
    ) -> None:
        super().__init__()
        self.reporter = reporter
        self.spec = spec
        self.steps_per_epoch = steps_per_epoch
        self.rate = rate
        self.seed = state.seed
        self.global_step = state.global_step
        self.epochs_done = state.epoch
        self.checkpoint = checkpoint
        self.stopping = stopping
        self.epoch = state.epoch
        self.last_logs: dict[str, float] = dict(state.logs)
        self._offset = state.step  # steps of the first epoch done before a resume
        self._metrics = metrics
        self._checkpoint_seconds = checkpoint_seconds
        self._last_checkpoint = time.monotonic()
        self._mark = (time.perf_counter(), self.global_step)
        self._started = self._mark

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch + 1
        if self._metrics is not None:  # Keras has just reset them
            restore_metrics(self.model, self._metrics)
            self._metrics = None

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.global_step += 1
        step = self._offset + batch + 1
        if self.reporter.should_stop():
            raise JobStopped()
        every = self.spec.checkpoint_every_steps
        if step != self.steps_per_epoch and (
            self.global_step % every == 0
            if every
            else time.monotonic() - self._last_checkpoint >= self._checkpoint_seconds
        ):
            self._save(step)
        if self.global_step % self.spec.progress_interval and step != self.steps_per_epoch:
            return
        self.reporter.emit(self._progress(step, _scalars(logs)))

    def _save(self, step: int) -> None:
        """Checkpoint the run as it is now, `step` steps into the epoch (0 at its end)."""
        state = TrainingState(
            epoch=self.epochs_done,
            step=step,
            global_step=self.global_step,
            seed=self.seed,
            stopped=bool(getattr(self.model, "stop_training", False)) and step == 0,
            early_stopping=self.stopping.snapshot() if self.stopping is not None else {},
            logs=self.last_logs,
        )
        self.checkpoint(state, self.stopping.best_weights if self.stopping is not None else None)
        self._last_checkpoint = time.monotonic()

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
        self.epochs_done = epoch + 1
        self._offset = 0
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
            self._save(0)
