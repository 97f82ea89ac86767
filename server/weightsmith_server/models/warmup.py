"""One background worker that warms the compiled Predict of newly installed model states.

A state installed by a create, a load or a rebuild is queued here instead of
starting a thread of its own: one thread traces one model at a time, so a
restore of many models keeps its CPU and memory bounded. The queue holds at
most one state per model (a newer one replaces it) and runs the most
recently queued first; a state whose Keras model is no longer resident when
its turn comes (unloaded, deleted or rebuilt again) is skipped, while one
only given new values since is warmed as it is now. A failed warm-up is
logged and only means that the first Predict traces.

`stop` empties the queue and joins the worker, so no trace is running inside
TensorFlow when the process finalizes (a thread still tracing then aborts the
interpreter with "terminate called ... exception not rethrown"). The server
stops it on shutdown, and an `atexit` hook covers any other exit. A later
`submit` starts the worker again (servers started one after another in one
process).
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weightsmith_server.models.resident import ModelState, ResidentModel

log = logging.getLogger(__name__)

Warm = Callable[["ResidentModel", "ModelState"], None]


def _warm_compiled(resident: ResidentModel, state: ModelState) -> None:
    from weightsmith_server.models.inference import warm_up

    warm_up(resident, state)


class WarmUpQueue:
    """A single worker thread warming queued model states, most recently queued first."""

    def __init__(self, warm: Warm = _warm_compiled) -> None:
        self._warm = warm
        self._pending: OrderedDict[str, tuple[ResidentModel, ModelState]] = OrderedDict()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None  # the running worker's
        self._stopping = False
        # Off (`--no-warm-up`): nothing is queued, and a model's first Predict traces.
        self.enabled = True

    def submit(self, resident: ResidentModel, state: ModelState) -> None:
        """Queue `state` of `resident` for a warm-up (replacing one still queued for that model)."""
        with self._condition:
            if self._stopping or not self.enabled:
                return
            self._pending[resident.model_id] = (resident, state)
            self._pending.move_to_end(resident.model_id)
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, args=(self._stop,), name="weightsmith-warm-up", daemon=True
                )
                self._thread.start()
            self._condition.notify()

    def pending(self) -> int:
        """States queued and not started yet."""
        with self._condition:
            return len(self._pending)

    def _run(self, stop: threading.Event) -> None:
        while True:
            with self._condition:
                while not self._pending and not stop.is_set():
                    self._condition.wait()
                if stop.is_set():
                    return
                _, (resident, state) = self._pending.popitem(last=True)
                self._condition.notify_all()  # `wait_idle`
            current = resident.state  # a value-only commit since keeps the model and its runners
            if current.keras_model is not state.keras_model or resident.unloaded or resident.deleted:
                continue  # rebuilt or gone before its turn: nothing to warm
            try:
                self._warm(resident, current)
            except Exception:  # never fatal: the first Predict traces instead
                log.warning("model %s: warm-up failed", resident.model_id, exc_info=True)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued (tests); True if so. The running warm-up may still be going."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._pending, timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Drop what is queued, let a running warm-up finish, join the worker; `submit` restarts it."""
        with self._condition:
            self._stopping = True
            self._pending.clear()
            thread = self._thread
            if self._stop is not None:
                self._stop.set()
            self._condition.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._condition:
            if self._thread is thread:
                self._thread = self._stop = None
            self._stopping = False


# The process's queue: every resident model queues its states here.
WARM_UPS = WarmUpQueue()
atexit.register(WARM_UPS.stop)
