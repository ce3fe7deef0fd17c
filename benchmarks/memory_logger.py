"""How much GPUMemoryLogger adds to an epoch; and the docs' example run.

Benchmark (default): a small MLP trained on the CPU in three configurations,
interleaved over several repeats in one process: no logger, the logger at epoch
ends only, the logger every 10 batches. The logger reads TensorFlow's real
allocator figures for the CPU (``TF_CPU_ALLOCATOR_USE_BFC=true`` is set before
TensorFlow starts), host RSS and NVML where present. Epoch time runs from the
first callback's `on_epoch_begin` to the last callback's `on_epoch_end`, so the
logger's own epoch-end work counts. The first epoch of each fit (tracing) is
dropped; the script prints the median epoch time per configuration and the
ratios to "no logger".

    python benchmarks/memory_logger.py [--repeats 5] [--epochs 4] [--steps 200]
    TF_USE_LEGACY_KERAS=1 python benchmarks/memory_logger.py   # tf-keras

Docs run (``--docs DIR``): trains a small model for 6 epochs with an injected
memory source that stands in for two unequal GPUs (12 GiB and 6 GiB, the
batch split 2:1), a CSVLogger after the logger and a plot; writes
``DIR/memory_log.csv`` and ``DIR/memory_logger_peaks.png`` and prints the
History.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_parallel._compat import FLAVOUR, keras  # noqa: E402
from keras_parallel.callbacks import GPUMemoryLogger  # noqa: E402
from keras_parallel.memory import MIB, MemoryReading, MemorySource  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Epoch wall time: `start` goes first in the list, `stop` last."""

    def __init__(self):
        super().__init__()
        self.times = []
        self._t0 = None

    def start(self):
        timer = self

        class Start(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                timer._t0 = time.perf_counter()

        return Start()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._t0)


def _model():
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def benchmark(repeats: int, epochs: int, steps: int, batch_size: int = 64) -> dict:
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch_size, 64)).astype("float32")
    y = rng.integers(0, 10, size=(steps * batch_size,))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache()
    configs = {
        "none": lambda: [],
        "epoch_only": lambda: [GPUMemoryLogger(devices=["/cpu:0"])],
        "every_10": lambda: [GPUMemoryLogger(devices=["/cpu:0"], every_n_batches=10)],
    }
    times = {name: [] for name in configs}
    keys = {}
    for _ in range(repeats):
        for name, make in configs.items():  # interleaved
            keras.backend.clear_session()
            model = _model()
            timer = EpochTimer()
            history = model.fit(
                data,
                epochs=epochs,
                verbose=0,
                callbacks=[timer.start(), *make(), timer],
            )
            times[name].extend(timer.times[1:])  # drop the tracing epoch
            keys[name] = sorted(history.history)
    medians = {name: statistics.median(t) for name, t in times.items()}
    # The cost of one reading on its own, for a noise-free bound.
    logger = GPUMemoryLogger(devices=["/cpu:0"])
    logger.set_model(_model())
    logger.on_train_begin()
    t0 = time.perf_counter()
    for _ in range(1000):
        logger._read()
    per_reading = (time.perf_counter() - t0) / 1000
    return {
        "medians": medians,
        "keys": keys,
        "samples": {k: len(v) for k, v in times.items()},
        "per_reading": per_reading,
    }


class TwoUnequalGPUs(MemorySource):
    """Stands in for a 12 GiB and a 6 GiB GPU, the batch split 2:1.

    Weights and optimizer state sit on both (600 MiB); activations take
    30 MiB per sample at peak; epoch 4 holds an extra 1.5 GiB on GPU 1 (a
    larger evaluation batch, say). Current use between steps is weights plus
    2 MiB per sample of the slice.
    """

    limits = {"/device:GPU:0": 12 * 1024 * MIB, "/device:GPU:1": 6 * 1024 * MIB}
    share = {"/device:GPU:0": 2 / 3, "/device:GPU:1": 1 / 3}

    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.epoch = 0
        self._peak = {d: 0 for d in self.limits}

    def devices(self):
        return list(self.limits)

    def _current(self, device):
        return 600 * MIB + int(2 * MIB * self.batch_size * self.share[device])

    def step(self):
        for device in self.limits:
            peak = 600 * MIB + int(30 * MIB * self.batch_size * self.share[device])
            if self.epoch == 3 and device == "/device:GPU:1":
                peak += 1536 * MIB
            self._peak[device] = max(self._peak[device], peak)

    def read(self, device):
        return MemoryReading(
            self._current(device),
            max(self._peak[device], self._current(device)),
            self.limits[device],
        )

    def reset_peak(self, device):
        self._peak[device] = self._current(device)
        return True


def docs_run(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    batch_size = 192
    source = TwoUnequalGPUs(batch_size)

    class Steps(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            source.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            source.step()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size * 4, 64)).astype("float32")
    y = rng.integers(0, 10, size=(batch_size * 4,))
    model = _model()
    csv_path = os.path.join(out_dir, "memory_log.csv")
    logger = GPUMemoryLogger(
        source=source,
        nvml=False,
        plot_path=os.path.join(out_dir, "memory_logger_peaks.png"),
        verbose=1,
    )
    history = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=6,
        verbose=2,
        callbacks=[Steps(), logger, keras.callbacks.CSVLogger(csv_path)],
    )
    for key, values in history.history.items():
        print(key, [round(v, 3) for v in values])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--docs", metavar="DIR", default=None)
    args = parser.parse_args(argv)
    if args.docs:
        docs_run(args.docs)
        return
    result = benchmark(args.repeats, args.epochs, args.steps)
    medians = result["medians"]
    print(f"flavour={FLAVOUR} backend=tensorflow (CPU, real BFC allocator figures)")
    print(f"epochs timed per configuration: {result['samples']}")
    for name, value in medians.items():
        print(f"{name:>10}: median epoch {value * 1000:.1f} ms")
    print(f"ratio epoch_only / none: {medians['epoch_only'] / medians['none']:.4f}")
    print(f"ratio every_10 / none:   {medians['every_10'] / medians['none']:.4f}")
    print(f"keys (epoch_only): {result['keys']['epoch_only']}")
    per_reading, steps = result["per_reading"], args.steps
    print(f"one reading: {per_reading * 1e6:.1f} us")
    print(
        "bound from the reading cost alone: epoch_only "
        f"{1 + per_reading / medians['none']:.5f}, every_10 "
        f"{1 + (steps // 10 + 1) * per_reading / medians['none']:.5f}"
    )


if __name__ == "__main__":
    main()
