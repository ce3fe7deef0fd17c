"""DataParallel's replicas on JAX: programs per device, or one call sharded over a mesh.

Outside a jitted step (an unequal split: `DataParallel` compiles it with
`jit_compile=False`), each slice runs as programs of its own on its device:
`SliceCalls`, at the end of this module. Inside a jitted step (an even split,
or `jit_compile=True`), the following.

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

Under a `keras.distribution.DataParallel` (one process, or several after
`keras.distribution.initialize`), the step is one program over the
distribution's mesh and the batch it gets is the global one, each mesh device
holding an equal share of it. DataParallel's devices must then be all of this
process's devices of that mesh, and every process must cut its rows alike
(same program on every process). An equal split is the distribution's own
layout: the template is called on the batch as it is. An unequal split is laid
out over the distribution's mesh instead of a mesh of its own: each process's
rows are gathered into its devices' blocks (the rows it moves stay within the
process's devices, but XLA decides how it moves them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from keras_parallel._backend.jax.devices import device_scope, jax_device, move_to
from keras_parallel._compat import keras

__all__ = [
    "MASKS_READABLE",
    "SUPPORTS_JIT",
    "SliceCalls",
    "batch_layout",
    "call",
    "check_distributed_replicas",
    "check_fit_supported",
    "compile_jit",
    "is_traced",
    "jax_device",
    "move_to",
    "needs_per_device",
    "platforms_differ",
    "sharded_call",
]

_AXIS = "replicas"

#: JAX arrays carry no Keras mask where keras_parallel could read it.
MASKS_READABLE = False

#: An even split keeps one jitted (SPMD) program over a mesh of the devices.
SUPPORTS_JIT = True


def _mesh(devices):
    return Mesh(np.array([jax_device(d) for d in devices]), (_AXIS,))


def batch_layout():
    """``(mesh, axis, shards)`` of the active `keras.distribution`'s batch, or None.

    `shards` is the number of devices the batch's rows are split over (the mesh's
    batch axis). Raises for a distribution that is not `keras.distribution.DataParallel`.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    if not isinstance(distribution, keras.distribution.DataParallel):
        raise ValueError(
            "keras_parallel on JAX supports no keras.distribution but "
            "keras.distribution.DataParallel (it lays out the batch, not the "
            "weights). Expected keras.distribution.DataParallel or None. "
            f"Received: {type(distribution).__name__}"
        )
    mesh = distribution.device_mesh.backend_mesh
    axis = distribution.batch_dim_name
    return mesh, axis, int(mesh.shape[axis])


def _process_devices(devices):
    """For each process, its devices among `devices`, in local order (by id, as JAX lists them)."""
    by_process: dict[int, list] = {}
    for device in sorted(devices, key=lambda d: d.id):
        by_process.setdefault(device.process_index, []).append(device)
    return by_process


def check_distributed_replicas(devices) -> None:
    """DataParallel's `devices` under a distribution: all of this process's mesh devices.

    Raises:
        ValueError: naming the devices expected and received.
    """
    layout = batch_layout()
    if layout is None or len(devices) <= 1:
        return
    mesh, _, _ = layout
    mine = {d for d in mesh.devices.flat if d.process_index == jax.process_index()}
    wanted = {jax_device(d) for d in devices}
    if wanted != mine:
        raise ValueError(
            "Under a keras.distribution, a DataParallel model over several devices "
            "must use every device this process has in the distribution's mesh (the "
            "step is one program over that mesh). Expected devices for "
            f"{sorted(str(d) for d in mine)}. Received: devices={list(devices)}"
        )


def _distributed_arrangement(mesh, sizes, devices, rows_global: int):
    """Static row indices: the arranged blocks from the global batch, and back.

    The global batch holds each mesh device's equal share in mesh order; a
    process's rows are its devices' shares in that order. Every process cuts its
    rows by `sizes` over its devices `devices` (local names), one block of
    ``max(sizes)`` rows per device, in mesh order, padded with the process's first row.
    """
    positions = list(mesh.devices.flat)
    share = rows_global // len(positions)
    block = max(sizes)
    process_devices = _process_devices(positions)
    local_index = [int(d.split(":")[-1]) for d in devices]
    take = np.zeros(len(positions) * block, dtype=np.int32)
    back = np.zeros(rows_global, dtype=np.int32)
    for process, own in process_devices.items():
        # This process's rows, in the order the distribution put them.
        rows = [
            i * share + r
            for i, device in enumerate(positions)
            if device.process_index == process
            for r in range(share)
        ]
        start = 0
        for k, size in enumerate(sizes):
            target = positions.index(own[local_index[k]])
            chunk = rows[start : start + size]
            filler = [rows[0]] * (block - size)
            take[target * block : (target + 1) * block] = chunk + filler
            back[chunk] = np.arange(target * block, target * block + size)
            start += size
    return take, back


