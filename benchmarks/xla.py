"""DataParallel under every `jit_compile` setting, on a CPU proxy for two devices.

Keras 3 compiles the training step with XLA by default on machines with a GPU
(`jit_compile="auto"`), and XLA compiles the whole step for one device. This
script keeps the figures of that problem current, on Keras 3 (TensorFlow):

    bare, jit=True         the template alone, XLA (what every slice on one
                           device costs: the speed DataParallel fell to under XLA)
    bare, jit=False        the template alone, no XLA
    DP, jit=False          DataParallel over 2 devices
    DP, jit=True           DataParallel, `jit_compile=True` asked (turned off, warned)
    DP, auto on GPU view   DataParallel, default "auto", with Keras shown a GPU
                           (so "auto" would mean XLA for a plain model)
    DP, shared reads       DataParallel with every replica reading the variables
                           where they live (the reads before keras_parallel 0.2);
                           DP, jit=False reads them as values copied to each
                           replica's device: the cost of that copy

The CPU proxy models two devices that each have their own compute: oneDNN off
(its kernels take every core, so two logical devices would fight), one thread
per op (intra-op 1) and two ops at a time (inter-op 2), the CPU split into 2
logical devices. The model is a small Conv3D clip classifier (clips of
8x32x32x3), global batch 16, SGD. Every configuration is warmed up; then each
repeat times one `fit(steps_per_epoch=--steps)` per configuration, interleaved,
and the script prints medians of samples/s.

    python benchmarks/xla.py [--repeats 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(2)
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import numpy as np  # noqa: E402

import keras_parallel  # noqa: E402
from keras_parallel._compat import IS_KERAS_3, keras  # noqa: E402
from keras_parallel.layers.parallel_replicas import ParallelReplicas  # noqa: E402

CLIP = (8, 32, 32, 3)
BATCH = 16
DEVICES = ["/cpu:0", "/cpu:1"]


def build_template(weights=None):
    inputs = keras.Input(CLIP)
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling3D(2)(x)
    x = keras.layers.Conv3D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    if weights is not None:
        model.set_weights(weights)
    return model


def make_dataset():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, *CLIP)).astype("float32")
    y = rng.integers(0, 4, size=(96,)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat()
    return data.batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _compile(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.compile(
            keras.optimizers.SGD(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **kwargs,
        )
    return model


class _SharedReads(ParallelReplicas):
    """The replicas reading the variables where they live (no per-device copy)."""

    @property
    def _collects_losses(self):
        return False


def _gpu_view():
    real = tf.config.list_physical_devices

    def with_gpu(device_type=None):
        devices = list(real(device_type))
        if device_type in (None, "GPU"):
            devices.append(tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU"))
        return devices

    return real, with_gpu


def build_configs(weights):
    configs = {
        "bare, jit=True": _compile(build_template(weights), jit_compile=True),
        "bare, jit=False": _compile(build_template(weights), jit_compile=False),
        "DP, jit=False": _compile(
            keras_parallel.DataParallel(build_template(weights), DEVICES), jit_compile=False
        ),
        "DP, jit=True": _compile(
            keras_parallel.DataParallel(build_template(weights), DEVICES), jit_compile=True
        ),
    }
    real, with_gpu = _gpu_view()
    tf.config.list_physical_devices = with_gpu
    try:
        auto = _compile(keras_parallel.DataParallel(build_template(weights), DEVICES))
        configs["DP, auto on GPU view"] = auto
        resolved = auto.jit_compile
    finally:
        tf.config.list_physical_devices = real
    shared = keras_parallel.DataParallel(build_template(weights), DEVICES)
    keras_parallel.replicas(shared).__class__ = _SharedReads
    configs["DP, shared reads"] = _compile(shared, jit_compile=False)
    return configs, resolved


def _fit_seconds(model, data, steps):
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if not IS_KERAS_3:
        raise SystemExit("jit_compile='auto' is Keras 3's: run without TF_USE_LEGACY_KERAS")
    keras.utils.set_random_seed(0)
    weights = build_template().get_weights()
    configs, resolved = build_configs(weights)
    data = make_dataset()
    for model in configs.values():
        _fit_seconds(model, data, 3)  # traces
    rates = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, model in configs.items():
            rates[name].append(args.steps * BATCH / _fit_seconds(model, data, args.steps))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(
        f"Keras {keras.__version__}, TensorFlow {tf.__version__}; 2 logical CPUs, oneDNN "
        f"off, intra-op 1, inter-op 2; batch {BATCH}; medians of {args.repeats} x "
        f"{args.steps} steps"
    )
    print(f'"auto" with a GPU in view resolved to jit_compile={resolved}')
    print("| configuration | samples/s | / DP, jit=False |")
    print("|---|---|---|")
    base = medians["DP, jit=False"]
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value / base:.3f} |")


if __name__ == "__main__":
    main()
