"""The accumulating train function on JAX (Keras 3).

Keras's JAX `fit` calls ``model.train_function(state, iterator)`` with the whole
training state (trainable, non-trainable, optimizer and metric variables) and takes
the new state back. `AccumulatingTrainFunction` stands in for it for one `fit`. Per
batch:

1. the batch's rows are cut into micro-batches of ``rows_per_step`` rows; each runs
   one jitted *micro step* (`model.compute_loss_and_updates` under
   `jax.value_and_grad`: forward, compiled loss, backward) whose gradients,
   weighted by the micro-batch's share of the batch (``rows / batch``), are added to
   an accumulator. The micro steps run one after another, so only one
   micro-batch's activations are alive; the accumulator's buffers are donated and
   reused. At most two shapes are compiled per batch size: the micro-batch, and the
   last, shorter one;
2. one jitted *update* applies the summed gradients with
   `optimizer.stateless_apply` (one update: `iterations`, schedules, clipping,
   weight decay and loss-scale checks happen once) and updates the loss tracker
   and the metrics once, on the whole batch's concatenated predictions.

Running out of memory cannot be undone in-process on JAX (the device may be left
unusable, and the state handed in is donated by Keras's own step), so there is
no retry: `OUT_OF_MEMORY_ERRORS` is empty and `"auto"` plans from XLA's memory
analysis of the compiled micro step (`make_probe`), which runs nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from keras_parallel._backend.common import accumulation as _common
from keras_parallel._backend.common.accumulation import TrainFunctionSwitch, loss_tracker
from keras_parallel._backend.jax.probes import compiled_bytes
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
#: thread dispatches the next step; with the accumulating step's several
#: programs over several host (CPU) devices, that race hung XLA's CPU runtime
#: (devices waiting in a rendezvous) at an epoch's end. Synchronous callbacks
#: cost little: the logs of one batch, not of each micro-batch.
SYNCHRONOUS_BATCH_END = True

#: Whether asking the probe costs no device memory (the probe compiles the step and runs nothing).
PROBE_RUNS_NOTHING = True

#: Why `make_probe` may give no figure (it always gives one on JAX).
NO_PROBE_REASON = "XLA gives no memory analysis for this step"


def check_supported() -> None:
    """Gradient accumulation works on JAX, except under a `keras.distribution`."""
    if keras.distribution.distribution() is not None:
        raise ValueError(
            "GradientAccumulation on JAX does not support a `keras.distribution` "
            "(its train step lays out the state itself). Expected "
            "keras.distribution.distribution() to be None. Received: "
            f"{type(keras.distribution.distribution()).__name__}. On several JAX "
            "processes, train the template under keras.distribution.DataParallel() "
            "without GradientAccumulation, or use tf-keras (docs/several_machines.md)."
        )


def _rows(structure) -> int:
    leaves = [t for t in jax.tree_util.tree_leaves(structure) if t is not None]
    return int(leaves[0].shape[0])


def _slice_rows(structure, start: int, stop: int):
    return jax.tree_util.tree_map(lambda t: t[start:stop], structure)


def _spec(structure, rows: int):
    """Shape-and-dtype stand-ins of `structure` with `rows` rows (for compiling only)."""
    return jax.tree_util.tree_map(
        lambda t: jax.ShapeDtypeStruct((rows, *t.shape[1:]), t.dtype), structure
    )


class AccumulatingTrainFunction(TrainFunctionSwitch):
    """A JAX `model.train_function` that accumulates micro-batch gradients within each batch.

    Arguments as `TrainFunctionSwitch`'s.
    """

    def __init__(self, model, run_batch, num_replicas=1):
        check_supported()
        super().__init__(model, run_batch, num_replicas)
        self._tracker = loss_tracker(model)
        self._state = None
        jit = not model.run_eagerly and model.jit_compile
        self._micro = jax.jit(self._micro_step, donate_argnums=0) if jit else self._micro_step
        self._update = (
            jax.jit(self._update_step, donate_argnums=(0, 1)) if jit else self._update_step
        )
        self._probe_micro = jax.jit(self._micro_step)

    # ---------------------------------------------------------------- the steps
    def _micro_step(self, accumulated, trainable, non_trainable, metrics, optimizer, data, share):
        """Forward and backward on one micro-batch: adds ``share * (gradients, loss)``.

        `accumulated` is ``(gradients, loss)`` so far, or None for the first micro-batch.
        """
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
        if accumulated is not None:
            grads = [a + g for a, g in zip(accumulated[0], grads, strict=True)]
            loss = accumulated[1] + loss
        return (grads, loss), y_pred, non_trainable, metrics

    def _update_step(self, trainable, optimizer, metrics, accumulated, data, predictions):
        """The one update of the batch, then the loss tracker and metrics on the whole batch."""
        model = self.model
        grads, loss = accumulated
        if len(predictions) == 1:
            y_pred = predictions[0]
        else:  # the micro-batches' predictions, concatenated in the compiled update
            y_pred = jax.tree_util.tree_map(lambda *p: jnp.concatenate(p), *predictions)
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
        """Rows of the batch (JAX runs one replica per process)."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return _rows(x)

    def measured_device(self) -> str:
        """The device the micro step's memory analysis describes: Keras's default device."""
        device = jax.devices()[0]
        kind = "GPU" if device.platform in ("gpu", "cuda", "rocm") else device.platform.upper()
        return f"/device:{kind}:{device.id if kind != 'CPU' else 0}"

    def step(self, data, micro_batch_size: int):
        """One accumulating step on `data`, `micro_batch_size` rows per device per micro step.

        Returns the step's logs; the new state is what `__call__` hands back to `fit`.
        """
        trainable, non_trainable, optimizer, metrics = self._state
        rows = self.local_batch_rows(data)
        per_step = max(1, self.num_replicas * micro_batch_size)
        accumulated, predictions = None, []
        for start in range(0, max(rows, 1), per_step):
            stop = min(start + per_step, rows)
            share = np.float32((stop - start) / rows) if rows else np.float32(1.0)
            accumulated, y_pred, non_trainable, metrics = self._micro(
                accumulated,
                trainable,
                non_trainable,
                metrics,
                optimizer,
                _slice_rows(data, start, stop),
                share,
            )
            predictions.append(y_pred)
        logs, trainable, optimizer, metrics = self._update(
            trainable, optimizer, metrics, accumulated, data, predictions
        )
        self._state = (trainable, non_trainable, optimizer, metrics)
        return logs

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
        """size -> bytes XLA plans for the micro step on ``num_replicas * size`` rows of `data`.

        The compiled step's memory analysis (arguments, outputs and temporaries,
        less what aliases): nothing runs, so nothing can run out of memory.
        """
        trainable, non_trainable, optimizer, metrics = self._state

        def probe(micro_batch_size: int) -> int:
            rows = self.num_replicas * micro_batch_size
            compiled = self._probe_micro.lower(
                None,
                trainable,
                non_trainable,
                metrics,
                optimizer,
                _spec(data, rows),
                np.float32(1.0),
            ).compile()
            total = compiled_bytes(compiled)
            if total is None:
                raise RuntimeError(NO_PROBE_REASON)
            return total

        return probe


def own_train_function(model):
    """`model.train_function`, with an accumulating one left by a `fit` that raised taken off."""
    return _common.own_train_function(model, AccumulatingTrainFunction)
