"""Training speed of DataParallel against one device and against MirroredStrategy.

One process, the CPU split into 3 logical devices before TensorFlow touches a
device. For n = 2 and n = 3 devices, three configurations train the same small
Conv3D video classifier (clips of 8x32x32x3, 4 classes, SGD) from the same
initial weights on the same global batch:

    a  the template on one device (no strategy, no wrapper)
    b  keras_parallel.DataParallel(template, devices=["/cpu:0", ..., "/cpu:n-1"])
    c  the template built and compiled under
       tf.distribute.MirroredStrategy(devices=["/cpu:0", ..., "/cpu:n-1"])

The global batch is `--per-device-batch` x n (8 x 2 = 16 and 8 x 3 = 24 by
default), so a_n trains on the same batch as b_n and c_n. Every model is built
and compiled once and warmed up (its first `fit` traces); then every repeat
times one `fit(steps_per_epoch=--steps)` call of each of the six
configurations, interleaved (a2 b2 c2 a3 b3 c3), on a pre-built, cached,
repeating `tf.data` pipeline. Samples/s is steps x global batch / wall time
from `on_train_begin` to `on_train_end` of that call (`SpanTimer`); the script
prints the median per configuration, b/a and b/c (ratios of the medians, as
the goals are stated, and the medians of per-repeat ratios), and the process
CPU time per sample (all threads), which other processes on the cores
disturb far less than wall time.

The logical devices share the machine's cores, so b/a = 1.0 is the ceiling
here: the benchmark measures DataParallel's overhead, not a speed-up.

    python benchmarks/data_parallel.py [--repeats 7] [--steps 30] [--quick]
    TF_USE_LEGACY_KERAS=1 python benchmarks/data_parallel.py   # tf-keras
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

# Before anything touches a TensorFlow device: 3 logical CPU devices.
_LOGICAL_DEVICES = 3
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * _LOGICAL_DEVICES,
)

import numpy as np  # noqa: E402

import keras_parallel  # noqa: E402
from keras_parallel._compat import FLAVOUR, keras  # noqa: E402

CLIP = (8, 32, 32, 3)
CLASSES = 4


def build_template():
    """The small Conv3D video classifier every configuration trains."""
    inputs = keras.Input(CLIP, name="clips")
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling3D(2)(x)
    x = keras.layers.Conv3D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    outputs = keras.layers.Dense(CLASSES, name="label")(x)
    return keras.Model(inputs, outputs, name="video_classifier")


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def make_dataset(batch_size: int, rows: int = 96):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, *CLIP)).astype("float32")
    y = rng.integers(0, CLASSES, size=(rows,)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat()
    return data.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _mirrored_strategy(devices, key_base: int):
    """A MirroredStrategy with its default cross-device ops (ring collectives on CPU).

    Two MirroredStrategy objects in one process both number their collective
    groups from 1, so the second one's all-reduce joins the first one's group
    and fails ("joining a group with size 3, but that group has size 2").
    TensorFlow's own tests give each strategy its own base through the class
    attribute `_collective_key_base`; a subclass does the same here.
    """
    strategy_class = type(
        "MirroredStrategy", (tf.distribute.MirroredStrategy,), {"_collective_key_base": key_base}
    )
    return strategy_class(devices=devices)


def build_configs(device_counts, per_device_batch: int, initial_weights, merge_device: str):
    """{name: (model, dataset, global batch)} for a_n, b_n, c_n, n in `device_counts`."""
    configs = {}
    for n in device_counts:
        devices = [f"/cpu:{i}" for i in range(n)]
        batch = per_device_batch * n
        data = make_dataset(batch)

        single = build_template()
        single.set_weights(initial_weights)
        _compile(single)
        configs[f"a{n}"] = (single, data, batch)

        template = build_template()
        template.set_weights(initial_weights)
        parallel = keras_parallel.DataParallel(template, devices=devices, merge_device=merge_device)
        _compile(parallel)
        configs[f"b{n}"] = (parallel, data, batch)

        strategy = _mirrored_strategy(devices, key_base=100 * n)
        with strategy.scope():
            mirrored = build_template()
            mirrored.set_weights(initial_weights)
            _compile(mirrored)
        configs[f"c{n}"] = (mirrored, data, batch)
    return configs


class SpanTimer(keras.callbacks.Callback):
    """Wall and process CPU seconds from `on_train_begin` to `on_train_end`.

    The span leaves out what `fit` does before its first callback and after
    its last (building the epoch iterator, and tearing it down: about 0.5 s on
    some calls here, whatever the model), so it times the training steps. It
    has no batch hooks, so it does not change how `fit` dispatches steps.
    """

    def on_train_begin(self, logs=None):
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def on_train_end(self, logs=None):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _fit_seconds(model, data, steps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of `steps` training steps in one `fit` call."""
    timer = SpanTimer()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return timer.wall, timer.cpu


