"""Unequal splits on JAX: per-device programs against the padded SPMD program (CPU proxy).

    KERAS_BACKEND=jax python benchmarks/jax_unequal.py [--repeats 5] [--steps 6] [--json PATH]

Two host devices (`--xla_force_host_platform_device_count=2`, set here before JAX
starts) stand in for two GPUs; the model is a Conv3D clip classifier (clips of
8x32x32x3, 4 classes), batch 30, SGD.

**memory**: for splits [1, 1], [2, 1] and [5, 1], the rows each device computes
and XLA's memory analysis (arguments + outputs + temporaries, less aliases) of
what each device runs in one training step:

- padded: Keras's jitted training step of the DataParallel model compiled with
  `jit_compile=True` (one SPMD program over a mesh, every slice padded to the
  largest; the analysis is per device);
- per device: the default for an unequal split, each device's own program: the
  template's forward and backward on that device's rows, compiled for that device;
- alone: one device running the template's step on the small device's rows
  alone (the issue's reference). The per-device program IS that program, so the
  two agree by construction; the column shows it is what runs.

**speed**: samples/s of `fit` (after a warm-up epoch), for [2, 1] and [1, 1]:
per device (`jit_compile="auto"`, or False for [1, 1]) against padded SPMD
(`jit_compile=True`, or "auto" for [1, 1]), timed in turn within each repeat
from the same weights; the per-repeat ratio's median and interquartile range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=2").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import keras_parallel  # noqa: E402
from keras_parallel._backend.jax.probes import compiled_bytes, compiled_peak_bytes  # noqa: E402
from keras_parallel._compat import keras  # noqa: E402

CLIP = (8, 32, 32, 3)
BATCH = 30
DEVICES = ["/device:CPU:0", "/device:CPU:1"]
MIB = 2**20


def clip_classifier(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(CLIP)
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling3D((1, 2, 2))(x)
    x = keras.layers.Conv3D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x), name="clips")


def _compile(model, jit_compile="auto"):
    model.compile(
        keras.optimizers.SGD(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def _data(n):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, *CLIP)).astype("float32"), rng.integers(0, 4, n)


def _padded_step_bytes(parallel):
    """XLA's per-device figure for Keras's jitted (SPMD) training step of `parallel`."""
    x, y = _data(BATCH)
    parallel.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # builds the state
    state = (
        [v.value for v in parallel.trainable_variables],
        [v.value for v in parallel.non_trainable_variables],
        [v.value for v in parallel.optimizer.variables],
        [v.value for v in parallel.metrics_variables],
    )
    step = jax.jit(parallel.train_step)
    return compiled_bytes(step.lower(state, (x, y)).compile())


def memory() -> list[dict]:
    rows = []
    for split in ([1, 1], [2, 1], [5, 1]):
        template = clip_classifier()
        parallel = keras_parallel.DataParallel(template, devices=DEVICES, split=split)
        sizes = keras_parallel.replicas(parallel).slice_sizes(BATCH)
        plan = keras_parallel.plan(parallel, BATCH)
        padded = _padded_step_bytes(_compile(parallel, jit_compile=True))
        own = [compiled_peak_bytes(template, d, r) for d, r in zip(DEVICES, sizes, strict=True)]
        alone = compiled_peak_bytes(template, DEVICES[0], sizes[-1])
        row = {
            "split": split,
            "rows": sizes,
            "plan_rows_computed": plan.rows_computed,
            "padded_mib": round(padded / MIB, 1),
            "per_device_mib": [round(b / MIB, 1) for b in own],
            "small_alone_mib": round(alone / MIB, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _rate(model, x, y, steps):
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    return steps * BATCH / (time.perf_counter() - start)


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [round(v, 3) for v in q]


def speed(repeats: int, steps: int) -> dict:
    x, y = _data(BATCH * steps)
    weights = clip_classifier().get_weights()
    result = {}
    cases = {
        "[2, 1]": ([2, 1], "auto", True),  # per device (default) vs padded (asked)
        "[1, 1]": ([1, 1], False, "auto"),  # per device (asked) vs SPMD (default)
    }
    for name, (split, per_device_jit, padded_jit) in cases.items():
        models = {}
        for kind, jit in (("per_device", per_device_jit), ("padded", padded_jit)):
            template = clip_classifier()
            template.set_weights(weights)
            parallel = keras_parallel.DataParallel(template, devices=DEVICES, split=split)
            models[kind] = _compile(parallel, jit)
            _rate(models[kind], x[:BATCH], y[:BATCH], 1)  # warm-up: compiles
        rates = {kind: [] for kind in models}
        for r in range(repeats):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for kind in order:
                rates[kind].append(_rate(models[kind], x, y, steps))
        ratios = [a / b for a, b in zip(rates["per_device"], rates["padded"], strict=True)]
        result[name] = {
            "samples_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_quartiles": quartiles(ratios),
        }
        print(name, json.dumps(result[name]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", choices=["memory", "speed"], default=None)
    args = parser.parse_args()
    out = {"jax": jax.__version__, "keras": keras.__version__}
    if args.only in (None, "memory"):
        out["memory"] = memory()
    if args.only in (None, "speed"):
        out["speed"] = speed(args.repeats, args.steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
