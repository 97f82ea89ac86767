"""Where models live: GPU discovery, memory growth and placement.

`auto` uses every visible GPU (memory growth on, so that several models and
jobs share a card) and falls back to the CPU; `cpu` hides the GPUs from
TensorFlow; `gpu` requires at least one; `gpu:0,gpu:1` picks some.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """A device models may be placed on."""

    name: str
    kind: str
    description: str
    memory_growth: bool


class DeviceUnavailableError(RuntimeError):
    """The configured device policy cannot be met on this machine."""


def _gpu_description(gpu: object) -> str:
    import tensorflow as tf

    try:
        details = tf.config.experimental.get_device_details(gpu)
    except (ValueError, RuntimeError):
        return "GPU"
    return str(details.get("device_name", "GPU"))


class Devices:
    """The placement targets chosen at start-up, in preference order."""

    def __init__(self, policy: str) -> None:
        import tensorflow as tf

        self.policy = policy.strip().lower()
        gpus = tf.config.list_physical_devices("GPU")
        if self.policy == "cpu":
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                log.warning("TensorFlow already initialized; GPUs stay visible but unused")
            chosen = []
        elif self.policy in ("auto", "gpu"):
            chosen = list(range(len(gpus)))
        else:
            try:
                chosen = [int(part.strip().removeprefix("gpu:")) for part in self.policy.split(",")]
            except ValueError as exc:
                raise DeviceUnavailableError(
                    f"Received an invalid device policy, expected `auto`, `cpu`, `gpu` or a list "
                    f"like `gpu:0,gpu:1`. Received: {policy!r}"
                ) from exc
            missing = [i for i in chosen if i >= len(gpus)]
            if missing:
                raise DeviceUnavailableError(
                    f"GPU index {missing} requested but {len(gpus)} GPU(s) are visible"
                )
        if self.policy == "gpu" and not gpus:
            raise DeviceUnavailableError("--device=gpu but TensorFlow sees no GPU")
        self.devices: list[DeviceInfo] = []
        for index in chosen:
            gpu = gpus[index]
            # RuntimeError: already initialized by an earlier server in this process.
            with contextlib.suppress(RuntimeError):
                tf.config.experimental.set_memory_growth(gpu, True)
            self.devices.append(
                DeviceInfo(
                    name=f"/device:GPU:{index}",
                    kind="GPU",
                    description=_gpu_description(gpu),
                    memory_growth=bool(tf.config.experimental.get_memory_growth(gpu)),
                )
            )
        if not self.devices:
            self.devices.append(
                DeviceInfo(name="/device:CPU:0", kind="CPU", description="host CPU", memory_growth=False)
            )
        log.info("placing models on %s", ", ".join(d.name for d in self.devices))

    def choose(self, resident_bytes: dict[str, int]) -> str:
        """The device holding the fewest resident bytes: spreads models over GPUs."""
        return min(self.devices, key=lambda d: resident_bytes.get(d.name, 0)).name

    def memory(self, device: DeviceInfo) -> tuple[int, int]:
        """(bytes in use, total bytes or 0) for a device."""
        import tensorflow as tf

        if device.kind == "GPU":
            try:
                info = tf.config.experimental.get_memory_info(device.name.removeprefix("/device:"))
                return int(info["current"]), 0
            except (ValueError, RuntimeError):
                return 0, 0
        try:
            with open("/proc/self/statm") as handle:
                resident_pages = int(handle.read().split()[1])
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return resident_pages * os.sysconf("SC_PAGE_SIZE"), int(total)
        except (OSError, ValueError):
            return 0, 0
