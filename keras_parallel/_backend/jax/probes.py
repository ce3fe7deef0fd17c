"""Timing and memory of a model's forward/backward pass on one device (JAX).

Both probes build the same step: a jitted `jax.value_and_grad` of the summed
outputs of `model.stateless_call`, with the variables' values and a generated
batch on the device. The model's variables are read, never assigned: the model
is unchanged.

`peak_probe` does not run the step: it compiles it and reads XLA's memory
analysis (arguments + outputs + temporaries, less what is aliased). That is
XLA's estimate of the step's buffers, not an allocator's high-water mark (JAX
cannot reset its peak), and it is known on every device, the CPU included.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from keras_parallel._backend.common.probes import (
    example_batch,
    host_array,
    samples_per_second,
    variable_bytes,
)
from keras_parallel._backend.jax.replicas import jax_device
from keras_parallel._compat import keras

__all__ = ["PEAK_NOTE", "compiled_bytes", "compiled_peak_bytes", "measure_throughput", "peak_probe"]

PEAK_NOTE = (
    "the peaks are XLA's compiled estimate of one forward/backward step "
    "(memory_analysis: arguments + outputs + temporaries), not an allocator peak"
)


def _step(model):
    """``step(trainable, non_trainable, inputs) -> (summed outputs, gradients)``, jitted."""

    def total(trainable, non_trainable, inputs):
        outputs, _ = model.stateless_call(trainable, non_trainable, inputs, training=True)
        leaves = jax.tree_util.tree_leaves(outputs)
        return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in leaves)

    return jax.jit(jax.value_and_grad(total))


def _arguments(model, rows: int, unknown_dim: int, place, make):
    """The step's arguments: ``place(variable)`` per variable, ``make(shape, dtype)`` per input."""
    trainable = [place(v) for v in model.trainable_variables]
    non_trainable = [place(v) for v in model.non_trainable_variables]
    inputs = example_batch(model, rows, unknown_dim, make, keras.tree.map_structure)
    return trainable, non_trainable, inputs


def measure_throughput(
    model, device: str, batch_size: int, repeats: int = 3, unknown_dim: int = 8
) -> float:
    """Samples per second of one forward and backward pass of `model` on `device`.

    A generated batch of the model's input shapes is used; the gradients are
    computed and dropped, and the model is unchanged.
    """
    target = jax_device(device)

    def make(shape, dtype):
        dtype = keras.backend.standardize_dtype(dtype)
        return jax.device_put(jnp.asarray(host_array(shape, dtype), dtype=dtype), target)

    def place(variable):
        return jax.device_put(variable.value, target)

    arguments = _arguments(model, batch_size, unknown_dim, place, make)
    step = _step(model)
    return samples_per_second(lambda: jax.block_until_ready(step(*arguments)), batch_size, repeats)


def compiled_peak_bytes(model, device: str, rows: int, unknown_dim: int = 8) -> int | None:
    """XLA's estimate, in bytes, of one forward/backward pass of `rows` rows on `device`,
    less the model's variables (the step's own memory: batch, activations,
    gradients, temporaries).

    The step is compiled for the device, not run (nothing is allocated for the
    batch). None where the compiler gives no memory analysis.
    """
    sharding = jax.sharding.SingleDeviceSharding(jax_device(device))

    def place(variable):
        # Shapes only: during Keras's `fit` on JAX the variables hold no values (the
        # training state does).
        dtype = keras.backend.standardize_dtype(variable.dtype)
        return jax.ShapeDtypeStruct(tuple(variable.shape), dtype, sharding=sharding)

    def make(shape, dtype):
        dtype = keras.backend.standardize_dtype(dtype)
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

    arguments = _arguments(model, rows, unknown_dim, place, make)
    total = compiled_bytes(_step(model).lower(*arguments).compile())
    if total is None:
        return None
    # The step's own memory: the variables' values are there before it (the
    # planner adds the model's state once, `state_bytes`).
    return total - variable_bytes(arguments[0] + arguments[1])


def compiled_bytes(compiled) -> int | None:
    """The bytes a compiled step's buffers take: arguments + outputs + temporaries,
    less what aliases (`memory_analysis()`); None where the compiler gives no analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def peak_probe(model, device: str) -> Callable[[int], int | None]:
    """``rows -> compiled_peak_bytes(model, device, rows)``: the memory probe of `plan`."""
    return lambda rows: compiled_peak_bytes(model, device, rows)
