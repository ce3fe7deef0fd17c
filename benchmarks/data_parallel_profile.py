"""Where a DataParallel training step's time goes (step-time accounting, CPU proxy).

The same harness as benchmarks/data_parallel.py (oneDNN off, intra-op 1,
inter-op 2, 2 logical CPU devices, the Conv3D clip classifier). Each piece of a
step is timed on its own as a `tf.function`, in increasing order of what it
does, so the differences name the serial parts:

    one replica      the template's forward and backward on half the batch, one device
    both replicas    the same on both devices in one function (no merge, no loss)
    + merge, loss    DataParallel's forward (slice, replicas, concatenate), the loss
                     on the merged outputs, the gradients (summed over replicas)
    + update         the above and the optimizer's update (what Keras's step does)
    fit step         one step of `fit` (Keras's train function, its loop, callbacks)

and the same for the template alone on the whole batch. Medians of interleaved
repeats; milliseconds per step.

    python benchmarks/data_parallel_profile.py [--batch 32] [--repeats 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_parallel as harness  # noqa: E402  (sets oneDNN off, threads, devices)

tf = harness.tf
keras = harness.keras
keras_parallel = harness.keras_parallel


def _pieces(batch: int) -> dict:
    keras.utils.set_random_seed(0)
    weights = harness.build_template().get_weights()
    data = harness.make_dataset(batch)
    x, y = next(iter(data))
    half = batch // 2
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    template = harness._compiled(harness._from(weights))
    parallel = harness._compiled(
        keras_parallel.DataParallel(harness._from(weights), devices=harness.DEVICES)
    )
    variables = template.trainable_variables

    def replica(inputs):
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(template(inputs, training=True))
        return tape.gradient(total, variables)

    @tf.function
    def one_replica():
        with tf.device(harness.DEVICES[0]):
            return replica(x[:half])

    @tf.function
    def both_replicas():
        out = []
        for i, device in enumerate(harness.DEVICES):
            with tf.device(device):
                out.append(replica(x[i * half : (i + 1) * half]))
        return out

    def gradients(model):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    @tf.function
    def parallel_gradients():
        return gradients(parallel)

    @tf.function
    def template_gradients():
        return gradients(template)

    def stepper(model):
        @tf.function
        def step():
            loss, grads = gradients(model)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        return step

    parallel_update, template_update = stepper(parallel), stepper(template)

    def fit_step(model):
        def run(steps):
            timer = harness.SpanTimer()
            model.fit(
                data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer], shuffle=False
            )
            return timer.wall / steps

        return run

    def loop(function):
        def run(steps):
            start = time.perf_counter()
            for _ in range(steps):
                result = function()
            tf.nest.map_structure(lambda t: t.numpy(), result)  # wait for the last step
            return (time.perf_counter() - start) / steps

        return run

    return {
        "one replica (half batch, 1 device)": loop(one_replica),
        "both replicas (2 devices, no merge)": loop(both_replicas),
        "DataParallel: + slice, merge, loss, gradient sum": loop(parallel_gradients),
        "DataParallel: + optimizer update": loop(parallel_update),
        "DataParallel: fit step": fit_step(parallel),
        "template: forward, loss, gradients (whole batch)": loop(template_gradients),
        "template: + optimizer update": loop(template_update),
        "template: fit step": fit_step(template),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    pieces = _pieces(args.batch)
    for run in pieces.values():
        run(3)  # trace, warm up
    times = {name: [] for name in pieces}
    for _ in range(args.repeats):
        for name, run in pieces.items():  # interleaved
            times[name].append(1000 * run(args.steps))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"global batch {args.batch}, {args.repeats} repeats of {args.steps} steps, "
        f"{harness.FLAVOUR}, oneDNN off, intra-op 1, inter-op 2, 2 logical CPU devices"
    )
    print()
    print("| piece | ms per step (median) | all repeats |")
    print("|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.2f} | {' '.join(f'{t:.1f}' for t in times[name])} |")
    names = list(median)
    one, both, grads, update, fit = (median[n] for n in names[:5])
    print()
    print(
        f"parallel compute: {both:.2f} ms for two replicas vs {one:.2f} for one "
        f"(ideal: equal); slice + merge + loss + gradient sum: {grads - both:.2f} ms; "
        f"optimizer update: {update - grads:.2f} ms; fit's loop and callbacks: "
        f"{fit - update:.2f} ms; serial share of the step: {(fit - one) / fit:.1%} "
        f"(the limit assumes 0)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
