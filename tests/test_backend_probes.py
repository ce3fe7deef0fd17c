"""The probes on every backend: `split="speed"`, `plan`'s peaks and rows, `--cpus`.

Backend-neutral: this file imports no TensorFlow, JAX or torch of its own and
runs in every flavour of the suite. Several devices: TensorFlow's logical CPUs
or JAX's host devices (set up by conftest); torch has one CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import keras_parallel
from keras_parallel import _backend
from keras_parallel._compat import FLAVOUR, backend_name, keras
from keras_parallel.devices import list_devices
from keras_parallel.probes import DeviceProbe

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
BACKEND = backend_name()
CPU0 = "/device:CPU:0"


def model(seed=0):
    """Dense, BatchNormalization (state) and Dropout (a seed): what a probe must not change."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((24,))
    x = keras.layers.Dense(64, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.5)(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def values(m):
    return [np.array(v.numpy()) for v in m.variables]


def two_cpus():
    cpus = list_devices("CPU")
    if len(cpus) < 2:
        pytest.skip(f"needs 2 CPU devices, found {cpus} (torch has one)")
    return cpus[:2]


def test_throughput_is_positive_and_leaves_the_model_unchanged():
    m = model()
    before = values(m)
    speed = DeviceProbe(speed_batch_size=8, speed_repeats=2).throughput(m, CPU0)
    assert speed > 0
    for a, b in zip(before, values(m), strict=True):
        np.testing.assert_array_equal(a, b)


def _out_of_memory():
    """The backend's own out-of-memory error (TensorFlow's takes node, op, message)."""
    error = _backend.accumulation.OUT_OF_MEMORY_ERRORS[0]
    try:
        return error("out of memory")
    except TypeError:
        return error(None, None, "out of memory")


class _Device:
    """A device whose pass of `rows` rows takes `launch + rows * per_row` seconds."""

    def __init__(self, launch, per_row, fits=None):
        self.launch, self.per_row, self.fits, self.sizes = launch, per_row, fits, []

    def __call__(self, model, device, batch_size, repeats):
        self.sizes.append(batch_size)
        if self.fits is not None and batch_size > self.fits:
            raise _out_of_memory()
        return batch_size / (self.launch + batch_size * self.per_row)


def test_speed_probe_grows_the_rows_until_the_device_is_busy(monkeypatch):
    """A launch-bound GPU at 4 rows must not look as slow as a CPU."""
    gpu, cpu = _Device(launch=4e-3, per_row=1e-4), _Device(launch=1e-4, per_row=2.5e-3)
    probe = DeviceProbe(speed_batch_size=4, speed_repeats=1)
    monkeypatch.setattr(_backend.probes, "measure_throughput", gpu)
    gpu_rate = probe.throughput(None, "gpu")
    monkeypatch.setattr(_backend.probes, "measure_throughput", cpu)
    cpu_rate = probe.throughput(None, "cpu")
    assert gpu.sizes == [4, 8, 16, 32, 64]  # each doubling still paid a quarter or more
    assert cpu.sizes == [4, 8]  # busy from the start: one doubling shows it
    assert gpu_rate == pytest.approx(64 / (4e-3 + 64e-4))
    assert gpu_rate / cpu_rate > 15  # at 4 rows both would read ~400-1000 samples/s
    big = _Device(launch=4e-3, per_row=1e-4)
    monkeypatch.setattr(_backend.probes, "measure_throughput", big)
    DeviceProbe(speed_batch_size=4, speed_repeats=1, speed_max_batch_size=16).throughput(None, "g")
    assert big.sizes == [4, 8, 16]


@pytest.mark.skipif(
    not _backend.accumulation.OUT_OF_MEMORY_ERRORS, reason="no out-of-memory error on this backend"
)
def test_speed_probe_stops_growing_at_out_of_memory_and_shrinks_a_first_size_too_big(monkeypatch):
    probe = DeviceProbe(speed_batch_size=4, speed_repeats=1)
    grows = _Device(launch=4e-3, per_row=1e-4, fits=16)
    monkeypatch.setattr(_backend.probes, "measure_throughput", grows)
    assert probe.throughput(None, "gpu") == pytest.approx(16 / (4e-3 + 16e-4))
    assert grows.sizes == [4, 8, 16, 32]
    small = _Device(launch=4e-3, per_row=1e-4, fits=1)  # two clips do not fit: one does
    monkeypatch.setattr(_backend.probes, "measure_throughput", small)
    assert probe.throughput(None, "gpu") == pytest.approx(1 / (4e-3 + 1e-4))
    assert small.sizes == [4, 2, 1]
    none = _Device(launch=4e-3, per_row=1e-4, fits=0)
    monkeypatch.setattr(_backend.probes, "measure_throughput", none)
    with pytest.raises(_backend.accumulation.OUT_OF_MEMORY_ERRORS):
        probe.throughput(None, "gpu")


@pytest.mark.parametrize("value", [0, True, 2.0])
def test_speed_max_batch_size_is_checked(value):
    with pytest.raises(ValueError, match="speed_max_batch_size"):
        DeviceProbe(speed_max_batch_size=value)


def test_split_speed_gives_a_ratio_per_device():
    devices = list_devices("CPU")[:2]
    ratios, figures = keras_parallel.probes.split_ratios(
        "speed", devices, model(), DeviceProbe(speed_batch_size=8, speed_repeats=1)
    )
    assert len(ratios) == len(devices) and min(ratios) == 1.0
    assert all(figures[d] > 0 for d in devices)


def test_plan_shows_peaks_where_the_backend_measures_them():
    m = model()
    result = keras_parallel.plan(m, 32, devices=[CPU0])
    if BACKEND == "jax":  # XLA's compiled estimate: known on the CPU too
        probe = _backend.probes.peak_probe(m, CPU0)
        assert 0 < probe(8) < probe(512)
        assert result.peak_bytes[0] > 0
        assert any("XLA's compiled estimate" in note for note in result.notes)
    else:
        if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() == "true":
            pytest.skip("TensorFlow's CPU allocator keeps statistics here")
        probe = _backend.probes.peak_probe(m, CPU0)
        assert probe is None or not probe(8)  # no allocator statistics on the CPU (or zeros)
        assert result.peak_bytes == [None] and result.fits is None
        assert "no allocator statistics here: expected peaks unknown" in result.notes


def test_plan_shows_the_rows_each_device_computes():
    devices = two_cpus()
    result = keras_parallel.plan(
        model(), 32, devices=devices, split=[2, 1], memory_probe=lambda rows: (10 + rows) * MIB
    )
    assert result.rows_per_device == [22, 10]
    # Every backend: an unequal split computes each device's own rows (JAX runs one
    # program per device on it, no padding).
    assert result.rows_computed == [22, 10]
    assert [round(p / MIB) for p in result.peak_bytes] == [32, 20]
    table = [line.split() for line in str(result).splitlines() if line.startswith("/device:")]
    assert [row[2:4] for row in table] == [["22", "32"], ["10", "20"]]
    assert "computes" not in str(result)


def test_plan_shows_the_padding_row_of_an_even_split_on_jax():
    devices = two_cpus()
    result = keras_parallel.plan(
        model(), 31, devices=devices, memory_probe=lambda rows: (10 + rows) * MIB
    )
    assert result.rows_per_device == [16, 15]
    if BACKEND == "jax":  # one SPMD program over a mesh: the 15 rows padded to 16
        assert result.rows_computed == [16, 16]
        assert any("as many rows as the largest slice" in note for note in result.notes)
    else:
        assert result.rows_computed == [16, 15]


class Limits(DeviceProbe):
    def __init__(self, limits):
        super().__init__()
        self.limits = limits

    def memory_limit(self, device):
        return self.limits[device]


def test_auto_sizes_the_micro_batch_by_the_rows_computed():
    devices = two_cpus()
    # 0.8 * limit = 40 + 20 * rows: device 0 holds 46 rows, device 1 only 10.
    limits = Limits({devices[0]: 1200 * MIB, devices[1]: 300 * MIB})
    result = keras_parallel.plan(
        model(),
        32,
        devices=devices,
        split=[2, 1],
        micro_batch_size="auto",
        memory_probe=lambda rows: (40 + 20 * rows) * MIB,
        probe=limits,
    )
    assert result.fits is True
    # Every backend, JAX included: device 1 computes only its own 10 rows.
    assert result.micro_batch_size == 16 and result.rows_computed == [22, 10]
    assert result.accumulation_steps == 1


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's host devices")
def test_jax_cpu_devices_cannot_change_once_started():
    started = len(list_devices("CPU"))
    assert _backend.devices.set_cpu_device_count(started) == list_devices("CPU")
    with pytest.raises(RuntimeError, match=r"XLA_FLAGS=--xla_force_host_platform_device_count=2"):
        _backend.devices.set_cpu_device_count(started + 1 if started == 1 else 2)


def run_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "keras_parallel_cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_plans_a_speed_split_on_this_backend(tmp_path):
    path = str(tmp_path / "model.keras")
    model().save(path)
    if BACKEND == "torch":  # one CPU device: --cpus refuses, the plan runs on it
        refused = run_cli("devices", "--cpus", "2")
        assert refused.returncode == 2 and "torch has one CPU device" in refused.stderr
        devices, cpus = ["/cpu:0"], []
    else:
        devices, cpus = ["/cpu:0", "/cpu:1"], ["--cpus", "2"]
    result = run_cli(
        "plan", path, "--batch-size", "16", "--split", "speed", *cpus, "--devices", *devices
    )
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("/device:CPU:")]
    assert len(table) == len(devices)


