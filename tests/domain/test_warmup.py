"""The warm-up queue: one worker, newest first, replaced states skipped, failures not fatal, stoppable."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from weightsmith_server.models.warmup import WarmUpQueue


def _resident(model_id: str) -> Any:
    return SimpleNamespace(model_id=model_id, state=_state(), unloaded=False, deleted=False)


def _state(keras_model: object | None = None) -> Any:
    return SimpleNamespace(keras_model=keras_model or object())


def test_one_worker_warms_newest_first_skipping_replaced_states_and_surviving_failures() -> None:
    gate, started = threading.Event(), threading.Event()
    warmed: list[tuple[str, object]] = []
    threads: set[str] = set()

    def warm(resident: Any, state: object) -> None:
        threads.add(threading.current_thread().name)
        started.set()
        gate.wait(5)
        warmed.append((resident.model_id, state))
        if resident.model_id == "bad":
            raise RuntimeError("trace failed")

    queue = WarmUpQueue(warm)
    blocker, bad, old, new, replaced, gone = (_resident(n) for n in ("a", "bad", "b", "c", "d", "e"))
    queue.submit(blocker, blocker.state)  # runs first, held at the gate while the others queue
    assert started.wait(5)
    for resident in (bad, old, new, replaced, gone):
        queue.submit(resident, resident.state)
    stale = replaced.state
    replaced.state = _state()  # a commit rebuilt it: its queued state is skipped
    valued = new.state
    new.state = _state(valued.keras_model)  # new values only: the current state is warmed
    gone.unloaded = True
    queue.submit(old, old.state)  # queued again: now the newest, and queued once
    gate.set()
    assert queue.wait_idle(5)
    queue.stop(5)
    assert [model_id for model_id, _ in warmed] == ["a", "b", "c", "bad"]
    assert (replaced.model_id, stale) not in warmed
    assert ("c", new.state) in warmed
    assert threads == {"weightsmith-warm-up"}


def test_stop_drops_the_queue_joins_the_worker_and_a_later_submit_starts_it_again() -> None:
    started, release = threading.Event(), threading.Event()
    warmed: list[str] = []

    def warm(resident: Any, state: object) -> None:
        started.set()
        release.wait(5)
        warmed.append(resident.model_id)

    queue = WarmUpQueue(warm)
    first, second, third = (_resident(n) for n in ("x", "y", "z"))
    queue.submit(first, first.state)
    assert started.wait(5)
    queue.submit(second, second.state)
    stopper = threading.Thread(target=queue.stop)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # waits for the running warm-up to end
    release.set()
    stopper.join(5)
    assert not stopper.is_alive()
    assert warmed == ["x"]  # "y" was dropped
    queue.submit(third, third.state)
    assert queue.wait_idle(5)
    queue.stop(5)
    assert warmed == ["x", "z"]


def test_a_disabled_queue_warms_nothing() -> None:
    warmed: list[str] = []
    queue = WarmUpQueue(lambda resident, state: warmed.append(resident.model_id))
    queue.enabled = False
    resident = _resident("off")
    queue.submit(resident, resident.state)
    assert queue.pending() == 0 and queue.wait_idle(1)
    queue.stop(5)
    assert warmed == []
