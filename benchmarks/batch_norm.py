"""BatchNormalization through DataParallel: what whole-batch statistics cost and buy.

Two measurements, each in its own run:

    python benchmarks/batch_norm.py cost [--repeats 7] [--batches 16 32]
    python benchmarks/batch_norm.py effect [--seeds 3] [--epochs 12] [--learning-rate 0.003]
    python benchmarks/batch_norm.py rounding

**cost**: samples/s of `DataParallel(batch_norm="global")` against
`batch_norm="per_slice"` on the CPU proxy of two independent devices (the
harness of benchmarks/data_parallel.py: oneDNN off, one thread per op, two
logical CPUs), with a BatchNormalization-heavy 3D CNN (three Conv3D +
BatchNormalization + ReLU blocks). The two are timed in turn within each
repeat, from the same weights; the ratio global / per_slice is taken per repeat
and summarized by its median and interquartile range.

**effect**: the seed user's situation on a small synthetic video task where the
statistics matter (each clip has its own brightness and contrast; the class is
the direction a bright bar moves). Two devices (a CPU split in two), 2 clips per
device, accumulation to a batch of 16, against one device with the whole batch
of 16: held-out accuracy and loss per epoch over several seeds, for

    one device, batch 16          the reference
    DataParallel global, 16       2 devices, the batch of 16 in one step
    DataParallel global + GA 2    2 clips per device, 4 micro steps a batch
    DataParallel per_slice + GA 2 the same with per-slice statistics (2 clips)

It prints a table per configuration (median over the seeds of the last epoch's
held-out accuracy and loss) and, with `--json PATH`, every curve.

**rounding**: how far one training step's gradients are from the same step in
float64, for the template on one device and for DataParallel (global), both in
float32 (the effect task's model without its max pooling, which TensorFlow has
no float64 kernel for; its first batch of 16). Many steps of
training amplify float32 rounding (the gradient through BatchNormalization
cancels large terms), so two runs that are equal to the last digit in exact
arithmetic drift apart; this shows DataParallel's rounding is of the same size
as one device's own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODE = sys.argv[1] if len(sys.argv) > 1 else ""
if MODE == "cost":
    sys.path.insert(0, HERE)
    import data_parallel as harness  # noqa: E402  (sets up the two-device CPU proxy)
else:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import keras_parallel  # noqa: E402
from keras_parallel._compat import FLAVOUR, keras  # noqa: E402
from keras_parallel.callbacks import GradientAccumulation  # noqa: E402


def bn_cnn(clip, classes, widths=(8, 16, 16), pool=True):
    """Conv3D + BatchNormalization + ReLU blocks, pooled, a Dense head."""
    inputs = keras.Input(clip, name="clips")
    x = inputs
    for i, width in enumerate(widths):
        x = keras.layers.Conv3D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
        if i == 0 and pool:
            x = keras.layers.MaxPooling3D((1, 2, 2))(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="label")(x), name="bn_cnn")


def _compile(model, learning_rate=0.01):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


# -- cost ----------------------------------------------------------------------


def cost(repeats: int, batches) -> dict:
    keras.utils.set_random_seed(0)
    weights = bn_cnn(harness.CLIP, harness.CLASSES).get_weights()
    models = {}
    for mode in ("global", "per_slice"):
        template = bn_cnn(harness.CLIP, harness.CLASSES)
        template.set_weights(weights)
        parallel = keras_parallel.DataParallel(template, devices=harness.DEVICES, batch_norm=mode)
        models[mode] = _compile(parallel)
    result = {}
    for batch in batches:
        data = harness.make_dataset(batch)
        for model in models.values():  # warm-up: the first fit traces
            harness.timed_fit(model, data, batch)
        rates = {mode: [] for mode in models}
        for r in range(repeats):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for mode in order:
                rates[mode].append(harness.timed_fit(models[mode], data, batch)[0])
        ratios = [g / p for g, p in zip(rates["global"], rates["per_slice"], strict=True)]
        result[batch] = {
            "samples_per_s": {m: statistics.median(v) for m, v in rates.items()},
            "ratio_quartiles": harness.quartiles(ratios),
        }
        q1, q2, q3 = result[batch]["ratio_quartiles"]
        print(
            f"batch {batch}: global {result[batch]['samples_per_s']['global']:.1f}, "
            f"per_slice {result[batch]['samples_per_s']['per_slice']:.1f} samples/s; "
            f"global / per_slice {q2:.3f} (IQR {q1:.3f}-{q3:.3f}, {repeats} repeats)",
            flush=True,
        )
    return result


# -- effect --------------------------------------------------------------------

CLIP = (4, 12, 12, 1)


def video_task(n, seed):
    """Clips of a bright bar moving left (class 0) or right (class 1).

    Each clip has its own brightness offset and contrast (as lighting differs
    between videos), so per-clip statistics vary widely: a BatchNormalization
    layer that sees 2 clips normalises very differently from one that sees 16.
    """
    rng = np.random.default_rng(seed)
    frames, height, width, _ = CLIP
    x = rng.normal(0.0, 0.3, size=(n, *CLIP)).astype("float32")
    y = rng.integers(0, 2, size=n).astype("int32")
    for i in range(n):
        start = rng.integers(2, width - 2 - frames)
        row = rng.integers(0, height - 3)
        for t in range(frames):
            col = start + t if y[i] == 1 else start + frames - 1 - t
            x[i, t, row : row + 3, col, 0] += 1.5
    contrast = rng.uniform(0.3, 3.0, size=(n, 1, 1, 1, 1)).astype("float32")
    offset = rng.normal(0.0, 2.0, size=(n, 1, 1, 1, 1)).astype("float32")
    return x * contrast + offset, y


def effect(
    seeds: int, epochs: int, learning_rate: float = 0.003, train_n: int = 512, test_n: int = 512
) -> dict:
    keras_parallel.split_cpu(2)
    devices = ["/cpu:0", "/cpu:1"]
    x_test, y_test = video_task(test_n, seed=10_000)
    configs = {
        "one device, batch 16": dict(devices=None, micro=None),
        "DataParallel global, 16": dict(devices=devices, mode="global", micro=None),
        "DataParallel global + GA 2": dict(devices=devices, mode="global", micro=2),
        "DataParallel per_slice + GA 2": dict(devices=devices, mode="per_slice", micro=2),
    }
    curves = {name: [] for name in configs}
    for seed in range(seeds):
        x, y = video_task(train_n, seed=seed)
        keras.utils.set_random_seed(seed)
        weights = bn_cnn(CLIP, 2, widths=(8, 8)).get_weights()
        for name, config in configs.items():
            template = bn_cnn(CLIP, 2, widths=(8, 8))
            template.set_weights(weights)
            model = template
            if config["devices"] is not None:
                model = keras_parallel.DataParallel(
                    template, devices=config["devices"], batch_norm=config["mode"]
                )
            _compile(model, learning_rate)
            callbacks = [] if config["micro"] is None else [GradientAccumulation(config["micro"])]
            keras.utils.set_random_seed(seed)  # the same shuffles in every configuration
            started = time.perf_counter()
            history = model.fit(
                x,
                y,
                batch_size=16,
                epochs=epochs,
                validation_data=(x_test, y_test),
                callbacks=callbacks,
                shuffle=True,
                verbose=0,
            ).history
            curves[name].append(
                {
                    "val_accuracy": [float(v) for v in history["val_accuracy"]],
                    "val_loss": [float(v) for v in history["val_loss"]],
                    "loss": [float(v) for v in history["loss"]],
                }
            )
            print(
                f"seed {seed} {name}: held-out accuracy {history['val_accuracy'][-1]:.3f}, "
                f"loss {history['val_loss'][-1]:.3f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    print(
        f"\n{FLAVOUR}, {seeds} seeds, {epochs} epochs, SGD {learning_rate} (momentum 0.9): "
        "the last 3 epochs' mean, median over the seeds (min-max):"
    )
    print(f"{'configuration':32s}{'held-out accuracy':>26s}{'held-out loss':>26s}")
    for name, runs in curves.items():
        cells = []
        for key in ("val_accuracy", "val_loss"):
            values = [statistics.fmean(r[key][-3:]) for r in runs]
            cells.append(f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        print(f"{name:32s}{cells[0]:>26s}{cells[1]:>26s}")
    names = list(curves)
    for key, title in (("val_accuracy", "held-out accuracy"), ("val_loss", "held-out loss")):
        print(f"\nper epoch, {title}, median over the seeds (Markdown):")
        print("| epoch | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for epoch in range(epochs):
            cells = [statistics.median(r[key][epoch] for r in curves[n]) for n in names]
            print(f"| {epoch + 1} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return curves


def rounding() -> dict:
    """Relative error of one step's gradients against float64, per variable."""
    import tensorflow as tf

    keras_parallel.split_cpu(2)
    x, y = video_task(16, seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def gradients(model, template, inputs):
        with tf.GradientTape() as tape:
            value = loss(y, model(inputs, training=True))
        found = tape.gradient(value, template.trainable_variables)
        return [np.asarray(g, dtype="float64") for g in found]

    keras.utils.set_random_seed(0)
    template = bn_cnn(CLIP, 2, widths=(8, 8), pool=False)
    weights = template.get_weights()
    one = gradients(template, template, x)
    parallel = keras_parallel.DataParallel(template, devices=["/cpu:0", "/cpu:1"])
    spread = gradients(parallel, template, x)
    keras.config.set_dtype_policy("float64")
    exact_model = bn_cnn(CLIP, 2, widths=(8, 8), pool=False)
    exact_model.set_weights([w.astype("float64") for w in weights])
    exact = gradients(exact_model, exact_model, x.astype("float64"))
    keras.config.set_dtype_policy("float32")
    result = {}
    print(f"{'variable':40s}{'one device':>12s}{'DataParallel':>14s}  (relative to float64)")
    for variable, e, a, b in zip(template.trainable_variables, exact, one, spread, strict=True):
        scale = np.abs(e).max() or 1.0
        errors = (float(np.abs(a - e).max() / scale), float(np.abs(b - e).max() / scale))
        result[variable.path] = errors
        print(f"{variable.path:40s}{errors[0]:>12.1e}{errors[1]:>14.1e}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["cost", "effect", "rounding"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=0.003)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.mode == "cost":
        result = cost(args.repeats, args.batches)
    elif args.mode == "rounding":
        result = rounding()
    else:
        result = effect(args.seeds, args.epochs, args.learning_rate)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
