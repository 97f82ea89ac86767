"""Import TensorFlow and Keras in a background thread, safely while other threads serve calls.

`import keras` takes seconds; the server answers calls meanwhile (see
`app`). Two threads importing TensorFlow's packages at the same time can
deadlock on Python's per-module import locks (TensorFlow and Keras import
each other): Python then breaks the cycle with an ImportError in one of
them. So while the background import runs, any other thread's `import` of
`tensorflow`, `keras` or their submodules first waits for it to finish,
before it takes any of their import locks: `builtins.__import__` is wrapped
for that time only, and restored after.
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Top-level packages whose import the background thread owns while it runs.
_GUARDED = frozenset({"tensorflow", "keras", "tf_keras", "tensorboard", "tensorflow_estimator"})
# How long another thread's import waits for the background one before going ahead anyway.
_WAIT_SECONDS = 600.0


class BackgroundImport(Generic[T]):
    """Import Keras and TensorFlow in a thread once `start` is called, then run `then` there.

    `future` holds `then`'s result. Other threads' imports of those packages
    wait until the import is over (not until `then` is).
    """

    def __init__(self, then: Callable[[], T], *, name: str = "weightsmith-tensorflow") -> None:
        self.future: Future[T] = Future()
        self._then = then
        self._name = name
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        """Start the import (once; later calls do nothing)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        _import_in_background(self._then, self.future, self._name)


def _import_in_background(then: Callable[[], T], result: Future[T], name: str) -> None:
    result.set_running_or_notify_cancel()
    imported = threading.Event()
    original = builtins.__import__

    def run() -> None:
        try:
            import keras  # noqa: F401 - imports TensorFlow, its backend
            import tensorflow  # noqa: F401
        except BaseException as exc:
            log.error("TensorFlow could not be imported: %s", exc)
            result.set_exception(exc)
            return
        finally:
            imported.set()
            if builtins.__import__ is guarded:  # left alone if someone else replaced it since
                builtins.__import__ = original
        try:
            result.set_result(then())
        except BaseException as exc:
            log.error("TensorFlow or the device policy failed: %s", exc)
            result.set_exception(exc)

    thread = threading.Thread(target=run, name=name, daemon=False)

    def guarded(
        module: str,
        globals: dict[str, Any] | None = None,
        locals: dict[str, Any] | None = None,
        fromlist: Any = (),
        level: int = 0,
    ) -> Any:
        if (
            level == 0
            and not imported.is_set()
            and module.partition(".")[0] in _GUARDED
            and threading.current_thread() is not thread
        ):
            imported.wait(_WAIT_SECONDS)
        return original(module, globals, locals, fromlist, level)

    builtins.__import__ = guarded
    try:
        thread.start()
    except BaseException:
        builtins.__import__ = original
        raise
