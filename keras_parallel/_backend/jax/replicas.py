"""DataParallel's replicas on JAX: one call of the template, sharded over a device mesh.

Inside a jitted step JAX ignores device scopes, so the slices cannot be placed
one by one. Instead each device's slice is laid out in a block of its own, all
blocks padded to the largest slice's rows (with copies of the batch's first
row), the blocks are sharded over a one-axis mesh of the devices
(`jax.lax.with_sharding_constraint`), and the template is called once: XLA's
SPMD partitioner runs each block on its device. The padding rows are dropped
from the outputs, so they get no gradient, and the outputs come back in the
batch's order: loss and gradient are the single-device ones.

What differs from the TensorFlow backend: every device computes as many rows
as the largest slice (an unequal split saves the smaller device nothing); layers
that look across rows (BatchNormalization in training, activity regularizers)
see the whole padded batch; the devices must be of one platform (a mesh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["jax_device", "sharded_call"]

_AXIS = "replicas"


def jax_device(canonical: str):
    """The JAX device for a canonical name ("/device:GPU:1" -> jax.devices("gpu")[1])."""
    _, kind, index = canonical.split(":")
    platform = {"GPU": "gpu", "CPU": "cpu", "TPU": "tpu"}.get(kind, kind.lower())
    # This process's devices: with several JAX processes, jax.devices() lists them all.
    return jax.local_devices(backend=platform)[int(index)]


def _mesh(devices):
    return Mesh(np.array([jax_device(d) for d in devices]), (_AXIS,))


def sharded_call(call, inputs, sizes, devices, map_structure):
    """`call(blocks)` on the slices laid out one block per device; outputs in batch order.

    Args:
        call: the template's call on a batch (a function of one structure).
        inputs: the batch (a structure of arrays with the same rows).
        sizes: list of int. The rows of each device's slice (they sum to the batch).
        devices: list of canonical device names, one per slice.
        map_structure: `keras.tree.map_structure`.
    """
    rows = max(sizes)
    sharding = NamedSharding(_mesh(devices), PartitionSpec(_AXIS))

    def arrange(x):
        blocks = []
        start = 0
        for size in sizes:
            block = x[start : start + size]
            if size < rows:
                filler = jnp.broadcast_to(x[:1], (rows - size, *x.shape[1:]))
                block = jnp.concatenate([block, filler.astype(x.dtype)], axis=0)
            blocks.append(block)
            start += size
        return jax.lax.with_sharding_constraint(jnp.concatenate(blocks, axis=0), sharding)

    outputs = call(map_structure(arrange, inputs))

    def gather(y):
        y = jax.lax.with_sharding_constraint(y, sharding)
        parts = [y[k * rows : k * rows + size] for k, size in enumerate(sizes)]
        return jnp.concatenate(parts, axis=0)

    return map_structure(gather, outputs)
