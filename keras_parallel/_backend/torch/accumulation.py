"""The accumulating train function on torch (Keras 3).

Keras's torch `fit` calls ``model.train_function(data)`` eagerly, once per batch.
`AccumulatingTrainFunction` stands in for it for one `fit`. Per batch it cuts the
rows into micro-batches of ``rows_per_step`` rows and, for each, runs the forward
pass and the compiled loss and calls ``backward()`` on the loss weighted by the
micro-batch's share of the batch (``rows / batch``): torch adds the gradients into
the variables' ``.grad``, and each micro-batch's graph is freed by its backward
pass, so only one micro-batch's activations are alive. Then the optimizer applies
the summed gradients once (one update: `iterations`, schedules, clipping, weight
decay and loss-scale checks happen once), and the loss tracker and metrics are
updated once, on the whole batch's predictions.

A CUDA out-of-memory error (`torch.OutOfMemoryError`) before the update is
recoverable: `restore_state` zeroes the partial gradients, puts back the state the
step touched (non-trainable and metric variables, `iterations`), collects the
failed step's tensors (held by the error's traceback until the caller has left
its ``except`` block) and empties torch's cache, so the retry starts from the
memory the step started from.
"""

from __future__ import annotations

import gc

import torch

from keras_parallel._backend.common import accumulation as _common
from keras_parallel._backend.common.accumulation import (
    TrainFunctionSwitch,
    loss_tracker,
    state_variables,
)
from keras_parallel._compat import keras

__all__ = [
    "AccumulatingTrainFunction",
    "OUT_OF_MEMORY_ERRORS",
    "check_supported",
    "own_train_function",
]

OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)

#: Whether Keras must call the batch-end callbacks in the training thread.
SYNCHRONOUS_BATCH_END = False

#: Whether asking the probe costs no device memory (the probe runs a forward/backward pass).
PROBE_RUNS_NOTHING = False

#: Why `make_probe` may give no figure.
NO_PROBE_REASON = "torch keeps allocator statistics for CUDA devices only"


def check_supported() -> None:
    """Gradient accumulation works on torch: nothing to refuse."""


def _leaves(structure):
    return [t for t in keras.tree.flatten(structure) if t is not None]


def _slice_rows(structure, start: int, stop: int):
    return keras.tree.map_structure(lambda t: None if t is None else t[start:stop], structure)


def _detached(structure):
    return keras.tree.map_structure(lambda t: t.detach(), structure)


def _assign(variables, values) -> None:
    with torch.no_grad():
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)


def _cuda_index(device: str) -> int | None:
    return int(device.rsplit(":", 1)[1]) if ":GPU:" in device else None


class AccumulatingTrainFunction(TrainFunctionSwitch):
    """A torch `model.train_function` that accumulates micro-batch gradients within each batch.

    Arguments as `TrainFunctionSwitch`'s.
    """

    def __init__(self, model, run_batch, num_replicas=1, batch_norm_pool=None):
        super().__init__(model, run_batch, num_replicas, batch_norm_pool)
        self._tracker = loss_tracker(model)
        self._updating = False
        self.build_optimizer()

    # ------------------------------------------------------------------ the call
    def __call__(self, data):
        if not self.armed_for_this_fit():
            # Not called by the fit that installed this function: that fit raised
            # before its on_train_end. Train as the model would without it.
            return self.call_own_train_function(data)
        return self._run_batch(self, data[0])  # Keras hands the batch in a list

    # ---------------------------------------------------------------- mechanisms
    def local_batch_rows(self, data) -> int:
        """Rows of the batch (torch runs one replica per process)."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return int(_leaves(x)[0].shape[0])

    def measured_device(self) -> str:
        """The device Keras computes on: the first CUDA device, else the CPU."""
        return "/device:GPU:0" if torch.cuda.is_available() else "/device:CPU:0"

    def _forward_backward(self, x, y, sample_weight, share: float):
        """Forward, loss and backward on one micro-batch; returns (weighted loss, predictions)."""
        model = self.model
        y_pred = model(x, training=True)
        loss = model.compute_loss(x, y, y_pred, sample_weight, training=True) * share
        if model.trainable_weights:
            model.optimizer.scale_loss(loss).backward()
        return loss.detach(), _detached(y_pred)

    def step(self, data, micro_batch_size: int):
        """One accumulating step on `data`, `micro_batch_size` rows per device per micro step.

        Returns the step's logs; raises `OUT_OF_MEMORY_ERRORS` as the step does.
        """
        model = self.model
        self._updating = False
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        rows = self.local_batch_rows(data)
        per_step = max(1, self.num_replicas * micro_batch_size)
        model.zero_grad(set_to_none=True)
        loss, predictions = None, []
        pool = self.batch_norm_pool
        if pool:
            statistics = pool.start([torch.clone(v.value.detach()) for v in pool.variables])
        for start in range(0, max(rows, 1), per_step):
            stop = min(start + per_step, rows)
            share = (stop - start) / rows if rows else 1.0
            if pool:
                _assign(pool.variables, pool.zeros([v.value for v in pool.variables]))
            loss_k, y_pred = self._forward_backward(
                *(_slice_rows(t, start, stop) for t in (x, y, sample_weight)), share
            )
            if pool:
                values = [v.value.detach() for v in pool.variables]
                statistics = pool.merge(statistics, values, float(stop - start))
            loss = loss_k if loss is None else loss + loss_k
            predictions.append(y_pred)
        if pool:
            _assign(pool.variables, pool.finish(statistics))
        trainable = model.trainable_weights[:]
        if trainable:
            grads = [v.value.grad for v in trainable]
            self._updating = True
            with torch.no_grad():
                model.optimizer.apply(grads, trainable)
        if self._tracker is not None:
            self._tracker.update_state(loss, sample_weight=rows)
        if len(predictions) == 1:
            y_pred = predictions[0]
        else:
            y_pred = keras.tree.map_structure(lambda *p: torch.cat(p), *predictions)
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def snapshot_state(self):
        variables = state_variables(self.model)
        return variables, [torch.clone(v.value.detach()) for v in variables]

    def restore_state(self, saved) -> None:
        self.model.zero_grad(set_to_none=True)
        variables, values = saved
        with torch.no_grad():
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)
        # The failed step's tensors, held by the error's traceback until now.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def update_began(self) -> bool:
        """Whether the last step got as far as its update (read after it failed)."""
        return self._updating

    def make_probe(self, data):
        """size -> bytes a forward/backward of ``num_replicas * size`` rows of `data` allocates
        at its peak above what the device held before it (the step's own memory).

        None where torch keeps no statistics (the CPU). The probe applies nothing and
        restores what the forward pass touched.
        """
        index = _cuda_index(self.measured_device())
        if index is None:
            return None
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

        def probe(micro_batch_size: int) -> int:
            rows = self.num_replicas * micro_batch_size
            saved = self.snapshot_state()
            try:
                torch.cuda.synchronize(index)
                torch.cuda.reset_peak_memory_stats(index)
                before = int(torch.cuda.memory_allocated(index))
                self._forward_backward(
                    *(_slice_rows(t, 0, rows) for t in (x, y, sample_weight)), 1.0
                )
                torch.cuda.synchronize(index)
                return int(torch.cuda.max_memory_allocated(index)) - before
            finally:
                self.restore_state(saved)

        return probe


def own_train_function(model):
    """`model.train_function`, with an accumulating one left by a `fit` that raised taken off."""
    return _common.own_train_function(model, AccumulatingTrainFunction)
