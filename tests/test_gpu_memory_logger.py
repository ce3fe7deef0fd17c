"""GPUMemoryLogger: injected figures, real TensorFlow on CPU, real BFC allocator figures."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tensorflow as tf

from keras_parallel._compat import IS_KERAS_3, keras
from keras_parallel.callbacks import GPUMemoryLogger
from keras_parallel.memory import MIB, MemoryReading, MemorySource

GPU0, GPU1 = "/device:GPU:0", "/device:GPU:1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeSource(MemorySource):
    """Two fake GPUs with fixed byte counts; `allocate` moves the figures."""

    def __init__(self, current=None, limits=None, can_reset=True):
        self.current = dict(current or {GPU0: 100 * MIB, GPU1: 40 * MIB})
        self.peak = dict(self.current)
        self.limits = dict(limits or {GPU0: 1000 * MIB, GPU1: 500 * MIB})
        self.can_reset = can_reset
        self.reads = 0
        self.fail = set()

    def devices(self):
        return list(self.current)

    def allocate(self, device, nbytes):
        """Holds `nbytes` more for a moment: raises the peak only."""
        self.peak[device] = max(self.peak[device], self.current[device] + nbytes)

    def read(self, device):
        if device in self.fail:
            raise RuntimeError("device lost")
        self.reads += 1
        return MemoryReading(self.current[device], self.peak[device], self.limits.get(device))

    def reset_peak(self, device):
        if not self.can_reset:
            return False
        self.peak[device] = self.current[device]
        return True


class FakeNVML(MemorySource):
    def devices(self):
        return [GPU0, GPU1]

    def read(self, device):
        used = {GPU0: 700 * MIB, GPU1: 300 * MIB}[device]
        return MemoryReading(used, used, 2000 * MIB)


class BatchRecorder(keras.callbacks.Callback):
    """Keeps the logs every batch hook saw (placed after the logger)."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append((batch, dict(logs or {})))


class Allocate(keras.callbacks.Callback):
    """Raises a fake device's peak at the start of chosen epochs."""

    def __init__(self, source, plan):
        super().__init__()
        self.source, self.plan = source, plan

    def on_epoch_begin(self, epoch, logs=None):
        for device, nbytes in self.plan.get(epoch, {}).items():
            self.source.allocate(device, nbytes)


