"""The accumulating train function on JAX (Keras 3).

Keras's JAX `fit` calls ``model.train_function(state, iterator)`` with the whole
training state (trainable, non-trainable, optimizer and metric variables) and takes
the new state back. `AccumulatingTrainFunction` stands in for it for one `fit`.
Each batch runs ONE jitted program (`_batch_step`, compiled once per batch shape
and micro-batch size, the state's buffers donated as in Keras's own step):

1. a `jax.lax.scan` over the batch's equal micro-batches of ``rows_per_step``
   rows, each sliced in the program (`jax.lax.dynamic_slice_in_dim`): the *micro
   step* (`model.compute_loss_and_updates` under `jax.value_and_grad`: forward,
   compiled loss, backward) adds its gradients, weighted by the micro-batch's
   share of the batch (``rows / batch``), to the gradients in the loop's carry,
   with the non-trainable state (BatchNormalization's moving statistics, seeds)
   and the metric variables passed on from one micro-batch to the next; the
   losses and predictions come out stacked. Then the last, shorter micro-batch,
   if the batch does not divide (its rows are known when tracing);
2. the update: `optimizer.stateless_apply` of the summed gradients (one update:
   `iterations`, schedules, clipping, weight decay and loss-scale checks happen
   once), and the loss tracker and the metrics updated once, on the whole
   batch's concatenated predictions.

A loop and not a Python `for` over the micro-batches: unrolled, the trace would
hold every micro-batch's forward and backward, and XLA, free to schedule them
together, could keep several micro-batches' activations alive at once (and
compile for as long as there are micro-batches). The body of a loop is one
micro-batch, run one after another: only one micro-batch's activations are
alive, which is the point of accumulating. One program per batch also keeps the
per-batch cost to one dispatch (the micro steps, the slicing and the update were
each a dispatch of their own, with every variable an argument, which made
accumulation slower than Keras's own on a GPU). On XLA's CPU backend a loop's
body runs its elementwise work on one thread (only the program's top level is
split over the cores), so there the loop costs some speed (about a fifth on the
Conv3D check of benchmarks/gpu_check_backends.py --small).

With `run_eagerly=True` (or `jit_compile=False`) the same functions run
unjitted, the loop in Python.

Running out of memory cannot be undone in-process on JAX (the device may be left
unusable, and the state handed in is donated), so there is no retry:
`OUT_OF_MEMORY_ERRORS` is empty and `"auto"` plans from XLA's memory analysis of
the micro step compiled on its own (`make_probe`), which runs nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from keras_parallel._backend.common import accumulation as _common
from keras_parallel._backend.common.accumulation import TrainFunctionSwitch, loss_tracker
from keras_parallel._backend.common.probes import variable_bytes
from keras_parallel._backend.jax.probes import compiled_bytes
from keras_parallel._backend.jax.replicas import batch_layout
from keras_parallel._compat import keras

__all__ = [
    "AccumulatingTrainFunction",
    "OUT_OF_MEMORY_ERRORS",
    "check_supported",
    "own_train_function",
]

#: No out-of-memory error is retried on JAX (see the module's docstring).
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = ()

#: Whether Keras must call the batch-end callbacks in the training thread. On
#: JAX, Keras converts each batch's logs in a thread pool while the training
#: thread dispatches the next step; with the accumulating step over several
#: host (CPU) devices (then several programs a batch), that race hung XLA's CPU
#: runtime (devices waiting in a rendezvous) at an epoch's end. Synchronous
#: callbacks cost little: the logs of one batch, not of each micro-batch.
SYNCHRONOUS_BATCH_END = True

#: Whether asking the probe costs no device memory (the probe compiles the step and runs nothing).
PROBE_RUNS_NOTHING = True

#: Why `make_probe` may give no figure (it always gives one on JAX).
NO_PROBE_REASON = "XLA gives no memory analysis for this step"


def check_supported() -> None:
    """Works on JAX without a distribution or under `keras.distribution.DataParallel`."""
    batch_layout()  # raises for another distribution


def _rows(structure) -> int:
    leaves = [t for t in jax.tree_util.tree_leaves(structure) if t is not None]
    return int(leaves[0].shape[0])


def _slice_rows(structure, start, rows: int):
    """`rows` rows of `structure` from `start` (an int, or a traced index in a loop)."""
    return jax.tree_util.tree_map(
        lambda t: jax.lax.dynamic_slice_in_dim(t, start, rows, axis=0), structure
    )


def _python_scan(body, carry, xs):
    """`jax.lax.scan` as a Python loop (a step that runs eagerly compiles nothing)."""
    outputs = []
    for x in xs:
        carry, y = body(carry, x)
        outputs.append(y)
    return carry, jax.tree_util.tree_map(lambda *ys: jnp.stack(ys), *outputs)


def _like(new, old):
    """`new` in `old`'s dtypes: a loop's carry keeps its types from one micro-batch to the next."""
    return jax.tree_util.tree_map(lambda n, o: jnp.asarray(n, o.dtype), new, old)


def _spec(structure, rows: int, sharding=None):
    """Shape-and-dtype stand-ins of `structure` with `rows` rows (for compiling only)."""
    return jax.tree_util.tree_map(
        lambda t: jax.ShapeDtypeStruct((rows, *t.shape[1:]), t.dtype, sharding=sharding),
        structure,
    )


class AccumulatingTrainFunction(TrainFunctionSwitch):
    """A JAX `model.train_function` that accumulates micro-batch gradients within each batch.

    Arguments as `TrainFunctionSwitch`'s.
    """

    def __init__(self, model, run_batch, num_replicas=1, batch_norm_pool=None):
        check_supported()
        super().__init__(model, run_batch, num_replicas, batch_norm_pool)
        # Where the pool's variables sit in the model's non-trainable state.
        places = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        pooled = self.batch_norm_pool.variables if self.batch_norm_pool else ()
        self._pooled = [places[id(v)] for v in pooled]
        self._tracker = loss_tracker(model)
        self._state = None
        self._jit = not model.run_eagerly and model.jit_compile
        # One program per batch: compiled once per batch shape and micro-batch size
        # (static), the state's buffers donated (the new state takes their place).
        self._batch = (
            jax.jit(self._batch_step, static_argnums=2, donate_argnums=0)
            if self._jit
            else self._batch_step
        )
        self._distributed_batch = None  # `_batch_program`, built at the first step
        # The micro step alone, compiled only for the "auto" probe's memory analysis.
        self._probe_micro = jax.jit(self._micro_step)

    # ---------------------------------------------------------------- the steps
    def _micro_step(self, trainable, non_trainable, metrics, optimizer, data, share):
        """Forward and backward on one micro-batch: ``share * (gradients, loss)`` and the state."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        grad_fn = jax.value_and_grad(self.model.compute_loss_and_updates, has_aux=True)
        (_, aux), grads = grad_fn(
            trainable,
            non_trainable,
            metrics,
            x,
            y,
            sample_weight,
            training=True,
            optimizer_variables=optimizer,
        )
        unscaled_loss, y_pred, non_trainable, metrics = aux
        grads = [g * share.astype(g.dtype) for g in grads]
        loss = unscaled_loss * share.astype(unscaled_loss.dtype)
        return (grads, loss), y_pred, non_trainable, metrics

    def _update_step(self, trainable, optimizer, metrics, accumulated, data, y_pred):
        """The one update of the batch, then the loss tracker and metrics on the whole batch."""
        model = self.model
        grads, loss = accumulated
        trainable, optimizer = model.optimizer.stateless_apply(optimizer, grads, trainable)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        mapping = list(zip(model.metrics_variables, metrics, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            if self._tracker is not None:
                self._tracker.update_state(loss, sample_weight=_rows(x))
            logs = model.compute_metrics(x, y, y_pred, sample_weight)
        metrics = []
        for variable, value in mapping:
            new = scope.get_current_value(variable)
            metrics.append(value if new is None else new)
        return logs, trainable, optimizer, metrics

    def _batch_step(self, state, data, rows_per_step: int):
        """One batch: the micro steps in a loop, the last shorter one, then the update.

        Returns ``(logs, new state)``. `rows_per_step` (static) is the rows each
        shard of the batch gives each micro step: the batch's rows are viewed as
        ``shards`` equal blocks (one per device of a `keras.distribution`'s mesh,
        else one), and every micro-batch takes its rows from every block, so it
        stays laid out as the distribution laid out the batch. The loop's length
        and the last micro-batch's rows follow from it and the batch's rows.
        """
        trainable, non_trainable, optimizer, metrics = state
        shards, constrain = self._shards()
        rows = _rows(data)
        shard_rows = rows // shards
        loops, rest = divmod(shard_rows, rows_per_step)
        view = jax.tree_util.tree_map(lambda t: t.reshape((shards, shard_rows, *t.shape[1:])), data)

        def take(start, size):
            """`size` rows of every shard from `start`, as one micro-batch."""
            return jax.tree_util.tree_map(
                lambda t: constrain(
                    jax.lax.dynamic_slice_in_dim(t, start, size, axis=1).reshape(
                        (shards * size, *t.shape[2:])
                    )
                ),
                view,
            )

        pool, pooled = (self.batch_norm_pool, self._pooled) if rows else (None, [])

        def micro(carry, start, size, share):
            grads, non_trainable, metrics, statistics = carry
            if pool:  # the pooled statistics start the micro step at 0
                non_trainable = list(non_trainable)
                zeros = pool.zeros([non_trainable[i] for i in pooled])
                for i, zero in zip(pooled, zeros, strict=True):
                    non_trainable[i] = zero
            (new_grads, loss), y_pred, new_non_trainable, new_metrics = self._micro_step(
                trainable,
                non_trainable,
                metrics,
                optimizer,
                take(start, size),
                np.float32(share),
            )
            grads = [a + g for a, g in zip(grads, new_grads, strict=True)]
            new_non_trainable = _like(new_non_trainable, non_trainable)
            if pool:
                values = [new_non_trainable[i] for i in pooled]
                statistics = pool.merge(statistics, values, np.float32(size * shards))
            carry = (grads, new_non_trainable, _like(new_metrics, metrics), statistics)
            return carry, (loss, y_pred)

        def body(carry, index):
            start = index * rows_per_step
            return micro(carry, start, rows_per_step, rows_per_step / shard_rows)

        statistics = ()
        if pool:
            # Its structure (the saved values, zero moments) stays fixed through the loop.
            statistics = pool.start([non_trainable[i] for i in pooled], jnp.float32(0.0))
        carry = ([jnp.zeros_like(v) for v in trainable], non_trainable, metrics, statistics)
        losses, predictions = [], []
        if loops:
            scan = jax.lax.scan if self._jit else _python_scan
            carry, (stacked_loss, stacked_pred) = scan(body, carry, jnp.arange(loops))
            losses.append(jnp.sum(stacked_loss))
            # (loops, shards * step, ...) -> (shards, loops * step, ...): shards' rows in order.
            predictions.append(
                jax.tree_util.tree_map(
                    lambda p: jnp.swapaxes(
                        p.reshape((loops, shards, rows_per_step, *p.shape[2:])), 0, 1
                    ).reshape((shards, loops * rows_per_step, *p.shape[2:])),
                    stacked_pred,
                )
            )
        if rest or not rows:  # the last, shorter micro-batch (an empty batch: itself)
            carry, (loss, y_pred) = micro(
                carry, loops * rows_per_step, rest, rest / shard_rows if rows else 1.0
            )
            losses.append(loss)
            predictions.append(
                jax.tree_util.tree_map(lambda p: p.reshape((shards, rest, *p.shape[1:])), y_pred)
            )
        grads, non_trainable, metrics, statistics = carry
        if pool:
            non_trainable = list(non_trainable)
            for i, value in zip(pooled, pool.finish(statistics), strict=True):
                non_trainable[i] = value
        loss = losses[0] if len(losses) == 1 else losses[0] + losses[1]
        if len(predictions) == 1:
            y_pred = predictions[0]
        else:
            y_pred = jax.tree_util.tree_map(lambda *p: jnp.concatenate(p, axis=1), *predictions)
        y_pred = jax.tree_util.tree_map(
            lambda p: constrain(p.reshape((rows, *p.shape[2:]))), y_pred
        )
        logs, trainable, optimizer, metrics = self._update_step(
            trainable, optimizer, metrics, (grads, loss), data, y_pred
        )
        return logs, (trainable, non_trainable, optimizer, metrics)

    def _shards(self):
        """``(shards, constrain)``: the batch's blocks and the micro-batches' layout."""
        layout = batch_layout()
        if layout is None:
            return 1, lambda t: t
        mesh, axis, shards = layout
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
        if not self._jit:
            return shards, lambda t: t
        return shards, lambda t: jax.lax.with_sharding_constraint(t, sharding)

    # ------------------------------------------------------------------ the call
    def __call__(self, state, iterator):
        if not self.armed_for_this_fit():
            # Not called by the fit that installed this function: that fit raised
            # before its on_train_end. Train as the model would without it.
            return self.call_own_train_function(state, iterator)
        data = next(iterator)
        self._state = state
        try:
            logs = self._run_batch(self, data)
            return logs, self._state
        finally:
            self._state = None

    # ---------------------------------------------------------------- mechanisms
    def local_batch_rows(self, data) -> int:
        """Rows of the batch on this process's replica (the micro-batch size is per device).

        Without a distribution, the batch's rows. Under a `keras.distribution`,
        the batch is the global one, in equal shares over the mesh's devices:
        one share per device of the model (``num_replicas`` shares).
        """
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        shards, _ = self._shards()
        return _rows(x) // shards * (self.num_replicas if shards > 1 else 1)

    def _rows_per_step(self, micro_batch_size: int) -> int:
        """Rows each shard of the batch gives one micro step (see `_batch_step`)."""
        shards, _ = self._shards()
        if shards > 1:  # each mesh device is one of the model's devices
            return max(1, micro_batch_size)
        return max(1, self.num_replicas * micro_batch_size)

    def _batch_program(self):
        """The jitted batch step; under a distribution, the new state keeps the old layout."""
        if not self._jit or batch_layout() is None:
            return self._batch
        if self._distributed_batch is None:
            shardings = jax.tree_util.tree_map(lambda a: a.sharding, self._state)
            self._distributed_batch = jax.jit(
                self._batch_step,
                static_argnums=2,
                donate_argnums=0,
                out_shardings=(None, shardings),
            )
        return self._distributed_batch

    def plain_device(self) -> str | None:
        """The step's one device; None under a `keras.distribution` (one program over a mesh)."""
        return None if batch_layout() is not None else self.measured_device()

    def measured_device(self) -> str:
        """The device the micro step's memory analysis describes: Keras's default device."""
        device = jax.devices()[0]
        kind = "GPU" if device.platform in ("gpu", "cuda", "rocm") else device.platform.upper()
        return f"/device:{kind}:{device.id if kind != 'CPU' else 0}"

    def step(self, data, micro_batch_size: int):
        """One accumulating step on `data`, `micro_batch_size` rows per device per micro step.

        Returns the step's logs; the new state is what `__call__` hands back to `fit`.
        """
        program = self._batch_program()
        logs, self._state = program(self._state, data, self._rows_per_step(micro_batch_size))
        return logs

    def agree_on_size(self, size: int) -> int:
        """The micro-batch size every process runs: the smallest one planned.

        With several JAX processes the step is one program over all of them, so
        all must compile it for one size (each plans from its own devices' memory).
        """
        if jax.process_count() <= 1:
            return size
        from jax.experimental import multihost_utils

        return int(np.min(multihost_utils.process_allgather(np.int32(size))))

    def snapshot_state(self):
        """The state before a step (JAX's arrays are immutable: a reference is a snapshot)."""
        return self._state

    def restore_state(self, saved) -> None:
        self._state = saved

    #: An out-of-memory error cannot be undone in-process on JAX (module docstring).
    retries_are_safe = False

    def update_began(self) -> bool:
        """Never asked on JAX: no out-of-memory error is retried."""
        return True

    def make_probe(self, data):
        """size -> bytes XLA plans for the micro step on ``num_replicas * size`` rows of `data`,
        less the training state (the step's own memory).

        The compiled step's memory analysis (arguments, outputs and temporaries,
        less what aliases): nothing runs, so nothing can run out of memory.
        """
        trainable, non_trainable, optimizer, metrics = self._state
        layout = batch_layout()
        sharding = None
        if layout is not None:  # the micro-batch laid out as the distribution lays the batch
            mesh, axis, shards = layout
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))

        def probe(micro_batch_size: int) -> int:
            if sharding is None:
                rows = self.num_replicas * micro_batch_size
            else:
                rows = shards * micro_batch_size
            compiled = self._probe_micro.lower(
                trainable,
                non_trainable,
                metrics,
                optimizer,
                _spec(data, rows, sharding),
                np.float32(1.0),
            ).compile()
            total = compiled_bytes(compiled)
            if total is None:
                raise RuntimeError(NO_PROBE_REASON)
            # The step's own memory: the state is there before it (the caller adds
            # the model's state once, `state_bytes`).
            return total - state

        state = variable_bytes([*trainable, *non_trainable, *optimizer, *metrics])
        return probe


def own_train_function(model):
    """`model.train_function`, with an accumulating one left by a `fit` that raised taken off."""
    return _common.own_train_function(model, AccumulatingTrainFunction)
