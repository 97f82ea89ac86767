"""Placing models within each device's memory budget: promises of bytes, registration, unloading.

Placing a model (creation, restore, the reload of an unloaded one, a commit
that grows it) unloads the least recently used idle models of its device
until it fits, or fails with RESOURCE_EXHAUSTED and changes nothing. Idle
means no call uses the model (`ResidentModel.users`), no in-place job holds
it and no commit is under way. An unloaded model stays listed with the
description it had (`LocalModelHost._unloaded`).

`Placement` is a part of `LocalModelHost` (models/local_host.py), which owns
the attributes declared here.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
from collections.abc import Sequence

from weightsmith_server import metrics
from weightsmith_server.devices import Devices
from weightsmith_server.models.budget import Held, MemoryBudget
from weightsmith_server.models.description import ModelInfo, describe
from weightsmith_server.models.resident import ResidentModel
from weightsmith_server.resources import ResourceTable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Promise:
    """Bytes `_place` promised a device until the model holding them is registered, or given up."""

    device: str
    nbytes: int
    settled: bool = False


class Placement:
    """Where models go within the memory budget (a part of `LocalModelHost`)."""

    budget: MemoryBudget
    devices: Devices
    _lock: threading.RLock
    _models: ResourceTable[ResidentModel]
    _unloaded: dict[str, ModelInfo]
    _undescribed: set[str]
    _pending: dict[str, int]

    def _place(self, needed: int, devices: Sequence[str] = (), *, unload: bool = True) -> Promise:
        """A device for `needed` more bytes, after unloading least-recently-used idle models there.

        The bytes stay promised to the device until `_register` or `_settle`;
        RESOURCE_EXHAUSTED (nothing unloaded) when no device can take them.
        """
        names = [d.name for d in self.devices.devices]  # outside `_lock`: may wait for TensorFlow
        with self._lock:
            held: dict[str, list[Held]] = {}
            idle: set[str] = set()
            for resident in self._models.values():
                held.setdefault(resident.device, []).append(Held(resident.model_id, resident.nbytes))
                if resident.idle:
                    idle.add(resident.model_id)
            placement = self.budget.plan(
                needed,
                list(devices) or names,
                held,
                idle,
                pending=self._pending,
                unload=unload,
            )
            for victim in placement.victims:
                self._unload_idle(victim)
            self._pending[placement.device] = self._pending.get(placement.device, 0) + needed
        if placement.victims:
            gc.collect()  # Keras models hold reference cycles: free their variables now
        return Promise(placement.device, needed)

    def _settle(self, promise: Promise | None) -> None:
        """End a promise of `_place` (once): its bytes are resident now, or not needed."""
        with self._lock:
            if promise is not None and not promise.settled:
                self._pending[promise.device] -= promise.nbytes
                promise.settled = True

    def _register(
        self, resident: ResidentModel, promise: Promise | None = None, *, users: int = 0, touch: bool = True
    ) -> ResidentModel:
        """Make a model resident and the most recently used; its promise ends at the same moment.

        `users`: calls that use it from this moment on (a reload hands it to its caller in use).
        `touch=False` (the background restore) keeps its place in the use order.
        """
        with self._lock:
            resident.users += users
            self._models.put(resident.model_id, resident)
            self._unloaded.pop(resident.model_id, None)
            self._undescribed.discard(resident.model_id)
            if touch:
                self.budget.touch(resident.model_id)
            self._settle(promise)
        return resident

    def _unload_idle(self, model_id: str) -> None:
        """Unload an idle model to make room (under `_lock`: it stays idle meanwhile)."""
        resident = self._models.find(model_id)
        assert resident is not None and resident.idle, model_id
        # Free by construction (idle), taken so the `unloaded` flag is set under it as commits expect.
        locked = resident.commit_lock.acquire(blocking=False)
        try:
            self._drop(resident)
        finally:
            if locked:
                resident.commit_lock.release()
        metrics.LRU_UNLOADS.labels(resident.device).inc()
        log.info(
            "unloaded model %s from %s (least recently used, %d bytes) to stay within the memory budget",
            model_id,
            resident.device,
            resident.nbytes,
        )

    def _drop(self, resident: ResidentModel) -> None:
        """Take a model out of memory, keeping its description (under `_lock` and its commit lock)."""
        if self._models.remove(resident.model_id, resident):
            resident.unloaded = True
            self._unloaded[resident.model_id] = dataclasses.replace(
                describe(resident), device="", resident=False
            )