def _fit(callbacks, epochs=2, steps_per_execution=1, samples=24, batch_size=4):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile("sgd", "mse", steps_per_execution=steps_per_execution)
    x = np.random.default_rng(0).normal(size=(samples, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=callbacks)


FAKE_KEYS = {
    "gpu0_current_mib",
    "gpu0_peak_mib",
    "gpu0_limit_mib",
    "gpu0_nvml_used_mib",
    "gpu1_current_mib",
    "gpu1_peak_mib",
    "gpu1_limit_mib",
    "gpu1_nvml_used_mib",
    "gpu_peak_skew",
    "host_rss_mib",
}


# -- arguments ---------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "10"])
def test_every_n_batches_must_be_positive_int(value):
    with pytest.raises(ValueError, match="argument `every_n_batches`. Expected a positive int"):
        GPUMemoryLogger(every_n_batches=value)


@pytest.mark.parametrize("value", [0, -0.1, 1.01, 2, True, "0.9"])
def test_headroom_threshold_must_be_in_unit_interval(value):
    with pytest.raises(ValueError, match=r"argument `headroom_threshold`. Expected a number in"):
        GPUMemoryLogger(headroom_threshold=value)


def test_bad_device_name_and_source_raise():
    with pytest.raises(ValueError, match="device"):
        GPUMemoryLogger(devices=["/gpu:0", "GPU:0"])
    with pytest.raises(ValueError, match="argument `source`"):
        GPUMemoryLogger(source=object())


def test_has_no_config_like_keras_callbacks():
    """No lossy config: a source cannot go into one, and callbacks are not saved."""
    logger = GPUMemoryLogger(every_n_batches=5, source=FakeSource(), nvml=FakeNVML())
    assert not hasattr(logger, "get_config")
    assert not hasattr(GPUMemoryLogger, "from_config")
    assert keras.saving.get_registered_object("keras_parallel>GPUMemoryLogger") is None


# -- injected figures: two unequal fake GPUs ------------------------------------


def test_history_has_per_device_keys_in_mib():
    source = FakeSource()
    history = _fit([GPUMemoryLogger(source=source, nvml=FakeNVML())], epochs=2)
    logged = set(history.history) - {"loss"}
    assert logged == FAKE_KEYS
    h = history.history
    assert h["gpu0_current_mib"] == [100.0, 100.0]
    assert h["gpu1_current_mib"] == [40.0, 40.0]
    assert h["gpu0_limit_mib"] == [1000.0, 1000.0]
    assert h["gpu1_limit_mib"] == [500.0, 500.0]
    assert h["gpu0_nvml_used_mib"] == [700.0, 700.0]
    # Never summed: no total key.
    assert not any("total" in key or key.startswith("gpu_current") for key in h)
    for key in FAKE_KEYS:
        assert all(isinstance(v, float) for v in h[key]), key
    assert all(v > 10 for v in h["host_rss_mib"])


def test_mib_conversion_is_two_to_the_twenty():
    source = FakeSource(current={GPU0: 3 * MIB + MIB // 2}, limits={GPU0: 10**9})
    history = _fit([GPUMemoryLogger(source=source, nvml=False)], epochs=1)
    assert history.history["gpu0_current_mib"] == [3.5]
    assert history.history["gpu0_limit_mib"] == [pytest.approx(10**9 / 2**20)]
    assert "gpu_peak_skew" not in history.history  # one device: no skew


def test_peak_is_reset_each_epoch():
    source = FakeSource()
    plan = {0: {GPU0: 700 * MIB}, 2: {GPU1: 60 * MIB}}
    history = _fit([Allocate(source, plan), GPUMemoryLogger(source=source, nvml=False)], epochs=3)
    assert history.history["gpu0_peak_mib"] == [800.0, 100.0, 100.0]
    assert history.history["gpu1_peak_mib"] == [40.0, 40.0, 100.0]
    assert history.history["gpu0_current_mib"] == [100.0, 100.0, 100.0]


def test_peak_is_kept_where_the_source_cannot_reset():
    source = FakeSource(can_reset=False)
    plan = {0: {GPU0: 700 * MIB}}
    history = _fit([Allocate(source, plan), GPUMemoryLogger(source=source, nvml=False)], epochs=2)
    assert history.history["gpu0_peak_mib"] == [800.0, 800.0]


def test_peak_skew():
    source = FakeSource(current={GPU0: 300 * MIB, GPU1: 100 * MIB})
    history = _fit([GPUMemoryLogger(source=source, nvml=False)], epochs=1)
    # (max - min) / mean = (300 - 100) / 200
    assert history.history["gpu_peak_skew"] == [1.0]


def test_same_keys_every_epoch_when_a_reading_fails():
    source = FakeSource()

    class Lose(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                source.fail.add(GPU1)

    history = _fit([Lose(), GPUMemoryLogger(source=source, nvml=False)], epochs=2)
    assert history.history["gpu1_current_mib"][0] == 40.0
    assert math.isnan(history.history["gpu1_current_mib"][1])
    assert math.isnan(history.history["gpu_peak_skew"][1])
    assert history.history["gpu0_current_mib"] == [100.0, 100.0]


def test_csv_logger_after_it_has_the_columns(tmp_path):
    path = tmp_path / "log.csv"
    logger = GPUMemoryLogger(source=FakeSource(), nvml=FakeNVML())
    _fit([logger, keras.callbacks.CSVLogger(str(path))], epochs=2)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert FAKE_KEYS <= set(rows[0])
    assert float(rows[1]["gpu0_peak_mib"]) == 100.0
    assert float(rows[1]["gpu1_limit_mib"]) == 500.0


def _scalars(logdir):
    """{tag: [values]} of the scalar summaries in the event files under `logdir`."""
    found = {}
    for path in glob.glob(os.path.join(logdir, "**", "*tfevents*"), recursive=True):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if not value.tag.startswith("epoch_"):
                    continue
                if value.HasField("tensor"):
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    number = value.simple_value
                found.setdefault(value.tag, []).append(number)
    return found


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the TensorBoard callback needs tensorboard")
    logger = GPUMemoryLogger(source=FakeSource(), nvml=False)
    _fit([logger, keras.callbacks.TensorBoard(str(tmp_path), write_graph=False)], epochs=2)
    scalars = _scalars(str(tmp_path))
    assert scalars["epoch_gpu0_peak_mib"] == [100.0, 100.0]
    assert scalars["epoch_gpu1_limit_mib"] == [500.0, 500.0]
    assert "epoch_host_rss_mib" in scalars


def test_every_n_batches_writes_batch_logs():
    source = FakeSource()
    recorder = BatchRecorder()
    logger = GPUMemoryLogger(every_n_batches=2, source=source, nvml=False)
    _fit([logger, recorder], epochs=2, samples=24, batch_size=4)  # 6 batches an epoch
    read_at = [batch for batch, logs in recorder.batches if "gpu0_current_mib" in logs]
    assert read_at == [1, 3, 5, 1, 3, 5]
    logs = dict(recorder.batches[1][1])
    assert logs["gpu1_current_mib"] == 40.0
    assert "host_rss_mib" in logs


def test_every_n_batches_with_steps_per_execution():
    recorder = BatchRecorder()
    logger = GPUMemoryLogger(every_n_batches=4, source=FakeSource(), nvml=False)
    # 12 batches an epoch, hooks at batches 2, 5, 8, 11.
    _fit([logger, recorder], epochs=1, samples=48, batch_size=4, steps_per_execution=3)
    seen = [batch for batch, _ in recorder.batches]
    assert seen == [2, 5, 8, 11]
    read_at = [batch for batch, logs in recorder.batches if "gpu0_current_mib" in logs]
    assert read_at == [5, 8, 11]


def test_batch_peak_is_since_the_last_reading_and_epoch_peak_covers_the_epoch():
    source = FakeSource()

    class AllocateAtBatch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                source.allocate(GPU0, 500 * MIB)

    recorder = BatchRecorder()
    logger = GPUMemoryLogger(every_n_batches=2, source=source, nvml=False)
    history = _fit([AllocateAtBatch(), logger, recorder], epochs=1)
    batch_peaks = [logs["gpu0_peak_mib"] for _, logs in recorder.batches if "gpu0_peak_mib" in logs]
    assert batch_peaks == [600.0, 100.0, 100.0]
    assert history.history["gpu0_peak_mib"] == [600.0]


def test_batch_hooks_only_when_asked():
    """Epoch-only mode leaves `on_train_batch_end` alone, so async dispatch stays."""
    epoch_only = GPUMemoryLogger(source=FakeSource(), nvml=False)
    per_batch = GPUMemoryLogger(every_n_batches=3, source=FakeSource(), nvml=False)
    base = keras.callbacks.Callback.on_train_batch_end
    assert epoch_only.on_train_batch_end.__func__ is base
    assert per_batch.on_train_batch_end.__func__ is not base
    if IS_KERAS_3:
        bare = keras.callbacks.CallbackList([keras.callbacks.Callback()])
        if not hasattr(bare, "_async_train"):
            pytest.skip("this Keras has no async batch dispatch")
        # Keras 3 dispatches batch hooks asynchronously on thread-safe backends
        # (JAX, torch; not TensorFlow): the logger must not change that.
        async_default = bare._async_train
        assert keras.callbacks.CallbackList([epoch_only])._async_train is async_default
        assert keras.callbacks.CallbackList([per_batch])._async_train is False
    else:
        assert not epoch_only._implements_train_batch_hooks()
        assert per_batch._implements_train_batch_hooks()


def test_headroom_warning_fires_once_per_device():
    source = FakeSource(current={GPU0: 950 * MIB, GPU1: 40 * MIB})
    logger = GPUMemoryLogger(every_n_batches=1, source=source, nvml=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([logger], epochs=3)
    found = [w for w in caught if "peaked at" in str(w.message)]
    messages = [str(w.message) for w in found]
    assert len(messages) == 1
    assert found[0].filename == __file__  # the user's code, not Keras's callback list
    assert "/device:GPU:0" in messages[0]
    assert "950.0 MiB" in messages[0] and "1000.0 MiB" in messages[0]
    assert "GradientAccumulation" in messages[0] and "batch_size // 2" in messages[0]


def test_no_headroom_warning_below_threshold_or_when_off():
    source = FakeSource(current={GPU0: 850 * MIB, GPU1: 40 * MIB})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([GPUMemoryLogger(source=source, nvml=False)], epochs=1)
        source.current[GPU0] = source.peak[GPU0] = 999 * MIB
        _fit([GPUMemoryLogger(source=source, nvml=False, headroom_threshold=None)], epochs=1)
    assert not [w for w in caught if "peaked at" in str(w.message)]


def _legend(figure):
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def _notes(figure):
    return [text.get_text() for text in figure.texts]


def test_summary_and_plot(tmp_path):
    source = FakeSource()
    plan = {1: {GPU0: 300 * MIB}}
    path = tmp_path / "peaks.png"
    logger = GPUMemoryLogger(source=source, nvml=False, plot_path=str(path))
    _fit([Allocate(source, plan), logger], epochs=3)
    assert logger.epoch_peaks == {"gpu0": [100.0, 400.0, 100.0], "gpu1": [40.0, 40.0, 40.0]}
    row = logger.summary["gpu0"]
    assert row["peak_mib"] == 400.0 and row["limit_mib"] == 1000.0
    assert row["headroom_mib"] == 600.0 and row["headroom_fraction"] == pytest.approx(0.6)
    assert row["devices"] == [GPU0]
    assert "gpu1" in logger.summary_text()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every device has its line (and its limit), and nothing needs a note.
    figure = logger.save_plot(tmp_path / "again.png")
    assert _legend(figure) == ["gpu0 peak", "gpu0 limit", "gpu1 peak", "gpu1 limit"]
    lines = figure.axes[0].get_lines()
    assert list(lines[0].get_ydata()) == [100.0, 400.0, 100.0]
    assert list(lines[2].get_ydata()) == [40.0, 40.0, 40.0]
    assert _notes(figure) == []


CPU0, CPU1, CPU2 = "/device:CPU:0", "/device:CPU:1", "/device:CPU:2"


class SharedCPUSource(MemorySource):
    """Logical CPUs 0 and 1 share one allocator; CPU 2 has no figures."""

    def devices(self):
        return [CPU0, CPU1, CPU2]

    def allocator(self, device):
        return CPU2 if device == CPU2 else CPU0

    def read(self, device):
        if device == CPU2:
            raise ValueError("no allocator statistics")
        return MemoryReading(10 * MIB, 30 * MIB)


def test_devices_sharing_an_allocator_are_logged_once_and_the_plot_says_why(tmp_path):
    path = tmp_path / "peaks.png"
    logger = GPUMemoryLogger(
        devices=["/cpu:0", "/cpu:1", "/cpu:2"], source=SharedCPUSource(), plot_path=str(path)
    )
    with pytest.warns(UserWarning, match="no memory figures for /device:CPU:2") as caught:
        history = _fit([logger], epochs=2)
    assert not [w for w in caught if "CPU:1" in str(w.message)]  # shared, not missing
    assert set(history.history) == {"loss", "cpu0_current_mib", "cpu0_peak_mib", "host_rss_mib"}
    assert history.history["cpu0_peak_mib"] == [30.0, 30.0]
    assert logger.summary["cpu0"]["devices"] == [CPU0, CPU1]
    assert "one allocator for cpu0, cpu1" in logger.summary_text()
    assert path.exists()
    figure = logger.save_plot(tmp_path / "again.png")
    assert _legend(figure) == ["cpu0 peak (shared by cpu0, cpu1)"]
    notes = _notes(figure)
    assert notes[0].startswith("cpu0 and cpu1 are logical devices of one CPU and share")
    assert "one line (cpu0)" in notes[0]
    assert notes[1] == "Not plotted (no memory figures, see the warning): cpu2."


def test_state_is_reset_between_runs():
    source = FakeSource()
    logger = GPUMemoryLogger(source=source, nvml=False)
    _fit([Allocate(source, {0: {GPU0: 500 * MIB}}), logger], epochs=1)
    assert logger.summary["gpu0"]["peak_mib"] == 600.0
    _fit([logger], epochs=2)
    assert logger.epoch_peaks["gpu0"] == [100.0, 100.0]
    assert logger.summary["gpu0"]["peak_mib"] == 100.0


# -- real TensorFlow on CPU -----------------------------------------------------


def test_no_gpu_logs_host_key_only_and_warns_once():
    logger = GPUMemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _fit([logger], epochs=2)
        _fit([logger], epochs=1)
    assert set(history.history) == {"loss", "host_rss_mib"}
    assert all(v > 10 for v in history.history["host_rss_mib"])
    assert len([w for w in caught if "no GPU" in str(w.message)]) == 1
    assert logger.summary == {}


def _tensorflow_cpu_world(monkeypatch, world):
    """Makes TensorFlow's CPU allocator answer as it does in `world`.

    - "real": whatever this process's TensorFlow does (oneDNN on or off).
    - "onednn": oneDNN's allocator without BFC: figures (zeros at first).
    - "no-onednn": no statistics, get_memory_info raises.
    - "bfc": TF_CPU_ALLOCATOR_USE_BFC=true, exact figures (here 5 and 7 MiB).
    - "bfc-zero": the BFC allocator with nothing allocated: a real 0.
    """
    experimental = tf.config.experimental
    if world == "real":
        monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
        return
    if world.startswith("bfc"):
        monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", "true")
    else:
        monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    figures = {"bfc": (5 * MIB, 7 * MIB)}.get(world, (0, 0))

    def get_memory_info(device):
        if world == "no-onednn":
            raise ValueError(f"Allocator stats not available for device '{device}'")
        return {"current": figures[0], "peak": figures[1]}

    def reset_memory_stats(device):
        if world == "no-onednn":
            raise ValueError(f"Cannot reset memory stats for device '{device}'")

    monkeypatch.setattr(experimental, "get_memory_info", get_memory_info)
    monkeypatch.setattr(experimental, "reset_memory_stats", reset_memory_stats)


@pytest.mark.parametrize("world", ["real", "onednn", "no-onednn"])
def test_cpu_without_bfc_is_left_out_with_a_warning_with_onednn_on_or_off(monkeypatch, world):
    """oneDNN's CPU allocator answers where the plain one raises: same result for the user."""
    _tensorflow_cpu_world(monkeypatch, world)
    logger = GPUMemoryLogger(devices=["/cpu:0"], every_n_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _fit([logger], epochs=1)
    messages = [str(w.message) for w in caught]
    left_out = [m for m in messages if "no memory figures for /device:CPU:0" in m]
    assert len(left_out) == 1
    assert "TF_CPU_ALLOCATOR_USE_BFC=true" in left_out[0]
    assert [m for m in messages if "no GPU with memory figures" in m]
    assert set(history.history) == {"loss", "host_rss_mib"}


@pytest.mark.parametrize("world, expected", [("bfc", (5.0, 7.0)), ("bfc-zero", (0.0, 0.0))])
def test_cpu_with_bfc_logs_its_figures_and_a_zero_is_a_reading(monkeypatch, world, expected):
    _tensorflow_cpu_world(monkeypatch, world)
    logger = GPUMemoryLogger(devices=["/cpu:0", "/cpu:1"], nvml=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _fit([logger], epochs=1)
    assert not [w for w in caught if "GPUMemoryLogger" in str(w.message)]
    # The logical CPUs share TensorFlow's one CPU allocator: one set of keys.
    assert set(history.history) == {"loss", "cpu0_current_mib", "cpu0_peak_mib", "host_rss_mib"}
    current, peak = expected
    assert history.history["cpu0_current_mib"] == [current]
    assert history.history["cpu0_peak_mib"] == [peak]
    assert logger.summary["cpu0"]["devices"] == [CPU0, CPU1]


_BFC_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras_parallel._compat import keras
    from keras_parallel.callbacks import GPUMemoryLogger

    class Hold(keras.callbacks.Callback):
        # Epoch 0 briefly holds 64 MiB on the CPU allocator.
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 0:
                block = tf.ones([16 * 2**20], tf.float32)
                float(tf.reduce_sum(block))
                del block

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    x = np.ones((32, 4), "float32")
    y = np.ones((32, 1), "float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    logger = GPUMemoryLogger(devices=["/cpu:0", "/cpu:1"], nvml=False)
    history = model.fit(data, epochs=3, verbose=0, callbacks=[Hold(), logger])
    history.history["shared"] = logger.summary["cpu0"]["devices"]
    print("RESULT" + json.dumps(history.history))
    """
)


def test_real_bfc_allocator_figures_on_cpu():
    """Real figures with oneDNN on or off: the run inherits TF_ENABLE_ONEDNN_OPTS."""
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", _BFC_SCRIPT, ROOT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [s for s in done.stdout.splitlines() if s.startswith("RESULT")][-1]
    history = json.loads(line[len("RESULT") :])
    # Two logical CPUs, one allocator: one set of keys that stands for both.
    assert history.pop("shared") == ["/device:CPU:0", "/device:CPU:1"]
    assert set(history) == {"loss", "cpu0_current_mib", "cpu0_peak_mib", "host_rss_mib"}
    peaks, currents = history["cpu0_peak_mib"], history["cpu0_current_mib"]
    assert all(c > 0 for c in currents)
    assert all(p >= c for p, c in zip(peaks, currents, strict=True))
    # The 64 MiB block counts in epoch 0 only: the peak was reset after it.
    assert peaks[0] >= 64
    assert peaks[1] < 64 and peaks[2] < 64