def benchmark(
    repeats: int,
    steps: int,
    warmup_steps: int,
    device_counts,
    per_device_batch: int,
    merge_device: str = "cpu",
) -> dict:
    keras.utils.set_random_seed(0)
    initial_weights = build_template().get_weights()
    configs = build_configs(device_counts, per_device_batch, initial_weights, merge_device)
    for model, data, _ in configs.values():  # the first fit traces
        _fit_seconds(model, data, warmup_steps)
    rates = {name: [] for name in configs}
    cpu_ms = {name: [] for name in configs}
    for _ in range(repeats):
        for name, (model, data, batch) in configs.items():  # interleaved
            wall, cpu = _fit_seconds(model, data, steps)
            rates[name].append(steps * batch / wall)
            cpu_ms[name].append(1000 * cpu / (steps * batch))
    return {
        "rates": rates,
        "cpu_ms": {name: statistics.median(c) for name, c in cpu_ms.items()},
        "medians": {name: statistics.median(r) for name, r in rates.items()},
        "batches": {name: batch for name, (_, _, batch) in configs.items()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed fit call")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=[2, 3],
        choices=[2, 3],
        help="device counts to compare (default: 2 3)",
    )
    parser.add_argument(
        "--merge-device", default="cpu", help="DataParallel merge_device (default: cpu)"
    )
    parser.add_argument(
        "--intra-op",
        type=int,
        default=None,
        help="tf.config.threading intra-op threads (default: TF's)",
    )
    parser.add_argument(
        "--inter-op",
        type=int,
        default=None,
        help="tf.config.threading inter-op threads (default: TF's)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 repeats of 5 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup_steps = 2, 5, 2
    if args.intra_op is not None:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    if args.inter_op is not None:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)

    load_before = os.getloadavg()
    wall = time.perf_counter()
    result = benchmark(
        args.repeats,
        args.steps,
        args.warmup_steps,
        args.devices,
        args.per_device_batch,
        args.merge_device,
    )
    wall = time.perf_counter() - wall

    medians, batches, rates = result["medians"], result["batches"], result["rates"]
    print(
        f"flavour={FLAVOUR} tensorflow={tf.__version__} keras={keras.__version__} "
        f"cpu cores={os.cpu_count()} logical CPU devices={_LOGICAL_DEVICES}"
    )
    print(
        f"threads: intra-op={tf.config.threading.get_intra_op_parallelism_threads()} "
        f"inter-op={tf.config.threading.get_inter_op_parallelism_threads()} (0 = TF default)"
    )
    print(
        f"repeats={args.repeats} steps per fit={args.steps} "
        f"per-device batch={args.per_device_batch} merge_device={args.merge_device}"
    )
    print()
    print("| config | devices | global batch | median samples/s | CPU ms/sample | all repeats |")
    print("|---|---|---|---|---|---|")
    labels = {"a": "a: template, one device", "b": "b: DataParallel", "c": "c: MirroredStrategy"}
    for name, median in medians.items():
        count = 1 if name[0] == "a" else int(name[1:])
        runs = " ".join(f"{r:.0f}" for r in rates[name])
        print(
            f"| {labels[name[0]]} | {count} | {batches[name]} | {median:.1f} "
            f"| {result['cpu_ms'][name]:.2f} | {runs} |"
        )
    print()
    print("| devices | b/a (goal >= 1.0) | b/c (goal >= 1.5) |")
    print("|---|---|---|")
    for n in args.devices:
        b_over_a = medians[f"b{n}"] / medians[f"a{n}"]
        b_over_c = medians[f"b{n}"] / medians[f"c{n}"]
        print(f"| {n} | {b_over_a:.3f} | {b_over_c:.3f} |")
    print()
    print(
        "Per-repeat ratios (b and its a, c timed back to back; less sensitive to load "
        "that changes during the run):"
    )
    for n in args.devices:
        paired_a = [b / a for b, a in zip(rates[f"b{n}"], rates[f"a{n}"], strict=True)]
        paired_c = [b / c for b, c in zip(rates[f"b{n}"], rates[f"c{n}"], strict=True)]
        print(
            f"  {n} devices: median b/a {statistics.median(paired_a):.3f} "
            f"[{' '.join(f'{r:.2f}' for r in paired_a)}], "
            f"median b/c {statistics.median(paired_c):.3f} "
            f"[{' '.join(f'{r:.2f}' for r in paired_c)}]"
        )
    print()
    print(
        f"run time (build, warm-up, timing): {wall:.0f} s; load average before "
        f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 min; other processes "
        "on these cores bias every figure)"
    )


if __name__ == "__main__":
    main()