def test_the_demo_trains_saves_and_reloads_on_this_backend(tmp_path):
    if BACKEND == "tensorflow":
        pytest.skip("test_cli.py runs the demo on TensorFlow")
    result = run_cli(
        "demo",
        *("--samples", "32", "--epochs", "1", "--frames", "4", "--size", "12"),
        *("--batch-size", "8", "--micro-batch-size", "2", "--output", str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"({FLAVOUR}, {BACKEND})" in result.stdout
    assert "Reloaded it: predictions match" in result.stdout
    assert (tmp_path / "direction_classifier.keras").exists()


def clip_classifier(seed=0):
    """The newcomer's model: a small 3D CNN with BatchNormalization."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 12, 12, 3))
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x))


def test_plan_and_auto_choose_the_same_micro_batch_and_rows():
    """plan() and the first step of GradientAccumulation("auto"): one planner, one memory
    model, so the same model, devices and budget give the same micro-batch and rows."""
    from keras_parallel.callbacks import GradientAccumulation

    devices = two_cpus()
    parallel = keras_parallel.DataParallel(clip_classifier(), devices=devices, split=[2, 1])
    parallel.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    whole = keras_parallel.plan(parallel, 24, micro_batch_size="auto", memory_budget=2**40)
    if whole.peak_bytes[0] is None:  # no figures (TensorFlow's CPU without BFC, torch)
        budget = 2**30
        planned = whole
        assert planned.micro_batch_size == 12  # both keep the batch whole
    else:
        # A budget that holds about 5 rows of the first device's step.
        per_row = whole.peak_bytes[0] / whole.rows_per_device[0]
        budget = int(per_row * 5 / 0.8)
        planned = keras_parallel.plan(parallel, 24, micro_batch_size="auto", memory_budget=budget)
        assert 1 <= planned.micro_batch_size < 12  # it accumulates
    rng = np.random.default_rng(0)
    clips = rng.normal(size=(48, 4, 12, 12, 3)).astype("float32")
    labels = rng.integers(0, 4, 48)
    callback = GradientAccumulation("auto", memory_budget=budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "cannot measure", BatchNormalization per micro-batch
        history = parallel.fit(
            clips, labels, batch_size=24, epochs=1, verbose=0, callbacks=[callback]
        )
    assert callback.micro_batch_size_ == planned.micro_batch_size
    assert history.history["micro_batch_size"] == [planned.micro_batch_size]
    rows = keras_parallel.replicas(parallel).slice_sizes(2 * planned.micro_batch_size)
    assert rows == planned.rows_per_device


@pytest.mark.skipif(
    backend_name() != "tensorflow" or os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") == "true",
    reason="TensorFlow's CPU allocator figures: this run has them or has no such allocator",
)
def test_plan_and_auto_agree_with_the_bfc_allocator():
    """The same check with allocator figures (TF_CPU_ALLOCATOR_USE_BFC, read when
    TensorFlow starts: a fresh process)."""
    here = Path(__file__).parent
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(here / Path(__file__).name),
            "-k",
            "test_plan_and_auto_choose_the_same_micro_batch_and_rows",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"},
        cwd=here.parent,
    )
    assert "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