def sharded_call(call, inputs, sizes_for, devices, map_structure):
    """`call(blocks)` on the slices laid out one block per device; outputs in batch order.

    Args:
        call: the template's call on a batch (a function of one structure).
        inputs: the batch (a structure of arrays with the same rows).
        sizes_for: a function of the process's rows: the rows of each device's
            slice (they sum to the rows).
        devices: list of canonical device names, one per slice.
        map_structure: `keras.tree.map_structure`.
    """
    rows_global = int(jax.tree_util.tree_leaves(inputs)[0].shape[0])
    layout = batch_layout()
    if layout is not None:
        return _distributed_call(
            call, inputs, sizes_for, devices, map_structure, layout, rows_global
        )
    sizes = sizes_for(rows_global)
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


def _distributed_call(call, inputs, sizes_for, devices, map_structure, layout, rows_global):
    """`sharded_call` under a `keras.distribution.DataParallel` (module docstring)."""
    mesh, axis, shards = layout
    processes = len({d.process_index for d in mesh.devices.flat})
    sizes = sizes_for(rows_global // processes)
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    if len(set(sizes)) == 1 and len(sizes) * processes == shards:
        return call(inputs)  # the distribution's own layout
    take, back = _distributed_arrangement(mesh, sizes, devices, rows_global)

    def arrange(x):
        return jax.lax.with_sharding_constraint(jnp.take(x, take, axis=0), sharding)

    outputs = call(map_structure(arrange, inputs))

    def gather(y):
        return jnp.take(jax.lax.with_sharding_constraint(y, sharding), back, axis=0)

    return map_structure(gather, outputs)


# --------------------------------------------------------------------------------------
# Per-device programs: each device computes and holds only its own rows.
#
# Outside a jitted step (DataParallel compiles an unequal split with
# `jit_compile=False` on JAX), a call of a layer on one slice runs as a jitted
# program of its own on that slice's device: the layer's variable values and the
# slice are put on the device (`jax.device_put`, which carries the gradient back to
# where the values came from), and the program runs there, dispatched
# asynchronously, so the devices work at the same time. `jax.value_and_grad` of
# the step differentiates through the programs: each device's backward pass is a
# program on that device too.


def is_traced(structure) -> bool:
    """True when `structure` holds values traced by `jax.jit` (or another JAX transform)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(structure))


def platforms_differ(devices) -> bool:
    """True when `devices` (canonical names) are not all of one kind (no mesh holds them)."""
    return len({d.split(":")[1] for d in devices}) > 1


def needs_per_device(devices, ratios) -> bool:
    """True when the padded SPMD path would make a device compute rows it does not own
    (unequal ratios), or cannot run at all (devices of different kinds)."""
    return len(devices) > 1 and (len(set(ratios)) > 1 or platforms_differ(devices))


def is_seed_state(variable) -> bool:
    """A `keras.random.SeedGenerator`'s state (Keras names it "seed_generator_state")."""
    return (
        getattr(variable, "name", "") == "seed_generator_state"
        and tuple(variable.shape) == (2,)
        and "int" in str(variable.dtype)
    )


class _Program:
    """One layer's call with fixed non-array arguments, jitted: runs where its inputs are."""

    def __init__(self, layer, statics):
        self.variables = list(layer.variables)
        self.assigned: list[int] = []

        def run(values, args, array_kwargs):
            kwargs = {**dict(statics), **array_kwargs}
            mapping = list(zip(self.variables, values, strict=True))
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
                given = [scope.get_current_value(v) for v in self.variables]
                outputs = layer(*args, **kwargs)
                losses = list(scope.losses)
            assigned, new = [], []
            for i, variable in enumerate(self.variables):
                value = scope.get_current_value(variable)
                if value is not given[i]:
                    assigned.append(i)
                    new.append(value)
            self.assigned = assigned
            loss = sum((jnp.asarray(x, jnp.float32) for x in losses), jnp.zeros((), jnp.float32))
            return outputs, new, loss

        self.run = run
        self.jitted = jax.jit(run)


def _split_kwargs(kwargs):
    """(hashable non-array kwargs, array kwargs), or None when one is neither."""
    statics, arrays = [], {}
    for key, value in sorted(kwargs.items()):
        leaves = jax.tree_util.tree_leaves(value)
        if leaves and all(isinstance(x, jax.Array | np.ndarray | jax.core.Tracer) for x in leaves):
            arrays[key] = value
            continue
        try:
            hash(value)
        except TypeError:
            return None
        statics.append((key, value))
    return tuple(statics), arrays


class SliceCalls:
    """The calls of one DataParallel step's layers on each device's slice.

    `call(layer, args, kwargs, device, index)` runs ``layer(*args, **kwargs)`` on
    slice `index` as a program on `device`. What the calls assign (see `finish`):

    - a random seed's state: slice `index` draws from its own stream (its seed's
      first word moved by `index`), so slices never share dropout masks, and the
      state then moves as one call of the whole batch moves it (slice 0's);
    - any other variable a call assigns (a layer's own running statistic) is
      chained: each slice's call starts from the value the previous slice's call
      left, as calling the layer on the slices in turn would (those devices then
      wait for each other).
    """

    def __init__(self, cache):
        self._cache = cache
        self._chained: dict[int, object] = {}
        self._final: dict[int, tuple] = {}

    def _program(self, layer, statics):
        programs = self._cache.setdefault(id(layer), {})
        if statics not in programs:
            programs[statics] = _Program(layer, statics)
        return programs[statics]

    def call(self, layer, args, kwargs, device, index):
        """``(outputs, summed losses)`` of `layer` on slice `index`, computed on `device`."""
        split = _split_kwargs(kwargs)
        statics, arrays = split if split is not None else ((), dict(kwargs))
        program = self._program(layer, statics)
        values = []
        for variable in program.variables:
            value = self._chained.get(id(variable))
            if value is None:
                value = variable.value
            if index and is_seed_state(variable):
                value = value + jnp.asarray([index, 0], dtype=value.dtype)
            values.append(value)
        values, args, arrays = move_to((values, args, arrays), device)
        if split is None:  # a non-array argument that cannot key a program: run op by op
            with device_scope(device):
                outputs, new, loss = program.run(values, args, arrays)
        else:
            outputs, new, loss = program.jitted(values, args, arrays)
        for i, value in zip(program.assigned, new, strict=True):
            variable = program.variables[i]
            if is_seed_state(variable):
                if index == 0:
                    self._final[id(variable)] = (variable, value)
            else:
                self._chained[id(variable)] = value
                self._final[id(variable)] = (variable, value)
        return outputs, loss

    def finish(self) -> None:
        """Assigns what the calls left (see the class doc)."""
        for variable, value in self._final.values():
            variable.assign(value)
        self._final.clear()
        self._chained.clear()


# -- the seam: what DataParallel asks of this backend ----------------------------


def call(core, inputs, training):
    """Runs the replicas of `core` (a `ParallelReplicas` layer) on JAX; (outputs, loss).

    Outside a jitted step, without a `keras.distribution`, on a batch of known
    rows: one program per device on its own rows (`core._per_device_call` with
    `SliceCalls`). Else one call sharded over a mesh (`core._sharded_call`).
    """
    if core.num_replicas <= 1:
        return None
    batch = keras.tree.flatten(inputs)[0].shape[0]
    if isinstance(batch, int) and not is_traced(inputs) and batch_layout() is None:
        return core._per_device_call(inputs, training, SliceCalls)
    return core._sharded_call(inputs, training, sharded_call, batch_layout), None


def compile_jit(core, jit):
    """No jitted step where slices differ (each device runs its own rows).

    Without a `keras.distribution`, an unequal split (or devices of different
    kinds) runs one program per device, dispatched from an unjitted step:
    `jit_compile="auto"` resolves to False. An explicit `jit_compile=True`
    keeps one SPMD program over a mesh, every slice padded to the largest
    (devices of different kinds cannot form one: turned off, why
    "platforms_differ").
    """
    if core is None or not needs_per_device(core.placement, core.ratios):
        return jit, None
    if batch_layout() is not None:
        return jit, None  # a keras.distribution's step is one program over its mesh
    if jit is True and platforms_differ(core.placement):
        return False, "platforms_differ"
    return (False if jit == "auto" else jit), None


def check_fit_supported(core) -> None:
    """Under a `keras.distribution`: DataParallel's devices and split fit the mesh.

    The step is one program over the distribution's mesh, so a DataParallel
    model over several devices must use all of this process's devices in it,
    and every process must cut its rows alike: checked before `fit` reads any
    data (with several processes, by comparing the processes' splits).
    """
    if batch_layout() is None or core is None or core.num_replicas <= 1:
        return
    check_distributed_replicas(core.placement)
    if jax.process_count() <= 1:
        return
    from jax.experimental import multihost_utils

    ratios = np.asarray(core.ratios, dtype=np.float64)
    every = np.asarray(multihost_utils.process_allgather(ratios))
    if every.shape[0] != jax.process_count() or not np.all(every == every[0]):
        raise ValueError(
            "On several JAX processes every process must split its rows alike (the "
            "step is one program over all of them). Expected the same `split` on "
            f"every process. Received: split ratios {every.tolist()} (one row per "
            f"process; this is process {jax.process_index()})"
        )
