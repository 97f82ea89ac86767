"""Where models live: GPU discovery, memory growth and placement.

`auto` uses every visible GPU (memory growth on, so that several models and
jobs share a card) and falls back to the CPU; `cpu` hides the GPUs from
TensorFlow; `gpu` requires at least one; `gpu:0,gpu:1` picks some.

Each device gets a memory budget for resident models' variables
(`--memory-budget-mb`, the same for every device); 0 picks one
automatically: 80% of a GPU's total memory (no budget when the driver does
not tell it), 50% of the memory this process may use on the CPU (physical
memory, or the cgroup's limit when lower).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Shares of a device's memory the automatic budget gives resident models'
# variables; the rest is for activations, jobs' training copies, datasets and uploads.
GPU_BUDGET_FRACTION = 0.8
CPU_BUDGET_FRACTION = 0.5


@dataclass(frozen=True)
class DeviceInfo:
    """A device models may be placed on."""

    name: str
    kind: str
    description: str
    memory_growth: bool
    # Total memory in bytes, 0 when unknown.
    memory_total_bytes: int = 0


class DeviceUnavailableError(RuntimeError):
    """The configured device policy cannot be met on this machine."""


def _gpu_description(gpu: object) -> str:
    import tensorflow as tf

    try:
        details = tf.config.experimental.get_device_details(gpu)
    except (ValueError, RuntimeError):
        return "GPU"
    return str(details.get("device_name", "GPU"))


def _gpu_total_bytes(index: int) -> int:
    """Total memory of CUDA device `index` from the driver (no context, no allocation), 0 if unknown."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        device = ctypes.c_int()
        total = ctypes.c_size_t()
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), index):
            return 0
        if cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device):
            return 0
        return int(total.value)
    except (OSError, AttributeError):
        return 0


def _cgroup_limit_bytes() -> int:
    """The memory limit of this process's cgroup (v2, then v1), 0 when there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return 0


def host_memory_bytes() -> int:
    """Memory this process may use: physical memory, or its cgroup's limit when lower; 0 if unknown."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        physical = 0
    limits = [value for value in (physical, _cgroup_limit_bytes()) if value > 0]
    return min(limits) if limits else 0


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
                    memory_total_bytes=_gpu_total_bytes(index),
                )
            )
        if not self.devices:
            self.devices.append(
                DeviceInfo(
                    name="/device:CPU:0",
                    kind="CPU",
                    description="host CPU",
                    memory_growth=False,
                    memory_total_bytes=host_memory_bytes(),
                )
            )
        log.info("placing models on %s", ", ".join(d.name for d in self.devices))

    def choose(self, resident_bytes: dict[str, int]) -> str:
        """The device holding the fewest resident bytes: spreads models over GPUs."""
        return min(self.devices, key=lambda d: resident_bytes.get(d.name, 0)).name

    def budgets(self, configured_bytes: int) -> dict[str, int]:
        """Each device's memory budget: `configured_bytes` for all, or automatic when 0 (0: none)."""
        if configured_bytes:
            return {d.name: configured_bytes for d in self.devices}
        fraction = {"GPU": GPU_BUDGET_FRACTION, "CPU": CPU_BUDGET_FRACTION}
        return {d.name: int(d.memory_total_bytes * fraction.get(d.kind, 0.0)) for d in self.devices}

    def memory(self, device: DeviceInfo) -> tuple[int, int]:
        """(bytes in use, total bytes or 0) for a device."""
        import tensorflow as tf

        if device.kind == "GPU":
            try:
                info = tf.config.experimental.get_memory_info(device.name.removeprefix("/device:"))
                return int(info["current"]), device.memory_total_bytes
            except (ValueError, RuntimeError):
                return 0, device.memory_total_bytes
        try:
            with open("/proc/self/statm") as handle:
                resident_pages = int(handle.read().split()[1])
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return resident_pages * os.sysconf("SC_PAGE_SIZE"), int(total)
        except (OSError, ValueError):
            return 0, 0
