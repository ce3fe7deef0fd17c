"""One worker of the 2-worker tests in test_multi_worker.py (not a test module).

Run as ``python multi_worker_worker.py OUT.json CASE [CASE ...]`` with `TF_CONFIG`
set (or without, for one process). Splits the CPU into 2 logical devices, builds
`keras_parallel.multi_worker.strategy()`, runs each case in turn (a fresh model
each, inside the strategy's scope, global batch 16) and writes, per case, the final
trainable weights, the History and what the case records, to OUT.json. A case that
raises has its error (type and message) written there instead; a failed collective
(the cluster cannot go on) ends the run.

`reference` runs the same cases without any strategy: one process, the whole
global batch, plain `fit`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

import keras_parallel
import keras_parallel.multi_worker

GLOBAL_BATCH = 16
N_SAMPLES = 64
EPOCHS = 2
RNG = np.random.default_rng(0)
X = RNG.normal(size=(N_SAMPLES, 5)).astype("float32")
Y = RNG.integers(0, 3, size=(N_SAMPLES,)).astype("int32")


def _recorder_class(keras, tf):
    class RowRecorder(keras.layers.Layer):
        """Identity; above `limit` rows it raises a real allocator ResourceExhaustedError."""

        def __init__(self, limit=None, **kwargs):
            super().__init__(**kwargs)
            self.limit = limit

        def build(self, input_shape):
            self.largest = self.add_weight(
                shape=(), initializer="zeros", trainable=False, name="largest"
            )

        def call(self, x):
            rows = tf.cast(tf.shape(x)[0], "float32")
            self.largest.assign(tf.maximum(self.largest, rows))
            if self.limit is None:
                return x

            def explode():
                # Rows known only at run time: TensorFlow 2.16 would fold a constant
                # shape into a 2 TiB constant and fail before allocating anything.
                huge = tf.fill(
                    [2**30 + tf.shape(x)[0] * 0, 512], tf.reduce_sum(x) * 0.0
                )  # the allocator fails
                return x + tf.reduce_sum(huge)

            return tf.cond(tf.shape(x)[0] > self.limit, explode, lambda: x)

        def compute_output_shape(self, input_shape):
            return input_shape

    return RowRecorder


def _model(keras, recorder=None, batch_norm=False):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((5,))]
    if recorder is not None:
        layers.append(recorder)
    layers.append(keras.layers.Dense(8, activation="tanh"))
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(momentum=0.5))
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def run_case(case, task_index, devices):
    """Trains one case; returns what the test compares."""
    import tensorflow as tf

    from keras_parallel._compat import keras

    callbacks, recorder, parallel = [], None, None
    if case in ("ga", "dp_ga"):
        callbacks.append(keras_parallel.callbacks.GradientAccumulation(2 if case == "dp_ga" else 4))
    if case == "memory_logger":
        callbacks.append(keras_parallel.callbacks.GPUMemoryLogger())
    if case == "auto_agree":
        # The workers' plans differ (8 and 2 rows): both must run 2.
        peak_per_row = 1000 if task_index == 0 else 4000
        callbacks.append(
            keras_parallel.callbacks.GradientAccumulation(
                "auto", memory_budget=10**4, memory_probe=lambda m: peak_per_row * m
            )
        )
    if case in ("oom", "oom_fixed"):
        # Worker 1 alone runs out of memory above 4 rows; "auto" plans 8 (the
        # whole per-worker batch) from the fixed probe, "oom_fixed" runs 8.
        limit = 4 if task_index == 1 else None
        recorder = _recorder_class(keras, tf)(limit)
        callbacks.append(
            keras_parallel.callbacks.GradientAccumulation(
                "auto", memory_budget=10**9, memory_probe=lambda m: 1000 * m
            )
            if case == "oom"
            else keras_parallel.callbacks.GradientAccumulation(8)
        )
    template = _model(keras, recorder, batch_norm=case.endswith("_bn"))
    model = template
    if case == "dp_bn":  # whole-batch statistics over both workers' slices
        parallel = keras_parallel.DataParallel(template, devices=devices, split=[2, 1])
    if case == "dp_equal":
        parallel = keras_parallel.DataParallel(template, devices=devices)
    elif case in ("dp_21", "dp_ga"):
        parallel = keras_parallel.DataParallel(template, devices=devices, split=[2, 1])
    model = parallel or template
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(
        X,
        Y,
        batch_size=GLOBAL_BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    result = {
        "weights": [w.numpy().tolist() for w in template.trainable_weights],
        "statistics": [np.asarray(w.numpy()).tolist() for w in template.non_trainable_weights],
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "iterations": int(model.optimizer.iterations.numpy()),
    }
    if recorder is not None:
        result["largest"] = float(recorder.largest.numpy())
    for callback in callbacks:
        if hasattr(callback, "micro_batch_size_"):
            result["micro_batch_size"] = callback.micro_batch_size_
    return result


def main(out, cases):
    devices = keras_parallel.split_cpu(2)  # before TensorFlow starts its devices
    reference = cases == ["reference"]
    if reference:
        cases, strategy, task_index = ["plain", "plain_bn"], None, 0
    else:
        strategy = keras_parallel.multi_worker.strategy(timeout=float(os.environ["MW_TIMEOUT"]))
        task_index = strategy.cluster_resolver.task_id or 0
    results = {"task": task_index, "cases": {}}
    for case in cases:
        began = time.monotonic()
        try:
            if strategy is None:
                results["cases"][case] = run_case(case, task_index, devices)
            else:
                with strategy.scope():
                    results["cases"][case] = run_case(case, task_index, devices)
        except Exception as error:
            results["cases"][case] = {
                "error": {"type": type(error).__name__, "message": str(error)[:2000]},
                "seconds": time.monotonic() - began,
                "traceback": traceback.format_exc()[-3000:],
            }
            if not isinstance(error, ValueError | TypeError | NotImplementedError):
                break  # a failed collective: the cluster cannot go on
    with open(out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
