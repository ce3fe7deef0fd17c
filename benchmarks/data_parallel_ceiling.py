"""What any data-parallel method in one TensorFlow process can reach (CPU proxy).

benchmarks/data_parallel.py measures DataParallel against two one-core
processes side by side ("two apart"). This script asks what part of the gap
belongs to DataParallel and what part to running both devices in one process,
by timing hand-written training loops that strip one thing at a time, each
against "two apart" measured in the same repeat (paired ratios, so the slow
drift of a shared machine cancels):

    two apart            two one-core children at once, rates summed (1.0 by definition)
    one process, two threads
                         two copies of the template, one per device, each training on its
                         own half of the batch in its own Python thread, every step of the
                         epoch in one call: two devices in one process, nothing shared, no
                         step waits for the other device
    one process, no sync the same two copies in one function, every step of the epoch in
                         one call (`tf.while_loop`): each loop iteration ends when both
                         copies' steps have: one barrier a step, nothing else shared
    sync, one call       one set of weights: each device computes the loss of its own
                         slice and its gradients, the gradients are summed, SGD updates
                         the weights; every step of the epoch in one call. The leanest
                         synchronous data-parallel step (one barrier a step)
    sync, a call a step  the same step, one `tf.function` call per step from Python
    sync, merged loss    the same, but the loss is computed once on the concatenated
                         outputs on the first device (two barriers a step: what
                         DataParallel does, by design, to keep the single-device loss)
    DataParallel 2       keras_parallel.DataParallel in Keras `fit`, 1 step a call
    DataParallel 2, 5 steps a call
                         the same with `compile(steps_per_execution=5)`

Every loop trains the same Conv3D clip classifier from the same weights on the
same data as benchmarks/data_parallel.py (same harness: oneDNN off, intra-op 1,
inter-op 2, 2 logical CPU devices), one 480-clip epoch per timed run. The
script prints, per global batch, the median of the per-repeat ratios to "two
apart" and their interquartile range, and the CPU ms per sample.

It also predicts what one barrier a step costs from "two apart" alone: in a few
extra runs the two children record every step's wall time; had the two devices
waited for each other at every step, step k would have taken
max(a_k, b_k) instead of (a_k + b_k) / 2, so sum((a_k + b_k) / 2) / sum(max(a_k,
b_k)) is the share of "two apart" a synchronous method keeps at best on these
cores. It depends only on how much one core's step times vary.

    python benchmarks/data_parallel_ceiling.py [--repeats 12] [--batches 16 32 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_parallel as harness  # noqa: E402  (sets oneDNN off, threads, devices)

tf = harness.tf
keras = harness.keras
keras_parallel = harness.keras_parallel
DEVICES = harness.DEVICES
LEARNING_RATE = 0.01
SPC = harness.STEPS_PER_CALL

CONFIGS = (
    "two apart",
    "one process, two threads",
    "one process, no sync",
    "sync, one call",
    "sync, a call a step",
    "sync, merged loss",
    "DataParallel 2",
    f"DataParallel 2, {SPC} steps a call",
)


def _loss_sum(model, x, y):
    logits = model(x, training=True)
    return tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


def _sgd(variables, grads):
    for variable, grad in zip(variables, grads, strict=True):
        variable.assign_sub(LEARNING_RATE * grad)


def hand_loops(weights, batch: int, steps: int) -> dict:
    """The hand-written loops: name -> function(iterator) that trains `steps` steps."""
    half = batch // 2
    shared = harness._from(weights)
    copies = [harness._from(weights), harness._from(weights)]
    variables = shared.trainable_variables

    def rows(tensor, i):  # device i's half of the batch
        return tensor[i * half : (i + 1) * half]

    def sync_step(iterator):
        x, y = next(iterator)
        grads = []
        for i, device in enumerate(DEVICES):
            with tf.device(device), tf.GradientTape() as tape:
                loss = _loss_sum(shared, rows(x, i), rows(y, i))
                loss = loss / batch  # this slice's share of the batch mean
            grads.append(tape.gradient(loss, variables))
        with tf.device(DEVICES[0]):
            _sgd(variables, [tf.add_n(list(g)) for g in zip(*grads, strict=True)])
        return loss

    def merged_step(iterator):
        x, y = next(iterator)
        with tf.GradientTape() as tape:
            outputs = []
            for i, device in enumerate(DEVICES):
                with tf.device(device):
                    outputs.append(shared(rows(x, i), training=True))
            with tf.device(DEVICES[0]):
                logits = tf.concat(outputs, 0)
                loss = tf.reduce_mean(
                    keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
                )
        grads = tape.gradient(loss, variables)
        with tf.device(DEVICES[0]):
            _sgd(variables, grads)
        return loss

    def copy_step(i, x, y):
        model = copies[i]
        with tf.device(DEVICES[i]):
            with tf.GradientTape() as tape:
                loss = _loss_sum(model, rows(x, i), rows(y, i))
                loss = loss / half
            _sgd(model.trainable_variables, tape.gradient(loss, model.trainable_variables))
        return loss

    def apart_step(iterator):
        x, y = next(iterator)
        return [copy_step(i, x, y) for i in range(len(DEVICES))][0]

    def one_copy_step(i):
        def step(iterator):
            x, y = next(iterator)
            return copy_step(i, x, y)

        return step

    def all_in_one_call(step):
        @tf.function
        def run(iterator):
            loss = tf.constant(0.0)
            for _ in tf.range(steps):
                loss = step(iterator)
            return loss

        return lambda iterator: run(iterator).numpy()

    def a_call_a_step(step):
        function = tf.function(step)

        def run(iterator):
            for _ in range(steps):
                loss = function(iterator)
            return loss.numpy()

        return run

    per_copy = [all_in_one_call(one_copy_step(i)) for i in range(len(DEVICES))]
    extra_iterator = iter(harness.make_dataset(batch))

    def two_threads(iterator):
        threads = [
            threading.Thread(target=run, args=(it,))
            for run, it in zip(per_copy, (iterator, extra_iterator), strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return {
        "one process, two threads": two_threads,
        "one process, no sync": all_in_one_call(apart_step),
        "sync, one call": all_in_one_call(sync_step),
        "sync, a call a step": a_call_a_step(sync_step),
        "sync, merged loss": a_call_a_step(merged_step),
    }


def barrier_share(a, b) -> float:
    """The share of two devices' rate kept when every step waits for the slower one."""
    pairs = list(zip(a, b, strict=False))  # a child may run a step more when the epoch is cut
    return sum((x + y) / 2 for x, y in pairs) / sum(max(x, y) for x, y in pairs)


