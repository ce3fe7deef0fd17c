"""split="memory" / "speed": resolution from injected probes, warnings, config round-trip."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
from helpers import assert_save_load_same_outputs

import keras_parallel
from keras_parallel import DataParallel
from keras_parallel._compat import keras
from keras_parallel.probes import DeviceProbe

CPU2 = ["/cpu:0", "/cpu:1"]
GIB = 2**30


class FakeProbe(DeviceProbe):
    def __init__(self, memory=None, speed=None):
        super().__init__()
        self.memory = memory or {}
        self.speed = speed or {}
        self.calls = 0

    def memory_limit(self, device):
        self.calls += 1
        return self.memory.get(device)

    def throughput(self, model, device):
        self.calls += 1
        return self.speed[device]


def small_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def test_memory_split_12_and_6_gb_gives_2_to_1(caplog):
    probe = FakeProbe(memory={"/device:CPU:0": 12 * GIB, "/device:CPU:1": 6 * GIB})
    with caplog.at_level(logging.INFO, logger="keras_parallel"):
        parallel = DataParallel(small_model(), devices=CPU2, split="memory", probe=probe)
    core = keras_parallel.replicas(parallel)
    assert core.ratios == [2.0, 1.0]
    assert core.split == "memory"
    assert core.split_figures == {"/device:CPU:0": 12 * GIB, "/device:CPU:1": 6 * GIB}
    assert core.slice_sizes(32) == [22, 10]
    assert "ratios [2.0, 1.0]" in caplog.text


def test_ratios_computed_with_numpy_split_the_batch(tmp_path):
    parallel = DataParallel(small_model(), devices=CPU2, split=np.array([12, 6]))
    core = keras_parallel.replicas(parallel)
    assert core.ratios == [12.0, 6.0] and core.slice_sizes(32) == [22, 10]
    assert core.split == [12.0, 6.0]  # saved as plain floats
    assert_save_load_same_outputs(parallel, np.ones((3, 5), "float32"), tmp_path)


def test_speed_split_3x_faster_gives_3_to_1():
    probe = FakeProbe(speed={"/device:CPU:0": 30.0, "/device:CPU:1": 90.0})
    parallel = DataParallel(small_model(), devices=CPU2, split="speed", probe=probe)
    assert keras_parallel.replicas(parallel).ratios == [1.0, 3.0]


def test_speed_split_names_a_device_much_slower_than_the_fastest():
    """The H100 and its host's CPU: 17x slower, and the CPU's slice halved the step rate."""
    probe = FakeProbe(speed={"/device:CPU:0": 11842.5, "/device:CPU:1": 685.2})
    with pytest.warns(UserWarning, match=r"/device:CPU:1 17x slower than /device:CPU:0") as seen:
        parallel = DataParallel(small_model(), devices=CPU2, split="speed", probe=probe)
    assert "devices=['/device:CPU:0']" in str(seen[0].message)
    assert keras_parallel.replicas(parallel).ratios == pytest.approx([17.28, 1.0], abs=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 7x: no warning
        DataParallel(
            small_model(),
            devices=CPU2,
            split="speed",
            probe=FakeProbe(speed={"/device:CPU:0": 70.0, "/device:CPU:1": 10.0}),
        )


def test_real_speed_probe_on_cpu_leaves_model_unchanged():
    model = small_model()
    before = [w.copy() for w in model.get_weights()]
    parallel = DataParallel(model, devices=CPU2, split="speed")
    core = keras_parallel.replicas(parallel)
    assert len(core.ratios) == 2 and min(core.ratios) == 1.0
    assert all(v > 0 for v in core.split_figures.values())
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_memory_split_without_figures_falls_back_to_even_with_warning():
    with pytest.warns(UserWarning, match="using an even split"):
        parallel = DataParallel(small_model(), devices=CPU2, split="memory")
    assert keras_parallel.replicas(parallel).ratios == [1.0, 1.0]


def test_even_split_on_unequal_devices_warns():
    probe = FakeProbe(memory={"/device:CPU:0": 12 * GIB, "/device:CPU:1": 6 * GIB})
    with pytest.warns(UserWarning, match="split='memory'"):
        DataParallel(small_model(), devices=CPU2, probe=probe)
    probe = FakeProbe(memory={"/device:CPU:0": 12 * GIB, "/device:CPU:1": 11 * GIB})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        DataParallel(small_model(), devices=CPU2, probe=probe)


def test_measured_split_is_saved_and_reused_without_measuring(tmp_path):
    probe = FakeProbe(memory={"/device:CPU:0": 12 * GIB, "/device:CPU:1": 6 * GIB})
    parallel = DataParallel(small_model(), devices=CPU2, split="memory", probe=probe)
    calls = probe.calls
    x = np.random.default_rng(0).random((7, 5), dtype="float32")
    loaded = assert_save_load_same_outputs(parallel, x, tmp_path)
    assert probe.calls == calls
    core = keras_parallel.replicas(loaded)
    assert core.ratios == [2.0, 1.0] and core.split == "memory"
    # Re-measuring means wrapping the template again.
    again = DataParallel(
        keras_parallel.unwrap(loaded),
        devices=CPU2,
        split="memory",
        probe=FakeProbe(memory={"/device:CPU:0": 6 * GIB, "/device:CPU:1": 6 * GIB}),
    )
    assert keras_parallel.replicas(again).ratios == [1.0, 1.0]


# -- split_cpu: the public way to have several devices on a CPU -------------------


def test_split_cpu_again_with_the_same_number_gives_the_names(cpu_devices):
    from keras_parallel.devices import list_devices, split_cpu

    assert list_devices("CPU") == [f"/device:CPU:{i}" for i in range(len(cpu_devices))]
    assert split_cpu(len(cpu_devices)) == list_devices("CPU")


def test_split_cpu_too_late_with_another_number_says_so(cpu_devices):
    from keras_parallel.devices import list_devices, split_cpu

    list_devices()  # TensorFlow's devices have started
    with pytest.raises(RuntimeError, match=r"split_cpu\(2\) comes too late.*3 CPU device"):
        split_cpu(2)
    assert len(list_devices("CPU")) == len(cpu_devices)


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "2", None])
def test_split_cpu_rejects_a_bad_number(value):
    from keras_parallel.devices import split_cpu

    with pytest.raises(ValueError, match="Invalid value for argument `num_devices`"):
        split_cpu(value)


@pytest.mark.parametrize("backend, hint", [("jax", "XLA_FLAGS"), ("torch", "'torch'")])
def test_split_cpu_on_another_backend_names_it(monkeypatch, backend, hint):
    import importlib

    from keras_parallel import _backend, devices

    # That backend's device module, in place of TensorFlow's; it imports its framework,
    # which `.[all]` does not install.
    pytest.importorskip(backend)
    module = importlib.import_module(f"keras_parallel._backend.{backend}.devices")
    monkeypatch.setattr(_backend, "devices", module)
    with pytest.raises(NotImplementedError, match=f"backend here is '{backend}'") as error:
        devices.split_cpu(2)
    assert hint in str(error.value)


def test_an_unknown_cpu_device_points_at_split_cpu():
    with pytest.raises(ValueError, match=r"Unknown device '/cpu:7'.*keras_parallel.split_cpu"):
        DataParallel(small_model(), devices=["/cpu:0", "/cpu:7"])
