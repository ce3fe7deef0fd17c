"""The accumulating train function on TensorFlow (Keras 3's TF backend and tf-keras).

`AccumulatingTrainFunction` replaces `model.train_function` for one `fit`. Per batch it
fetches the batch in Python, then runs one `tf.function` step that, on each replica
(`strategy.run`, once per batch):

1. cuts the replica's rows into micro-batches of ``rows_per_step`` rows (a
   `tf.while_loop`, one micro-batch at a time, so only one micro-batch's activations
   are alive);
2. for each, runs the forward pass and the compiled loss, weights the loss by the
   micro-batch's share of the batch (``rows / batch``: the shares sum to 1, so the
   weighted sum is the whole-batch loss, regularization included once) and adds its
   gradients to accumulators;
3. applies the summed gradients once with the optimizer (one update: `iterations`,
   schedules, clipping, weight decay and loss-scale checks happen once);
4. updates the metrics once on the whole batch's concatenated predictions.

The micro-batch size is a tensor argument, so changing it does not retrace. The
function offers mechanisms only: `step` (one accumulating step at a given micro-batch
size), `snapshot_state` / `restore_state` (the state a failed step touched),
`update_began` (whether a failed step got as far as its update), `make_probe` (the
allocator peak of a forward/backward pass). The policy (which micro-batch size,
whether to retry a step that ran out of memory, and with what) is the caller's: the
`run_batch` callable it passes in is called with the function and each fetched batch.

Under a `MultiWorkerMirroredStrategy` over several workers (tf-keras), a step is
three functions so that one worker running out of memory makes every worker redo
the batch (`joint_retries`): the micro-batch loop with no collective (an
out-of-memory error raises on that worker alone), then on every worker one
all-reduce of the summed gradients with a "failed" count packed in (the one
collective the optimizer's apply would make), then, only if no worker failed, the
update with the reduced gradients (the optimizer aggregates nothing again) and the
metrics. Where a worker failed, every worker raises an out-of-memory error before
anything is applied, and the caller undoes and redoes the batch as on one worker.
State snapshots read and assign each replica's own copy of a variable: no
cross-worker traffic.

The function serves one `fit` at a time, with the life cycle every backend shares
(`install`, `arm`, `uninstall`: `_backend/common/accumulation.TrainFunctionSwitch`).
"""

from __future__ import annotations

import functools
import inspect

import tensorflow as tf

from keras_parallel._backend.common import accumulation as _common
from keras_parallel._backend.common.accumulation import (
    TrainFunctionSwitch,
    loss_tracker,
    state_variables,
)
from keras_parallel._backend.common.devices import canonical_device_name
from keras_parallel._backend.tensorflow.memory import memory_info, reset_memory_stats
from keras_parallel._compat import IS_KERAS_3, keras

__all__ = [
    "AccumulatingTrainFunction",
    "OUT_OF_MEMORY_ERRORS",
    "check_supported",
    "measured_device",
    "spans_workers",
    "local_batch_rows",
    "own_train_function",
]

OUT_OF_MEMORY_ERRORS = (tf.errors.ResourceExhaustedError,)

#: Whether Keras must call the batch-end callbacks in the training thread.
SYNCHRONOUS_BATCH_END = False

#: Whether asking the probe costs no device memory (the probe runs a forward/backward pass).
PROBE_RUNS_NOTHING = False

#: Why `make_probe` may give no figure.
NO_PROBE_REASON = (
    "TensorFlow has no allocator statistics there; on a CPU it needs TF_CPU_ALLOCATOR_USE_BFC=true"
)


def check_supported() -> None:
    """Gradient accumulation works on TensorFlow (Keras 3 and tf-keras): nothing to refuse."""


def spans_workers(strategy) -> bool:
    """Whether `strategy` is a `MultiWorkerMirroredStrategy` over several workers."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(tasks) for tasks in spec.values()) > 1


def _drop_optionals(data):
    # Keras 3 data adapters may yield empty tf.experimental.Optional for None.
    return tf.nest.map_structure(
        lambda t: None if isinstance(t, tf.experimental.Optional) else t, data
    )


def _first_leaf(structure):
    return next(t for t in tf.nest.flatten(structure) if t is not None)


def _slice_rows(structure, start, stop):
    return tf.nest.map_structure(lambda t: None if t is None else t[start:stop], structure)


def local_batch_rows(data, strategy) -> int:
    """Rows of the first replica's part of a fetched batch (the whole batch without a strategy)."""
    x, _, _ = keras.utils.unpack_x_y_sample_weight(_drop_optionals(data))
    leaf = _first_leaf(x)
    leaf = strategy.experimental_local_results(leaf)[0]
    return int(leaf.shape[0]) if leaf.shape[0] is not None else int(tf.shape(leaf)[0])