def variation(times) -> float:
    """Standard deviation over mean of a list of step times."""
    return statistics.pstdev(times) / statistics.fmean(times)


def benchmark(repeats: int, batches, step_repeats: int) -> dict:
    keras.utils.set_random_seed(0)
    weights = harness.build_template().get_weights()
    dp = keras_parallel.DataParallel
    fits = {
        "DataParallel 2": harness._compiled(dp(harness._from(weights), devices=DEVICES)),
        CONFIGS[-1]: harness._compiled(dp(harness._from(weights), devices=DEVICES), SPC),
    }
    rates = {(c, b): [] for b in batches for c in CONFIGS}
    cpu = {(c, b): [] for b in batches for c in CONFIGS}
    barrier = {b: [] for b in batches}
    spread = {b: [] for b in batches}
    one_core, other_core = harness.Child(), harness.Child()
    try:
        for batch in batches:
            data = harness.make_dataset(batch)
            steps = harness.EPOCH // batch // SPC * SPC  # the same steps for every loop
            loops = hand_loops(weights, batch, steps)
            iterator = iter(data)

            def timed(config, batch=batch, data=data, steps=steps, loops=loops, it=iterator):
                if config == "two apart":
                    one_core.start(batch // 2)
                    other_core.start(batch // 2)
                    (rate_a, cpu_a), (rate_b, cpu_b) = one_core.result(), other_core.result()
                    return rate_a + rate_b, (cpu_a + cpu_b) / 2
                if config in fits:
                    return harness.timed_fit(fits[config], data, batch)
                wall, process = time.perf_counter(), time.process_time()
                loops[config](it)
                wall, process = time.perf_counter() - wall, time.process_time() - process
                return steps * batch / wall, process / (steps * batch)

            for config in CONFIGS:  # trace, warm up
                timed(config)
            for _ in range(repeats):
                for config in CONFIGS:  # interleaved
                    rate, seconds = timed(config)
                    rates[config, batch].append(rate)
                    cpu[config, batch].append(seconds)
            for _ in range(step_repeats):
                one_core.start(batch // 2, step_times=True)
                other_core.start(batch // 2, step_times=True)
                a, b = one_core.answer()["steps"], other_core.answer()["steps"]
                barrier[batch].append(barrier_share(a, b))
                spread[batch].append(variation(a + b))
    finally:
        one_core.close()
        other_core.close()
    return {"rates": rates, "cpu": cpu, "barrier": barrier, "spread": spread}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument(
        "--step-repeats", type=int, default=3, help="runs of two apart with step times"
    )
    args = parser.parse_args(argv)
    if any(b % 2 or b * SPC > harness.EPOCH for b in args.batches):
        parser.error(f"--batches: even, up to {harness.EPOCH // SPC}; got {args.batches}")
    load_before = os.getloadavg()
    wall = time.perf_counter()
    result = benchmark(args.repeats, args.batches, args.step_repeats)
    wall = time.perf_counter() - wall
    rates, cpu = result["rates"], result["cpu"]
    print(
        f"flavour={harness.FLAVOUR} tensorflow={tf.__version__} keras={keras.__version__} "
        f"cores={os.cpu_count()}; oneDNN off, intra-op 1, inter-op 2 (children: inter-op 1), "
        f"2 logical CPU devices; {args.repeats} repeats, configurations interleaved"
    )
    print()
    print(
        "| global batch | config | median samples/s | / two apart, same repeat: median "
        "| interquartile range | CPU ms/sample |"
    )
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        apart = rates["two apart", batch]
        for config in CONFIGS:
            ratios = [r / a for r, a in zip(rates[config, batch], apart, strict=True)]
            q1, q2, q3 = harness.quartiles(ratios)
            print(
                f"| {batch} | {config} | {statistics.median(rates[config, batch]):.1f} "
                f"| {q2:.3f} | {q1:.3f}-{q3:.3f} "
                f"| {1000 * statistics.median(cpu[config, batch]):.2f} |"
            )
    print()
    print(
        "| global batch | one core's step times: std / mean | one barrier a step keeps "
        "(predicted from two apart's step times) | runs |"
    )
    print("|---|---|---|---|")
    for batch in args.batches:
        shares = result["barrier"][batch]
        print(
            f"| {batch} | {statistics.median(result['spread'][batch]):.3f} "
            f"| {statistics.median(shares):.3f} | {' '.join(f'{v:.3f}' for v in shares)} |"
        )
    print()
    print(
        f"run time {wall:.0f} s; load average before {load_before[0]:.2f}, after "
        f"{os.getloadavg()[0]:.2f} (1 min)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
