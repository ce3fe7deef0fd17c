"""Speed and memory of GradientAccumulation against plain `fit` and Keras 3's option.

One run, a small Conv3D video classifier, the configurations interleaved over several
repeats (medians reported):

- speed, samples/s: GradientAccumulation (batch 32, micro 8) against plain `fit` at
  batch 8 and, on Keras 3, the optimizer's `gradient_accumulation_steps=4` at batch 8;
- memory: the TensorFlow allocator's peak over one epoch, plain batch 32 against
  GradientAccumulation micro 8 (on a CPU this needs TF_CPU_ALLOCATOR_USE_BFC=true
  before TensorFlow starts, which this script sets; the tf.data pipeline is built
  before the stats are reset and inter-op threads are 1, for a repeatable figure).

Usage: python benchmarks/accumulation.py [--repeats 3] [--samples 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_parallel._compat import FLAVOUR, IS_KERAS_3, keras  # noqa: E402
from keras_parallel.callbacks import GradientAccumulation  # noqa: E402

CLIP = (8, 32, 32, 3)
CLASSES = 10
MIB = 2**20


def build_model(accumulation_steps=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(CLIP),
            keras.layers.Conv3D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling3D((1, 2, 2)),
            keras.layers.Conv3D(32, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling3D(),
            keras.layers.Dense(CLASSES),
        ]
    )
    kwargs = {"gradient_accumulation_steps": accumulation_steps} if accumulation_steps else {}
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, **kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def dataset(x, y, batch_size):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).prefetch(1)


def configurations():
    accumulation = GradientAccumulation(8)  # one instance: traced once, like one fit
    configs = {
        "plain_b8": dict(batch=8, callbacks=lambda: []),
        "ga_b32_m8": dict(batch=32, callbacks=lambda: [accumulation]),
    }
    if IS_KERAS_3:
        configs["keras_ga4_b8"] = dict(batch=8, callbacks=lambda: [], steps=4)
    return configs


def measure_speed(x, y, repeats):
    configs = configurations()
    models, data = {}, {}
    for name, config in configs.items():
        models[name] = build_model(config.get("steps"))
        data[name] = dataset(x, y, config["batch"])
        models[name].fit(data[name], epochs=1, verbose=0, callbacks=config["callbacks"]())
    rates = {name: [] for name in configs}
    for _ in range(repeats):
        for name, config in configs.items():
            start = time.perf_counter()
            models[name].fit(data[name], epochs=1, verbose=0, callbacks=config["callbacks"]())
            rates[name].append(len(x) / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def measure_peak(x, y, repeats):
    configs = {
        "plain_b32": dict(batch=32, callbacks=lambda: []),
        "ga_b32_m8": dict(batch=32, callbacks=lambda: [accumulation]),
    }
    accumulation = GradientAccumulation(8)
    models, data = {}, {}
    for name, config in configs.items():
        models[name] = build_model()
        data[name] = dataset(x, y, config["batch"])
        models[name].fit(data[name], epochs=1, verbose=0, callbacks=config["callbacks"]())
    peaks = {name: [] for name in configs}
    for _ in range(repeats):
        for name, config in configs.items():
            tf.config.experimental.reset_memory_stats("CPU:0")
            base = tf.config.experimental.get_memory_info("CPU:0")["current"]
            models[name].fit(data[name], epochs=1, verbose=0, callbacks=config["callbacks"]())
            peaks[name].append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - base)
    return {name: statistics.median(values) for name, values in peaks.items()}, peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, *CLIP)).astype("float32")
    y = rng.integers(0, CLASSES, size=(args.samples,))

    peaks, all_peaks = measure_peak(x, y, args.repeats)
    speed = measure_speed(x, y, args.repeats)
    print(f"flavour={FLAVOUR} devices={[d.name for d in tf.config.list_logical_devices()]}")
    print(f"clip={CLIP} samples={args.samples} repeats={args.repeats}")
    for name, rate in speed.items():
        print(f"speed {name:14s} {rate:8.1f} samples/s")
    print(f"ratio ga_b32_m8 / plain_b8   {speed['ga_b32_m8'] / speed['plain_b8']:.3f}")
    if "keras_ga4_b8" in speed:
        print(f"ratio ga_b32_m8 / keras_ga4_b8 {speed['ga_b32_m8'] / speed['keras_ga4_b8']:.3f}")
    for name, peak in peaks.items():
        runs = ", ".join(f"{p / MIB:.1f}" for p in all_peaks[name])
        print(f"peak  {name:14s} {peak / MIB:8.1f} MiB (runs: {runs})")
    print(f"ratio peak ga_b32_m8 / plain_b32 {peaks['ga_b32_m8'] / peaks['plain_b32']:.3f}")


if __name__ == "__main__":
    main()
