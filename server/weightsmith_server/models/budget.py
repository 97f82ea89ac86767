"""The memory budget per device, and which least-recently-used idle models make room.

`MemoryBudget` is pure bookkeeping: bytes each device may hold in resident
models' variables (0: no budget), when each model was last used, and a
placement plan for `needed` more bytes: a device where they fit as is, or
else the device where unloading the least recently used idle models makes
them fit. The model host supplies what is resident and what is idle, and
does the unloading; this class neither locks nor touches a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from weightsmith_server.errors import ResourceExhausted

MIB = 1024 * 1024


@dataclass(frozen=True)
class Held:
    """A resident model as the budget sees it: its id and the bytes of its variables."""

    model_id: str
    nbytes: int


@dataclass(frozen=True)
class Placement:
    """Where `needed` bytes go, and the models to unload first (least recently used first)."""

    device: str
    victims: tuple[str, ...] = ()


class MemoryBudget:
    """Budgets per device and the least-recently-used order of models.

    Args:
        budgets: Bytes of resident variables each device may hold; 0 or a
            missing device means no budget. `configure` sets them later when the
            devices are not known yet (TensorFlow still importing).
    """

    def __init__(self, budgets: Mapping[str, int]) -> None:
        self._budgets = dict(budgets)
        self._last_use: dict[str, int] = {}
        self._clock = itertools.count(1)

    def configure(self, budgets: Mapping[str, int]) -> None:
        """Set the budgets once the devices are known (the use order is kept)."""
        self._budgets = dict(budgets)

    def budget(self, device: str) -> int:
        """The device's budget in bytes, 0 when it has none."""
        return self._budgets.get(device, 0)

    def touch(self, model_id: str) -> None:
        """Record a use of the model: it becomes the most recently used."""
        self._last_use[model_id] = next(self._clock)

    def forget(self, model_id: str) -> None:
        """Drop a deleted model from the order."""
        self._last_use.pop(model_id, None)

    def last_use(self, model_id: str) -> int:
        """When the model was last used, by a counter (0: never)."""
        return self._last_use.get(model_id, 0)

    def room(self, device: str, used: int) -> float:
        """Bytes still free on a device holding `used` bytes (infinite without a budget)."""
        budget = self.budget(device)
        return float("inf") if not budget else float(budget - used)

    def roomiest(self, used: Mapping[str, int], devices: Sequence[str]) -> str:
        """The device with the most room left (ties: the fewest bytes held, then the first)."""
        return max(devices, key=lambda d: (self.room(d, used.get(d, 0)), -used.get(d, 0)))

    def plan(
        self,
        needed: int,
        devices: Sequence[str],
        held: Mapping[str, Sequence[Held]],
        idle: Collection[str],
        *,
        pending: Mapping[str, int] | None = None,
        unload: bool = True,
    ) -> Placement:
        """Where `needed` more bytes go; RESOURCE_EXHAUSTED if no device can take them.

        A device where they fit without unloading wins (the roomiest one).
        Otherwise, on each device, the least recently used models in
        `idle` are chosen until the bytes fit; the plan whose newest victim
        is the oldest wins, so the models unloaded are the least recently
        used ones overall. `pending` counts bytes promised to placements
        under way; `unload=False` plans without unloading anything.
        """
        pending = pending or {}
        used = {d: sum(h.nbytes for h in held.get(d, ())) + pending.get(d, 0) for d in devices}
        fitting = [d for d in devices if self.room(d, used[d]) >= needed]
        if fitting:
            return Placement(self.roomiest(used, fitting))
        candidates: list[tuple[int, int, str, tuple[str, ...]]] = []
        for device in devices:
            budget = self.budget(device)
            if needed > budget or not unload:
                continue
            victims: list[str] = []
            total = used[device]
            for model in sorted(
                (h for h in held.get(device, ()) if h.model_id in idle),
                key=lambda h: self.last_use(h.model_id),
            ):
                if total + needed <= budget:
                    break
                victims.append(model.model_id)
                total -= model.nbytes
            if total + needed <= budget:
                newest = max(self.last_use(v) for v in victims)
                candidates.append((newest, len(victims), device, tuple(victims)))
        if candidates:
            _, _, device, victims = min(candidates)
            return Placement(device, victims)
        raise self._exhausted(needed, devices, used)

    def refuse_oversized(self, needed: int, devices: Sequence[str]) -> None:
        """Raise MODEL_EXCEEDS_MEMORY_BUDGET when no device's whole budget could hold `needed` bytes."""
        if any(self.budget(d) == 0 for d in devices) or needed <= max(self.budget(d) for d in devices):
            return
        raise self._exhausted(needed, devices, {d: 0 for d in devices})

    def _exhausted(self, needed: int, devices: Sequence[str], used: Mapping[str, int]) -> ResourceExhausted:
        largest = max(devices, key=self.budget)
        budget = self.budget(largest)
        if needed > budget:
            return ResourceExhausted(
                f"The model needs {needed} bytes ({needed / MIB:.1f} MiB) for its variables, more than "
                f"the whole memory budget of {budget} bytes ({budget / MIB:.1f} MiB) of device {largest} "
                "(--memory-budget-mb).",
                reason="MODEL_EXCEEDS_MEMORY_BUDGET",
                metadata={"device": largest, "budget_bytes": str(budget), "needed_bytes": str(needed)},
            )
        device = min(devices, key=lambda d: used[d] - self.budget(d))
        return ResourceExhausted(
            f"Device {device} holds {used[device]} bytes of its {self.budget(device)}-byte memory budget "
            f"and the {needed} bytes needed do not fit: the models that would have to be unloaded are in "
            "use (a call in progress or an in-place job). Retry once they are idle, delete a model, or "
            "raise --memory-budget-mb.",
            reason="MEMORY_BUDGET_EXHAUSTED",
            metadata={
                "device": device,
                "budget_bytes": str(self.budget(device)),
                "needed_bytes": str(needed),
                "resident_bytes": str(used[device]),
            },
        )
