"""Timing a model's forward/backward pass on one device (TensorFlow)."""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf


def _example_batch(model, batch_size: int, unknown_dim: int):
    def make(tensor):
        shape = [batch_size] + [d if d is not None else unknown_dim for d in tensor.shape[1:]]
        dtype = tf.as_dtype(tensor.dtype)
        if dtype.is_floating:
            return tf.random.stateless_uniform(shape, seed=[1, 2], dtype=dtype)
        if dtype.is_integer:
            return tf.zeros(shape, dtype=dtype)
        return tf.zeros(shape, dtype=dtype)

    from keras_parallel.parallel import input_structure

    return tf.nest.map_structure(make, input_structure(model))


def measure_throughput(
    model, device: str, batch_size: int, repeats: int = 3, unknown_dim: int = 8
) -> float:
    """Samples per second of one forward and backward pass of `model` on `device`.

    A generated batch of the model's input shapes is used; gradients are
    computed and dropped, so the model's weights and state are unchanged
    (its non-trainable state is restored after the passes).
    """
    variables = model.trainable_variables
    state = [tf.identity(v) for v in model.non_trainable_variables]

    with tf.device(device):
        batch = _example_batch(model, batch_size, unknown_dim)

        @tf.function
        def step(inputs):
            with tf.GradientTape() as tape:
                outputs = model(inputs, training=True)
                total = tf.add_n(
                    [tf.reduce_sum(tf.cast(o, tf.float32)) for o in tf.nest.flatten(outputs)]
                )
            grads = tape.gradient(total, variables)
            return [g for g in grads if g is not None]

        def run():
            result = step(batch)
            # Make sure the work is finished before the clock stops.
            np.asarray(result[0]) if result else None

        run()  # trace and warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    for variable, value in zip(model.non_trainable_variables, state, strict=True):
        variable.assign(value)
    return batch_size / float(np.median(times))


def measure_peak_bytes(model, device: str, rows: int, unknown_dim: int = 8) -> int | None:
    """Allocator peak, in bytes, of one forward/backward pass of `rows` rows on `device`.

    None where the allocator keeps no statistics (a CPU without
    ``TF_CPU_ALLOCATOR_USE_BFC=true``). Weights and state are left unchanged.
    """
    spec = tf.DeviceSpec.from_string(device)
    name = f"{spec.device_type}:{spec.device_index or 0}"
    try:
        tf.config.experimental.reset_memory_stats(name)
    except (ValueError, RuntimeError):
        return None
    variables = model.trainable_variables
    state = [tf.identity(v) for v in model.non_trainable_variables]
    with tf.device(device):
        batch = _example_batch(model, rows, unknown_dim)
        with tf.GradientTape() as tape:
            outputs = model(batch, training=True)
            total = tf.add_n(
                [tf.reduce_sum(tf.cast(o, tf.float32)) for o in tf.nest.flatten(outputs)]
            )
        grads = tape.gradient(total, variables)
        del grads, outputs, total, tape
    peak = tf.config.experimental.get_memory_info(name)["peak"]
    for variable, value in zip(model.non_trainable_variables, state, strict=True):
        variable.assign(value)
    return int(peak)
