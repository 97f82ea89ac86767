"""GPU placement: run with `make test-gpu` on a machine with a visible GPU.

Skipped where TensorFlow sees no GPU; CI never needs one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import weightsmith
from tests.conftest import _start_in_thread, _stop_in_thread, tiny_cnn_config


def _gpus() -> list[object]:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _gpus(), reason="no GPU visible to TensorFlow"),
]


def test_models_land_on_the_gpu_with_memory_growth_and_match_the_cpu(tmp_path: Path) -> None:
    gpu_handle, gpu_thread = _start_in_thread(tmp_path / "gpu", device="auto")
    try:
        with weightsmith.Client(gpu_handle.address) as gpu:
            info = gpu.server_info()
            assert info.devices[0].name.startswith("/device:GPU:")
            assert info.devices[0].memory_growth
            model = gpu.create_model("probe", keras_config=tiny_cnn_config(), seed=4)
            assert model.device.startswith("/device:GPU:")
            gpu_weights = gpu.read_weights("probe")
            new = {k: (v + 1).astype(v.dtype) for k, v in gpu_weights.items()}
            gpu.write_weights("probe", new)
            batch = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
            gpu_out = gpu.predict("probe", batch).outputs["head"]
            gpu_after = gpu.read_weights("probe")
    finally:
        _stop_in_thread(gpu_handle, gpu_thread)

    cpu_handle, cpu_thread = _start_in_thread(tmp_path / "cpu", device="cpu")
    try:
        with weightsmith.Client(cpu_handle.address) as cpu:
            assert cpu.create_model("probe", keras_config=tiny_cnn_config()).device == "/device:CPU:0"
            cpu.write_weights("probe", new)
            cpu_after = cpu.read_weights("probe")
            assert {k: v.tobytes() for k, v in cpu_after.items()} == {
                k: v.tobytes() for k, v in gpu_after.items()
            }
            assert {k: v.tobytes() for k, v in gpu_after.items()} == {k: v.tobytes() for k, v in new.items()}
            np.testing.assert_allclose(
                cpu.predict("probe", batch).outputs["head"], gpu_out, rtol=1e-4, atol=1e-5
            )
    finally:
        _stop_in_thread(cpu_handle, cpu_thread)
