"""Two workers against one: samples/s and bytes exchanged per step (loopback, CPU).

Each worker process trains the same per-worker work: an MLP on `--per-worker`
rows per step, built inside `keras_parallel.multi_worker.strategy()`. One worker
alone trains batches of `per_worker` rows; two workers (two processes on
127.0.0.1, TF_CONFIG) train global batches of ``2 * per_worker`` rows, half each,
and all-reduce the gradients once per step. Optionally with
GradientAccumulation (`--micro`): the gradients are still exchanged once per
batch, not per micro-batch.

Reported: samples/s (global rows per second over the timed steps, median of the
workers' timings), and the bytes each step exchanges: the gradients' size (the
trainable variables, float32), and what a ring all-reduce sends per worker,
``2 (n - 1) / n`` times that. On one machine the two workers share its cores,
so the figure shows the cost of the exchange and of sharing, not a speed-up.

Usage: python benchmarks/multi_worker.py [--per-worker 256] [--steps 60] [--micro 0]
(run it with TF_USE_LEGACY_KERAS=1: Keras 3 cannot fit on several workers).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

WIDTH = 512
FEATURES = 128
CLASSES = 10


def _worker(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    import keras_parallel.multi_worker
    from keras_parallel._compat import keras
    from keras_parallel.callbacks import GradientAccumulation

    strategy = keras_parallel.multi_worker.strategy(timeout=120)
    workers = strategy.num_replicas_in_sync
    global_batch = args.per_worker * workers
    rng = np.random.default_rng(0)
    n = global_batch * (args.steps + args.warmup)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=(n,)).astype("int32")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(WIDTH, activation="relu"),
                keras.layers.Dense(WIDTH, activation="relu"),
                keras.layers.Dense(CLASSES),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    callbacks = [GradientAccumulation(args.micro)] if args.micro else []
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == args.warmup:
                times.append(time.perf_counter())

        def on_train_end(self, logs=None):
            times.append(time.perf_counter())

    model.fit(
        x,
        y,
        batch_size=global_batch,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[*callbacks, Timer()],
    )
    gradient_bytes = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
    result = {
        "workers": workers,
        "samples_per_s": args.steps * global_batch / (times[1] - times[0]),
        "gradient_bytes": gradient_bytes,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _launch(workers, args, out_dir):
    ports = _free_ports(workers)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes, outs = [], []
    try:
        for index in range(workers):
            env = dict(os.environ)
            if workers > 1:
                task = {"type": "worker", "index": index}
                env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": task})
            else:
                env.pop("TF_CONFIG", None)
            out = os.path.join(out_dir, f"w{workers}_{index}.json")
            outs.append(out)
            command = [sys.executable, __file__, "--worker", "--out", out]
            command += ["--per-worker", str(args.per_worker), "--steps", str(args.steps)]
            command += ["--warmup", str(args.warmup), "--micro", str(args.micro)]
            processes.append(subprocess.Popen(command, env=env))
        for process in processes:
            process.wait(timeout=600)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for out in outs:
        with open(out) as f:
            results.append(json.load(f))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-worker", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro", type=int, default=0, help="GradientAccumulation size")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    import statistics
    import tempfile

    from keras_parallel._compat import FLAVOUR

    with tempfile.TemporaryDirectory() as out_dir:
        one = _launch(1, args, out_dir)[0]
        two = _launch(2, args, out_dir)
    speed_two = statistics.median(r["samples_per_s"] for r in two)
    grad = one["gradient_bytes"]
    ring = 2 * (2 - 1) / 2 * grad
    micro = f", GradientAccumulation({args.micro})" if args.micro else ""
    print(f"flavour {FLAVOUR}, {args.per_worker} rows per worker per step{micro}")
    print(f"1 worker : {one['samples_per_s']:9.0f} samples/s")
    print(f"2 workers: {speed_two:9.0f} samples/s ({speed_two / one['samples_per_s']:.2f}x)")
    print(
        f"per step: gradients {grad / 2**20:.2f} MiB, ring all-reduce sends "
        f"{ring / 2**20:.2f} MiB per worker (once per batch)"
    )


if __name__ == "__main__":
    main()
