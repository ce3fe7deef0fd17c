"""One JAX process of the 2-process tests in test_multi_worker_jax.py (not a test module).

Run as ``python multi_worker_jax_worker.py OUT.json PROCESS_ID NUM_PROCESSES PORT``
with ``KERAS_BACKEND=jax``. Makes JAX's CPU 2 devices and, with several processes,
joins them over 127.0.0.1:PORT (`keras.distribution.initialize`, Gloo collectives
on CPU), sets `keras.distribution.DataParallel()` over every process's devices,
and runs each case in turn (a fresh model each, global batch 16: each process
feeds its 8 rows of every batch). Writes, per case, the final weights and the
History, or the error (type and message), to OUT.json.

With one process it trains plain `fit` on the whole global batch, without any
distribution: the reference.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

OUT, PROCESS_ID, NUM_PROCESSES, PORT = sys.argv[1], *map(int, sys.argv[2:5])
if NUM_PROCESSES > 1:
    # CPU collectives across processes: JAX has none without it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_parallel  # noqa: E402

GLOBAL_BATCH = 16
RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 5)).astype("float32")
Y = RNG.integers(0, 3, size=(64,)).astype("int32")
CASES = (
    "plain",
    "data_parallel_one_device",
    "data_parallel",
    "data_parallel_2_1",
    "accumulation",
    "accumulation_ragged",
    "data_parallel_accumulation",
    "data_parallel_2_1_accumulation",
    "accumulation_auto",
    "memory_logger",
    "split_differs",
)
DEVICES = ["/device:CPU:0", "/device:CPU:1"]


def _bytes_per_row_probe(size):
    """A stand-in memory probe: 1000 bytes a row (this process plans from its budget)."""
    return 1000 * size


def _local_rows():
    """This process's share of every global batch: rows [8 * id, 8 * id + 8) of each."""
    if NUM_PROCESSES == 1:
        return X, Y
    share = GLOBAL_BATCH // NUM_PROCESSES
    starts = range(0, len(X), GLOBAL_BATCH)
    index = np.concatenate(
        [np.arange(s + PROCESS_ID * share, s + (PROCESS_ID + 1) * share) for s in starts]
    )
    return X[index], Y[index]


def _run(case):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )
    callbacks = []
    if case == "data_parallel_one_device":
        model = keras_parallel.DataParallel(model, devices=DEVICES[:1])
    elif case.startswith("data_parallel_2_1"):
        model = keras_parallel.DataParallel(model, devices=DEVICES, split=[2, 1])
    elif case.startswith("data_parallel"):
        model = keras_parallel.DataParallel(model, devices=DEVICES)
    elif case == "split_differs":  # process 0 cuts 2:1, process 1 1:1
        split = [2, 1] if PROCESS_ID == 0 else [1, 1]
        model = keras_parallel.DataParallel(model, devices=DEVICES, split=split)
    if case == "memory_logger":
        callbacks = [keras_parallel.callbacks.GPUMemoryLogger()]
    if case.endswith("accumulation"):  # 4 rows a device: 2 micro steps of 2
        callbacks = [keras_parallel.callbacks.GradientAccumulation(2)]
    elif case == "accumulation_ragged":  # 4 rows a device: a micro step of 3, then of 1
        callbacks = [keras_parallel.callbacks.GradientAccumulation(3)]
    elif case == "accumulation_auto":  # process 0 plans 2 rows, process 1 all 4
        budget = 2500 if PROCESS_ID == 0 else 100_000
        callbacks = [
            keras_parallel.callbacks.GradientAccumulation(
                "auto", memory_budget=budget, memory_probe=_bytes_per_row_probe
            )
        ]
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _local_rows()
    history = model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH // NUM_PROCESSES,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    return {
        "loss": history.history["loss"],
        "micro_batch_size": history.history.get("micro_batch_size"),
        "logged": sorted(history.history),
        "weights": [np.asarray(w).tolist() for w in model.get_weights()],
    }


def main():
    results = {}
    if NUM_PROCESSES > 1:
        keras.distribution.initialize(
            job_addresses=f"127.0.0.1:{PORT}", num_processes=NUM_PROCESSES, process_id=PROCESS_ID
        )
        distribution = keras.distribution.DataParallel()  # every process's devices
        # Each process feeds its own rows (numpy arrays are not sharded by Keras).
        distribution.auto_shard_dataset = False
        keras.distribution.set_distribution(distribution)
        results["devices"] = len(jax.devices())
    cases = CASES if NUM_PROCESSES > 1 else ("plain",)
    for case in cases:
        try:
            results[case] = _run(case)
        except Exception as error:  # noqa: BLE001 - the test reads the error
            results[case] = {"error": type(error).__name__, "message": str(error)}
    with open(OUT, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main()
