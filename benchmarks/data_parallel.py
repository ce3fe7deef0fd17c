"""DataParallel against the physical limit of its devices (a CPU proxy).

Two logical CPU devices stand in for two GPUs. A GPU is a device with its own
compute; a logical CPU device is not, unless the harness makes it so:

- TensorFlow's oneDNN kernels are turned off (TF_ENABLE_ONEDNN_OPTS=0, set here
  before TensorFlow is imported): with oneDNN each convolution takes every core
  of the machine, so two "devices" fight over the same cores and the figures
  say nothing about two GPUs (measured: 0.41-0.58x one device);
- one thread per op (intra-op 1) and two ops at a time (inter-op 2): each device
  runs one op at a time, on one core, and the two devices can run side by side.

The physical limit is what two such devices can do at best: 2x the rate of the
same model on ONE core, measured in a child process (intra-op 1, inter-op 1) at
the per-device batch (half the global batch). The template alone in this
process is no limit: with inter-op 2 it already spreads over both cores as the
batch grows.

Two cores of one machine are not two GPUs: running side by side they share the
memory bus, the last-level cache and the power budget. "two apart" measures what
that costs with nothing of Keras connecting them: two one-core children, each
training its own copy at the per-device batch, started together; their summed
rate is the most any two-device method can reach on these cores. DataParallel 2
/ two apart is the share of that reach keras_parallel delivers.

Configurations, each at global batch 16, 32 and 64 (480 clips an epoch, one
epoch per timed `fit`), from the same initial weights:

    one core        the template in the child, per-device batch (the limit is 2x)
    two apart       two such children at once, their rates summed
    DataParallel 2, 5 steps a call
                    the same, compiled with steps_per_execution=5 (Keras runs
                    5 steps per call: Python's part of a step, during which
                    both devices wait, once per 5 steps)
    DataParallel 2  keras_parallel.DataParallel(template, devices=["/cpu:0", "/cpu:1"])
    Mirrored 2      the template built under tf.distribute.MirroredStrategy (same devices),
                    in a child process with this one's threads and devices, so neither
                    method runs beside the other's state (one measurement saw
                    DataParallel 2 at 0.82-0.85 of two apart after a MirroredStrategy
                    model had trained in its process, 0.93 before; a second saw no
                    difference)
    DataParallel 1  keras_parallel.DataParallel(template, devices=["/cpu:0"])
    bare            the template alone (what DataParallel over one device is compared with)

Every configuration is warmed up (its first `fit` traces); then each repeat
times one `fit` of every configuration, interleaved, and the script prints the
medians, the spread of the repeats ((max - min) / median), the CPU seconds per
sample (process CPU time of all threads; the child's own for "one core"), and
the ratios the goals are stated in: DataParallel 2 / limit, DataParallel 2 /
Mirrored 2, DataParallel 1 / bare, and DataParallel 2 / two apart. Each ratio
is taken per repeat (numerator and denominator timed within the same half
minute, so a slow spell of a shared machine slows both) and summarized by its
median and interquartile range over the repeats.

    python benchmarks/data_parallel.py [--repeats 9] [--batches 16 32 64] [--quick]
    TF_USE_LEGACY_KERAS=1 python benchmarks/data_parallel.py   # tf-keras

What a CPU proxy cannot say about GPUs: kernel launch costs, host-to-device
copies, peer-to-peer bandwidth and the asynchrony of GPU streams are absent here;
what it shows is the serial part of a step (Python, slicing, the merge, the
loss, the gradient sum, the update) against two devices' worth of compute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Before TensorFlow is imported (see the module docstring).
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD_FLAGS = {"--one-core-child": "one core", "--mirrored-child": "Mirrored 2"}
CHILD = next((kind for flag, kind in CHILD_FLAGS.items() if flag in sys.argv), None)
ONE_CORE = CHILD == "one core"

import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1 if ONE_CORE else 2)
if not ONE_CORE:  # two logical CPU devices, before anything touches a device
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )

import numpy as np  # noqa: E402

import keras_parallel  # noqa: E402
from keras_parallel._compat import FLAVOUR, keras  # noqa: E402

CLIP = (8, 32, 32, 3)
CLASSES = 4
EPOCH = 480  # clips per timed fit
DEVICES = ["/cpu:0", "/cpu:1"]
STEPS_PER_CALL = 5
CONFIGS = (
    "one core",
    "two apart",
    "DataParallel 2",
    f"DataParallel 2, {STEPS_PER_CALL} steps a call",
    "Mirrored 2",
    "DataParallel 1",
    "bare",
)


def build_template():
    """The Conv3D clip classifier every configuration trains."""
    inputs = keras.Input(CLIP, name="clips")
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling3D(2)(x)
    x = keras.layers.Conv3D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    outputs = keras.layers.Dense(CLASSES, name="label")(x)
    return keras.Model(inputs, outputs, name="video_classifier")


def _compiled(model, steps_per_execution: int = 1):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
    )
    return model


def _from(weights):
    model = build_template()
    model.set_weights(weights)
    return model


def make_dataset(batch_size: int):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EPOCH, *CLIP)).astype("float32")
    y = rng.integers(0, CLASSES, size=(EPOCH,)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat()
    return data.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


class SpanTimer(keras.callbacks.Callback):
    """Wall and process CPU seconds from `on_train_begin` to `on_train_end`.

    The span leaves out `fit`'s iterator set-up and tear-down, so it times the
    steps. No batch hooks: it does not change how `fit` dispatches steps.
    """

    def on_train_begin(self, logs=None):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def on_train_end(self, logs=None):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


class StepTimes(keras.callbacks.Callback):
    """Wall seconds of every step, from its batch-begin hook to its batch-end hook.

    Batch hooks make `fit` wait for each step: used only where a step is
    synchronous anyway (the one-thread child), never in a timed comparison.
    """

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def timed_fit(model, data, batch: int, callbacks=()) -> tuple[float, float]:
    """(samples/s, CPU seconds per sample) of one epoch of `EPOCH` clips.

    With several steps per call, the epoch is cut to a multiple of them (Keras
    would run a last call's steps in full, past `steps_per_epoch`).
    """
    timer = SpanTimer()
    per_call = int(np.asarray(getattr(model, "steps_per_execution", 1)))
    steps = EPOCH // batch // per_call * per_call
    model.fit(
        data,
        epochs=1,
        steps_per_epoch=steps,
        verbose=0,
        callbacks=[timer, *callbacks],
        shuffle=False,
    )
    return steps * batch / timer.wall, timer.cpu / (steps * batch)


def child_main() -> int:
    """A child: reads "BATCH" or "BATCH steps" lines, answers one JSON line each.

    The one-core child trains the template on one thread; the Mirrored child
    trains it under a MirroredStrategy over the two logical devices, with the
    parent's threads. With "steps" the answer also holds every step's wall
    seconds.
    """
    keras.utils.set_random_seed(0)
    weights = build_template().get_weights()
    strategy = None if ONE_CORE else tf.distribute.MirroredStrategy(devices=DEVICES)
    models, data = {}, {}
    for line in sys.stdin:
        batch, *flags = line.split()
        batch = int(batch)
        if batch not in models:
            if strategy is None:
                models[batch] = _compiled(_from(weights))
            else:
                with strategy.scope():
                    models[batch] = _compiled(_from(weights))
            data[batch] = make_dataset(batch)
            timed_fit(models[batch], data[batch], batch)  # trace, warm up
        step_times = StepTimes()
        callbacks = [step_times] if "steps" in flags else []
        rate, cpu = timed_fit(models[batch], data[batch], batch, callbacks)
        answer = {"rate": rate, "cpu": cpu}
        if callbacks:
            answer["steps"] = step_times.times
        print(json.dumps(answer), flush=True)
    return 0


class Child:
    """A child process (`kind`: "one core" or "Mirrored 2"): `measure(batch)` times
    one epoch there while this one waits; `start` and `result` let two run at once."""

    def __init__(self, kind: str = "one core"):
        flag = next(f for f, k in CHILD_FLAGS.items() if k == kind)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), flag],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def start(self, batch: int, step_times: bool = False) -> None:
        self.process.stdin.write(f"{batch} steps\n" if step_times else f"{batch}\n")
        self.process.stdin.flush()

    def result(self) -> tuple[float, float]:
        answer = self.answer()
        return answer["rate"], answer["cpu"]

    def answer(self) -> dict:
        """The child's whole answer: "rate", "cpu" and, when asked for, "steps"."""
        return json.loads(self.process.stdout.readline())

    def measure(self, batch: int) -> tuple[float, float]:
        self.start(batch)
        return self.result()

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def build_models(weights) -> dict:
    dp = keras_parallel.DataParallel
    return {
        "DataParallel 2": _compiled(dp(_from(weights), devices=DEVICES)),
        CONFIGS[3]: _compiled(dp(_from(weights), devices=DEVICES), STEPS_PER_CALL),
        "DataParallel 1": _compiled(dp(_from(weights), devices=DEVICES[:1])),
        "bare": _compiled(_from(weights)),
    }


def benchmark(repeats: int, batches) -> dict:
    keras.utils.set_random_seed(0)
    weights = build_template().get_weights()
    models = build_models(weights)
    data = {b: make_dataset(b) for b in batches}
    one_core, other_core, mirrored = Child(), Child(), Child("Mirrored 2")
    try:
        for batch in batches:  # the first fit of each shape traces
            one_core.measure(batch // 2)
            other_core.measure(batch // 2)
            mirrored.measure(batch)
            for model in models.values():
                timed_fit(model, data[batch], batch)
        rates = {(c, b): [] for b in batches for c in CONFIGS}
        cpu = {(c, b): [] for b in batches for c in CONFIGS}
        for _ in range(repeats):
            for batch in batches:
                for config in CONFIGS:  # interleaved
                    if config == "one core":
                        rate, seconds = one_core.measure(batch // 2)
                    elif config == "two apart":  # both children at once
                        one_core.start(batch // 2)
                        other_core.start(batch // 2)
                        (rate_a, cpu_a), (rate_b, cpu_b) = one_core.result(), other_core.result()
                        rate, seconds = rate_a + rate_b, (cpu_a + cpu_b) / 2
                    elif config == "Mirrored 2":
                        rate, seconds = mirrored.measure(batch)
                    else:
                        rate, seconds = timed_fit(models[config], data[batch], batch)
                    rates[config, batch].append(rate)
                    cpu[config, batch].append(seconds)
    finally:
        for child in (one_core, other_core, mirrored):
            child.close()
    return {"rates": rates, "cpu": cpu}


#: The goal ratios: name -> (numerator config, denominator config, factor on
#: the denominator). Each is taken per repeat, from figures measured minutes
#: apart at most, then summarized over the repeats.
RATIOS = {
    "dp_over_limit": ("DataParallel 2", "one core", 2),
    "mirrored_over_limit": ("Mirrored 2", "one core", 2),
    "dp_over_mirrored": ("DataParallel 2", "Mirrored 2", 1),
    "dp1_over_bare": ("DataParallel 1", "bare", 1),
    "apart_over_limit": ("two apart", "one core", 2),
    "dp_over_apart": ("DataParallel 2", "two apart", 1),
    "dp_calls_over_limit": (CONFIGS[3], "one core", 2),
    "dp_calls_over_apart": (CONFIGS[3], "two apart", 1),
}


def quartiles(values) -> tuple[float, float, float]:
    """First quartile, median and third quartile of `values`."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summary(result, batches) -> dict:
    """Medians, spreads, CPU s/sample and the goal ratios, per global batch.

    A goal ratio is the median of its per-repeat ratios (both figures from the
    same repeat, so a slow minute of the machine slows both), with the
    interquartile range of those ratios beside it ("<name>_iqr").
    """
    rates, cpu = result["rates"], result["cpu"]
    out = {}
    for batch in batches:
        median = {c: statistics.median(rates[c, batch]) for c in CONFIGS}
        row = {
            "median": median,
            "spread": {
                c: (max(rates[c, batch]) - min(rates[c, batch])) / median[c] for c in CONFIGS
            },
            "cpu_ms": {c: 1000 * statistics.median(cpu[c, batch]) for c in CONFIGS},
            "limit": 2 * median["one core"],
        }
        for name, (top, bottom, factor) in RATIOS.items():
            pairs = zip(rates[top, batch], rates[bottom, batch], strict=True)
            per_repeat = [a / (factor * b) for a, b in pairs]
            q1, q2, q3 = quartiles(per_repeat)
            row[name], row[f"{name}_iqr"] = q2, (q1, q3)
        out[batch] = row
    return out


def main(argv=None) -> int:
    if CHILD:
        return child_main()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 repeats, batch 16")
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.batches = 2, [16]
    if any(b % 2 or b > EPOCH for b in args.batches):
        parser.error(f"--batches: even global batches up to {EPOCH}, got {args.batches}")

    load_before = os.getloadavg()
    wall = time.perf_counter()
    result = benchmark(args.repeats, args.batches)
    wall = time.perf_counter() - wall
    table = summary(result, args.batches)

    print(
        f"flavour={FLAVOUR} tensorflow={tf.__version__} keras={keras.__version__} "
        f"cores={os.cpu_count()} oneDNN off, intra-op 1, inter-op 2 (child: inter-op 1), "
        f"2 logical CPU devices; {args.repeats} repeats of one {EPOCH}-clip epoch each"
    )
    print()
    print(
        "| config | devices | global batch | median samples/s | spread | CPU ms/sample "
        "| all repeats |"
    )
    print("|---|---|---|---|---|---|---|")
    devices = {
        "one core": 1,
        "two apart": 2,
        "DataParallel 2": 2,
        CONFIGS[3]: 2,
        "Mirrored 2": 2,
        "DataParallel 1": 1,
        "bare": 1,
    }
    for batch in args.batches:
        row = table[batch]
        for config in CONFIGS:
            shown = {
                "one core": f"{batch} ({batch // 2} in the child)",
                "two apart": f"{batch} ({batch // 2} in each child)",
            }.get(config, batch)
            runs = " ".join(f"{r:.0f}" for r in result["rates"][config, batch])
            print(
                f"| {config} | {devices[config]} | {shown} | {row['median'][config]:.1f} "
                f"| {100 * row['spread'][config]:.0f}% | {row['cpu_ms'][config]:.2f} | {runs} |"
            )
    print()
    print(
        "| global batch | physical limit (2 x one core) | DataParallel 2 / limit (goal >= 0.95) "
        "| Mirrored 2 / limit | DataParallel 2 / Mirrored 2 (goal >= 1.25) "
        "| DataParallel 1 / bare (goal >= 0.97) | two apart / limit | DataParallel 2 / two apart "
        f"| DataParallel 2, {STEPS_PER_CALL} steps a call / limit | ... / two apart |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        row = table[batch]
        cells = " | ".join(
            f"{row[name]:.3f} ({row[name + '_iqr'][0]:.2f}-{row[name + '_iqr'][1]:.2f})"
            for name in RATIOS
        )
        print(f"| {batch} | {row['limit']:.1f} | {cells} |")
    print()
    print(
        "Ratios: the median of the per-repeat ratios (both figures from the same repeat), "
        "in brackets their interquartile range; the limit column: 2 x the median of one core."
    )
    print()
    print(
        f"run time {wall:.0f} s; load average before {load_before[0]:.2f}, after "
        f"{os.getloadavg()[0]:.2f} (1 min; other processes on these cores bias every figure)"
    )
    if args.json:
        with open(args.json, "w") as f:
            raw = {f"{c} @ {b}": v for (c, b), v in result["rates"].items()}
            json.dump({"rates": raw, "summary": {str(b): v for b, v in table.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
