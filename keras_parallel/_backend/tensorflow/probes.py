"""Timing and memory of a model's forward/backward pass on one device (TensorFlow)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from keras_parallel._backend.common.probes import (
    PEAK_NOTE,
    example_batch,
    samples_per_second,
    steadied,
)
from keras_parallel._backend.tensorflow.memory import _short

__all__ = ["PEAK_NOTE", "measure_peak_bytes", "measure_throughput", "peak_probe"]


def _example_batch(model, batch_size: int, unknown_dim: int):
    """A generated batch of the model's input shapes (unknown dims: `unknown_dim`)."""

    def make(shape, dtype):
        dtype = tf.as_dtype(dtype)
        if dtype.is_floating:
            return tf.random.stateless_uniform(shape, seed=[1, 2], dtype=dtype)
        return tf.zeros(shape, dtype=dtype)

    return example_batch(model, batch_size, unknown_dim, make, tf.nest.map_structure)


def _forward_backward(model, inputs):
    """Gradients of the summed outputs: a training pass that applies nothing."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        outputs = model(inputs, training=True)
        total = tf.add_n([tf.reduce_sum(tf.cast(o, tf.float32)) for o in tf.nest.flatten(outputs)])
    return [g for g in tape.gradient(total, variables) if g is not None]


@contextlib.contextmanager
def _model_state_kept(model):
    """Restores the model's non-trainable state (BN statistics, seeds) on exit."""
    state = [tf.identity(v) for v in model.non_trainable_variables]
    try:
        yield
    finally:
        for variable, value in zip(model.non_trainable_variables, state, strict=True):
            variable.assign(value)


def measure_throughput(
    model, device: str, batch_size: int, repeats: int = 3, unknown_dim: int = 8
) -> float:
    """Samples per second of one forward and backward pass of `model` on `device`.

    A generated batch of the model's input shapes is used; gradients are
    computed and dropped, and the non-trainable state is restored, so the model
    is unchanged.
    """
    with _model_state_kept(model), tf.device(device):
        batch = _example_batch(model, batch_size, unknown_dim)
        step = tf.function(lambda inputs: _forward_backward(model, inputs))

        def run():
            result = step(batch)
            if result:  # make sure the work is finished before the clock stops
                np.asarray(result[0])

        return samples_per_second(run, batch_size, repeats)


def measure_peak_bytes(model, device: str, rows: int, unknown_dim: int = 8) -> int | None:
    """Bytes one forward/backward pass of `rows` rows allocates on `device` at its peak.

    The allocator's peak during the pass less what it held just before (the
    step's own memory: the batch, activations, gradients, temporaries; not the
    weights or data already there). None where the allocator keeps no statistics
    (a CPU without ``TF_CPU_ALLOCATOR_USE_BFC=true``). Weights and state are left
    unchanged.
    """
    name = _short(device)
    try:
        tf.config.experimental.reset_memory_stats(name)
        before = int(tf.config.experimental.get_memory_info(name)["current"])
    except (ValueError, RuntimeError):
        return None
    with _model_state_kept(model), tf.device(device):
        _forward_backward(model, _example_batch(model, rows, unknown_dim))
    return int(tf.config.experimental.get_memory_info(name)["peak"]) - before


def peak_probe(model, device: str) -> Callable[[int], int | None]:
    """``rows -> measure_peak_bytes(model, device, rows)``: the step's memory above rest,
    the default memory probe of `plan` (which adds the model's state, `state_bytes`)."""
    return steadied(lambda rows: measure_peak_bytes(model, device, rows))