def _skip_aggregation_kwargs(optimizer):
    """The `apply_gradients` keyword that skips its all-reduce (None when it has none)."""
    try:
        parameters = inspect.signature(optimizer.apply_gradients).parameters
    except (TypeError, ValueError):
        return None
    if "skip_gradients_aggregation" in parameters:  # tf-keras's optimizers
        return {"skip_gradients_aggregation": True}
    if "experimental_aggregate_gradients" in parameters:  # tf-keras's legacy optimizers
        return {"experimental_aggregate_gradients": False}
    return None


def _read(variable):
    """A variable's value now (ordered after the writes before it), on either flavour."""
    return tf.identity(variable.value if IS_KERAS_3 else variable)


def _loss_scaling(optimizer):
    """(scale_loss, unscale_gradients) for the optimizer's loss scaling, if any."""
    if IS_KERAS_3:
        # Keras 3's LossScaleOptimizer unscales and checks the gradients in apply.
        return optimizer.scale_loss, None
    if hasattr(optimizer, "get_scaled_loss"):
        return optimizer.get_scaled_loss, optimizer.get_unscaled_gradients
    return None, None


class AccumulatingTrainFunction(TrainFunctionSwitch):
    """A `model.train_function` that accumulates micro-batch gradients within each batch.

    Arguments as `TrainFunctionSwitch`'s (`_backend/common/accumulation.py`).
    """

    def __init__(self, model, run_batch, num_replicas=1, batch_norm_pool=None):
        super().__init__(model, run_batch, num_replicas, batch_norm_pool)
        self.strategy = model.distribute_strategy
        self._scale_loss, self._unscale_gradients = _loss_scaling(model.optimizer)
        self._tracker = loss_tracker(model) if IS_KERAS_3 else None
        #: Whether a step's collectives span several workers (MWMS).
        self.spans_workers = spans_workers(self.strategy)
        #: Whether a step on several workers is split so that an out-of-memory error
        #: on one worker fails the step on every worker (see the module docstring).
        #: Needs an optimizer that can apply gradients already all-reduced (tf-keras);
        #: Keras 3 cannot `fit` on several workers (keras-team/keras#20585).
        self._skip_aggregation = None if IS_KERAS_3 else _skip_aggregation_kwargs(model.optimizer)
        self.joint_retries = self.spans_workers and self._skip_aggregation is not None
        self._joint_update_began = False
        self._agree_step = None
        self._step = self._wrap(self._distributed_step)
        if self.joint_retries:
            self._gradients_step = self._wrap(self._distributed_gradients)
            self._zeros_step = self._wrap(self._distributed_zeros)
            self._exchange_step = self._wrap(self._distributed_exchange)
            self._update_step = self._wrap(self._distributed_update)
        self._probe_step = None
        with self.strategy.scope():
            if IS_KERAS_3:
                self.build_optimizer()
            # Set once a step's gradients are complete and its update may begin: an
            # out-of-memory error after that point is not retried (part of the update
            # may be applied, and a retry would apply it twice).
            self._updating = tf.Variable(
                False,
                trainable=False,
                name="accumulation_updating",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def _wrap(self, function):
        if self.model.run_eagerly:
            return function
        return tf.function(function, reduce_retracing=True)

    # ------------------------------------------------------------------ per replica
    def _compute_loss(self, x, y, y_pred, sample_weight):
        if IS_KERAS_3:
            return self.model.compute_loss(x, y, y_pred, sample_weight, training=True)
        return self.model.compute_loss(x, y, y_pred, sample_weight)

    def _micro_step(self, x, y, sample_weight, start, rows_per_step, batch, pool=None):
        """Forward and backward on rows [start, start + rows): (grads, weighted loss, y_pred).

        With a `BatchNormPool`, its moving statistics are set to 0 first, and the
        values the micro step leaves in them come last: (..., values, rows).
        """
        stop = tf.minimum(start + rows_per_step, batch)
        x_k, y_k, sw_k = (_slice_rows(t, start, stop) for t in (x, y, sample_weight))
        variables = self.model.trainable_variables
        if pool:
            for variable, zero in zip(
                pool.variables, pool.zeros([_read(v) for v in pool.variables]), strict=True
            ):
                variable.assign(zero)
        with tf.GradientTape() as tape:
            y_pred = self.model(x_k, training=True)
            loss = self._compute_loss(x_k, y_k, y_pred, sw_k)
            share = tf.math.divide_no_nan(
                tf.cast(stop - start, loss.dtype), tf.cast(batch, loss.dtype)
            )
            loss = loss * share
            scaled = self._scale_loss(loss) if self._scale_loss is not None else loss
        grads = tape.gradient(scaled, variables)
        grads = [
            tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(grads, variables, strict=True)
        ]
        if pool:
            values = [_read(v) for v in pool.variables]
            return grads, loss, y_pred, values, tf.cast(stop - start, values[0].dtype)
        return grads, loss, y_pred

    def _replica_gradients(self, data, rows_per_step):
        """The micro-batch loop: (summed gradients, whole-batch loss, concatenated y_pred)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch = tf.shape(_first_leaf(x))[0]
        steps = tf.maximum((batch + rows_per_step - 1) // rows_per_step, 1)

        # The first micro-batch runs outside the loop: it gives the accumulators'
        # and the predictions' structure and dtypes.
        pool = self.batch_norm_pool
        if pool:
            statistics = pool.start([_read(v) for v in pool.variables], tf.constant(0.0))
            grads, loss, y_pred, values, rows = self._micro_step(
                x, y, sample_weight, 0, rows_per_step, batch, pool
            )
            statistics = pool.merge(statistics, values, rows)
        else:
            statistics = ()
            grads, loss, y_pred = self._micro_step(x, y, sample_weight, 0, rows_per_step, batch)
        pred_leaves = tf.nest.flatten(y_pred)
        arrays = [
            tf.TensorArray(
                p.dtype,
                size=steps,
                infer_shape=False,
                element_shape=tf.TensorShape([None]).concatenate(p.shape[1:]),
            ).write(0, p)
            for p in pred_leaves
        ]

        def body(k, grads, loss, arrays, statistics):
            found = self._micro_step(
                x, y, sample_weight, k * rows_per_step, rows_per_step, batch, pool
            )
            g_k, loss_k, pred_k = found[:3]
            if pool:
                statistics = pool.merge(statistics, *found[3:])
            grads = [a + b for a, b in zip(grads, g_k, strict=True)]
            arrays = [a.write(k, p) for a, p in zip(arrays, tf.nest.flatten(pred_k), strict=True)]
            return k + 1, grads, loss + loss_k, arrays, statistics

        _, grads, loss, arrays, statistics = tf.while_loop(
            lambda k, *_: k < steps,
            body,
            (tf.constant(1), grads, loss, arrays, statistics),
            parallel_iterations=1,  # one micro-batch alive at a time
        )
        if pool:
            for variable, value in zip(pool.variables, pool.finish(statistics), strict=True):
                variable.assign(value)
        if self._unscale_gradients is not None:
            grads = self._unscale_gradients(grads)
        y_pred = tf.nest.pack_sequence_as(y_pred, [a.concat() for a in arrays])
        return grads, loss, y_pred

    def _replica_step(self, data, rows_per_step):
        grads, loss, y_pred = self._replica_gradients(data, rows_per_step)
        # Inside a graph, stateful ops run as soon as their inputs are ready: without
        # this, `iterations.assign_add` (which needs no gradient) could run in a step
        # that then fails out of memory, and a retry would count the update twice.
        # `_updating` is set before any of the update runs (see `update_began`).
        with tf.control_dependencies(grads):
            updating = self._updating.assign(True)
        with tf.control_dependencies([updating]):
            return self._replica_update(data, grads, loss, y_pred)

    def _replica_update(self, data, grads, loss, y_pred, **apply_kwargs):
        """Applies `grads` once and updates the metrics on the whole batch; returns the logs."""
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch = tf.shape(_first_leaf(x))[0]
        model.optimizer.apply_gradients(
            zip(grads, model.trainable_variables, strict=True), **apply_kwargs
        )
        if self._tracker is not None:
            # Keras 3's train_step logs the loss unscaled for distribution, per row.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            self._tracker.update_state(loss * tf.cast(replicas, loss.dtype), sample_weight=batch)
        logs = model.compute_metrics(x, y, y_pred, sample_weight)
        counter = getattr(model, "_train_counter", None)  # tf-keras: TensorBoard's step
        if counter is not None:
            with tf.control_dependencies(tf.nest.flatten(logs)):
                counter.assign_add(1)
        return logs

    def _distributed_step(self, data, rows_per_step):
        self._updating.assign(False)  # ordered before the replicas' assign(True)
        outputs = self.strategy.run(self._replica_step, args=(data, rows_per_step))
        return self._reduce(outputs)

    # ------------------------------------------------- several workers: a joint step
    def _distributed_gradients(self, data, rows_per_step):
        # No collective: an out-of-memory error here raises on this worker alone.
        return self.strategy.run(self._replica_gradients, args=(data, rows_per_step))

    def _distributed_zeros(self):
        # What a worker whose gradients failed sends: zeros of the gradients' own
        # types, so the exchange is not traced again on that worker alone (a new
        # trace takes new collective keys, which must match across workers).
        variables = self.model.trainable_variables
        return self.strategy.run(lambda: [tf.zeros(v.shape, v.dtype) for v in variables])

    def _distributed_exchange(self, grads, failed):
        def exchange(grads, failed):
            # One all-reduce (TensorFlow packs the list into one collective): the
            # gradients and, in the same pack, how many replicas failed.
            # (`tf.identity` places the function's inputs on the replica's device:
            # the all-reduce needs one.)
            flag = tf.reshape(tf.cast(failed, grads[0].dtype), [1])
            reduced = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, [*(tf.identity(g) for g in grads), flag]
            )
            return reduced[:-1], reduced[-1][0]

        return self.strategy.run(exchange, args=(grads, failed))

    def _distributed_update(self, data, grads, loss, y_pred):
        update = functools.partial(self._replica_update, **self._skip_aggregation)
        outputs = self.strategy.run(update, args=(data, grads, loss, y_pred))
        return self._reduce(outputs)

    def _joint_step(self, data, rows_per_step):
        """One step on several workers: every worker fails it if any runs out of memory."""
        self._joint_update_began = False
        error = None
        try:
            grads, loss, y_pred = self._gradients_step(data, rows_per_step)
        except OUT_OF_MEMORY_ERRORS as caught:
            error = caught
        if error is not None:
            grads = self._zeros_step()
        reduced, failed = self._exchange_step(grads, tf.constant(error is not None, tf.int32))
        failed = float(self.strategy.experimental_local_results(failed)[0].numpy())
        if error is not None:
            raise error
        if failed > 0:
            raise tf.errors.ResourceExhaustedError(
                None,
                None,
                "GradientAccumulation: another worker ran out of memory in this step; "
                "every worker undoes it (nothing was applied) and redoes the batch with "
                'the smaller micro-batch that "auto" agrees on, or raises with the fixed '
                "size.",
            )
        self._joint_update_began = True
        return self._update_step(data, reduced, loss, y_pred)

    def _reduce(self, outputs):
        strategy = self.strategy

        def reduce(value):
            results = strategy.experimental_local_results(value)
            if len(results) == 1:
                return results[0]
            if IS_KERAS_3:  # Keras 3's reduce_per_replica("auto"): the mean
                return tf.reduce_mean(tf.stack(results), axis=0)
            return results[0]  # tf-keras: "first" (synced metric results)

        return tf.nest.map_structure(reduce, outputs)

    # -------------------------------------------------------------------- probing
    def _replica_probe(self, data, rows):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch = tf.shape(_first_leaf(x))[0]
        grads, loss, _ = self._micro_step(x, y, sample_weight, 0, rows, batch)
        return tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads]) + tf.cast(
            loss, tf.float32
        )

    def make_probe(self, data):
        """A memory probe on `data`: size -> bytes a forward/backward on that many rows
        allocates at its peak above what the device held before it (the step's own
        memory; `GradientAccumulation` adds the model's state, `state_bytes`).

        Returns None when the device has no allocator statistics (a CPU without
        TF_CPU_ALLOCATOR_USE_BFC, oneDNN on or off). The probe applies nothing, and
        restores the non-trainable and metric variables the forward pass touched.
        """
        device = measured_device(self.strategy)
        try:
            reset_memory_stats(device)
            memory_info(device)
        except (ValueError, tf.errors.OpError):
            return None
        if self._probe_step is None:

            def probe_step(data, rows):
                return self.strategy.run(self._replica_probe, args=(data, rows))

            self._probe_step = self._wrap(probe_step)

        def probe(micro_batch_size: int) -> int:
            saved = self.snapshot_state()
            try:
                reset_memory_stats(device)
                before = int(memory_info(device)["current"])
                rows = tf.constant(self.num_replicas * micro_batch_size, tf.int32)
                result = self._probe_step(data, rows)
                tf.nest.map_structure(
                    lambda t: t.numpy(), self.strategy.experimental_local_results(result)
                )
                return int(memory_info(device)["peak"]) - before
            finally:
                self.restore_state(saved)

        return probe

    # ------------------------------------------------------------ state save/restore
    def _local_copies(self, variables):
        # Each replica's own copy of a distributed variable: reading or assigning it
        # is local (assigning a MirroredVariable or reading a SyncOnRead one from
        # outside the replicas would all-reduce across workers).
        return [c for v in variables for c in self.strategy.experimental_local_results(v)]

    def snapshot_state(self):
        variables = state_variables(self.model)
        copies = self._local_copies(variables)
        return variables, copies, [tf.identity(c) for c in copies]

    def restore_state(self, saved):
        variables, copies, values = saved
        for copy, value in zip(copies, values, strict=True):
            copy.assign(value)
        # Metrics built lazily by the failed step (Keras 3 builds compiled metrics at
        # the first trace) were not in the snapshot: start them from zero.
        known = {id(v) for v in variables}
        for metric in self.model.metrics:
            if any(id(v) not in known for v in metric.variables):
                metric.reset_state()

    def update_began(self) -> bool:
        """Whether the last step got as far as its update (read after it failed)."""
        if self.joint_retries:
            return self._joint_update_began
        return bool(self._updating.numpy())

    # ----------------------------------------------------------------- several workers
    @property
    def retries_are_safe(self) -> bool:
        """Whether a step that ran out of memory may be undone and redone.

        On several workers only where the step is joint (`joint_retries`): there every
        worker fails the step together, and all redo it.
        """
        return not self.spans_workers or self.joint_retries

    def agree_on_size(self, size: int) -> int:
        """The smallest of every worker's `size` (one all-gather; `size` itself on one worker).

        Workers must run the same micro-batch size: their steps meet in the same
        collectives. Called once per plan, not per step.
        """
        if not self.spans_workers:
            return size
        if self._agree_step is None:

            def gather(value):
                context = tf.distribute.get_replica_context()
                return tf.reduce_min(context.all_gather(tf.reshape(value, [1]), axis=0))

            self._agree_step = tf.function(lambda value: self.strategy.run(gather, args=(value,)))
        result = self._agree_step(tf.constant(size, tf.int32))
        return int(self.strategy.experimental_local_results(result)[0].numpy())

    # ------------------------------------------------------------------- the call
    def __call__(self, iterator):
        if not self.armed_for_this_fit():
            # Not called by the fit that installed this function: that fit raised
            # before its on_train_end. Train as the model would without it.
            return self.call_own_train_function(iterator)
        data = _drop_optionals(next(iterator))
        return self._run_batch(self, data)

    # ------------------------------------------------------------------ mechanisms
    def local_batch_rows(self, data) -> int:
        """Rows of the first replica's part of a fetched batch."""
        return local_batch_rows(data, self.strategy)

    def measured_device(self) -> str:
        """The device whose allocator peak `make_probe` reads (see `measured_device`)."""
        return measured_device(self.strategy)

    def plain_device(self) -> str | None:
        """The step's one device; None under a strategy of several replicas or workers."""
        if self.spans_workers or self.strategy.num_replicas_in_sync > 1:
            return None
        return measured_device(self.strategy)

    def step(self, data, micro_batch_size: int):
        """One accumulating step on `data`, `micro_batch_size` rows per device per micro step.

        Returns the step's logs; raises `OUT_OF_MEMORY_ERRORS` as the step does, and,
        on several workers (`joint_retries`), on every worker when any ran out.
        """
        rows = tf.constant(self.num_replicas * micro_batch_size, tf.int32)
        if self.joint_retries:
            return self._joint_step(data, rows)
        return self._step(data, rows)


def own_train_function(model):
    """`model.train_function`, with an accumulating one left by a `fit` that raised taken off."""
    return _common.own_train_function(model, AccumulatingTrainFunction)


def measured_device(strategy) -> str:
    """Canonical name ("/device:GPU:0") of the device whose allocator peak the probe reads."""
    try:
        devices = tuple(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError):  # the default strategy has none
        devices = ()
    if devices:
        name = devices[0]
    else:
        gpus = tf.config.list_logical_devices("GPU")
        name = gpus[0].name if gpus else "/device:CPU:0"
    return canonical_device_name(name)
