"""`GradientAccumulation`: train on big batches one micro-batch at a time."""

from __future__ import annotations

import math
from collections.abc import Callable

from keras_parallel import _backend, _validation, multi_worker
from keras_parallel._backend.common.accumulation import BatchNormPool
from keras_parallel._backend.common.probes import state_bytes
from keras_parallel._batch_norm import is_batch_norm, unsupported_reason
from keras_parallel._compat import IS_KERAS_3, keras
from keras_parallel._graph import all_sublayers, own_steps
from keras_parallel._warnings import warn
from keras_parallel.callbacks._order import move_to_front
from keras_parallel.layers.batch_slice import slice_sizes
from keras_parallel.memory import default_source, device_memory_limit
from keras_parallel.parallel import num_replicas, replicas, unwrap
from keras_parallel.plan import (
    fewest_rows_note,
    plan_auto,
    remembered_probe,
    rows_measure,
    with_state,
)

__all__ = ["GradientAccumulation"]

_AUTO = "auto"


def _has_batch_normalization(model) -> bool:
    return any(is_batch_norm(layer) for layer in all_sublayers(model))


def _batch_norm_pool(model) -> BatchNormPool:
    """The BatchNormalization layers whose moving statistics move once per batch.

    Those that move once per micro step: every trainable layer of a plain model
    (not `renorm`), and of a DataParallel model the ones it gives whole-batch
    statistics (`batch_norm="global"`). With `batch_norm="per_slice"` a layer
    moves once per slice: none is pooled.
    """
    if num_replicas(model) > 1:
        core = replicas(model)
        found = core.global_batch_norms if core.batch_norm == "global" else []
    else:
        found = [
            layer
            for layer in all_sublayers(model)
            if is_batch_norm(layer) and unsupported_reason(layer) is None
        ]
    layers, unbiased = [], []
    for layer in found:
        if not layer.trainable:
            continue
        rows = None
        if not IS_KERAS_3 and getattr(layer, "fused", False):
            rows = _values_per_row(layer)
            if rows is None:  # its input's shape is unknown: left to move per micro step
                continue
        layers.append(layer)
        unbiased.append(rows)
    return BatchNormPool(layers, unbiased)


def _values_per_row(layer) -> int | None:
    """A tf-keras fused layer's values per row and channel (its input's static shape)."""
    try:
        shape = list(layer.input.shape)[1:]
    except (AttributeError, ValueError, RuntimeError):
        return None
    axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
    if any(d is None for d in shape):
        return None
    channels = math.prod(shape[a - 1] if a > 0 else shape[a] for a in axes)
    return math.prod(shape) // channels


def _steps_per_execution(model):
    value = getattr(model, "steps_per_execution", 1)
    if hasattr(value, "numpy"):  # tf-keras keeps it in a variable
        value = value.numpy().item()
    return value


def _accumulation_steps_of(optimizer) -> int | None:
    """The optimizer's own accumulation (Keras 3 `gradient_accumulation_steps`), also wrapped."""
    while optimizer is not None:
        steps = getattr(optimizer, "gradient_accumulation_steps", None)
        if steps:
            return steps
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


class GradientAccumulation(keras.callbacks.Callback):
    """Accumulates gradients over micro-batches so `fit` keeps its batch in less memory.

    Each batch `fit` hands the model is cut into micro-batches of at most
    `micro_batch_size` rows per device. Their gradients, each weighted by the
    micro-batch's share of the batch, are summed and applied once per batch, so every
    update is the one plain `fit` makes on the whole batch (for losses reduced with
    the default `"sum_over_batch_size"`): sample and class weights, regularization
    (counted once), `optimizer.iterations`, learning-rate schedules, clipping, weight
    decay and mixed-precision loss scaling all behave as without accumulation. The
    logged loss and metrics are those of the whole batch. Peak activation memory is
    that of one micro-batch.

    BatchNormalization layers normalise with micro-batches, not the batch: the
    callback warns once when that happens. Their moving statistics move once per
    batch, with the pooled moments of all its micro-batches.

    With `micro_batch_size="auto"`, the size is planned at the first batch, before any
    update: the peak memory of a forward and backward pass is measured at a few small
    sizes (or taken from `memory_probe`), a line ``peak = a + b * m`` is fitted, and
    the largest ``m`` with ``a + b * m <= memory_margin * limit`` is used, where the
    limit is `memory_budget` or the device's memory. Where the limit is unknown (a
    CPU) and no budget is given, the batch is kept whole. If a step still runs out of
    memory (TensorFlow's `ResourceExhaustedError`, torch's `OutOfMemoryError`), the
    state it touched is restored, the micro-batch is halved and the *same* batch is
    redone: nothing is skipped or applied twice (an error during the optimizer's
    update itself is raised, as plain `fit` raises it). On JAX, where running out of
    memory cannot be undone in-process, "auto" measures with XLA's memory analysis of
    the compiled step (nothing runs) and checks its choice against those exact
    figures; an out-of-memory error is raised.

    If `fit` raises (a callback, the data, `KeyboardInterrupt`), the model is left as
    plain Keras leaves it: a later `fit` or `train_on_batch` without the callback
    trains on whole batches.

    With a keras_parallel DataParallel model over n devices, each micro-batch is
    itself split over the devices: a batch of B rows takes
    ``ceil(B / (n * micro_batch_size))`` accumulation steps. Under a
    `tf.distribute` strategy, `micro_batch_size` is per replica likewise. Under a
    `MultiWorkerMirroredStrategy` over several machines
    (`keras_parallel.multi_worker.strategy`, tf-keras), every worker runs the same
    size: `"auto"` takes the smallest of the workers' plans (one exchange, when it
    plans), and a step that runs out of memory on any worker is undone on every
    worker, which all redo the same batch with half the micro-batch; the "failed"
    count rides in the step's one gradient all-reduce (see the documentation's
    "Several machines" page).

    The chosen size is in the attribute `micro_batch_size_` after training starts,
    and in the epoch logs as `micro_batch_size`.

    Works with Keras 3 on the TensorFlow, JAX and torch backends and with tf-keras
    (the documentation's "Gradient accumulation" page says what differs per
    backend).

    Args:
        micro_batch_size: int or `"auto"`. Rows per device per micro-batch, or
            `"auto"` to plan it from memory.
        memory_budget: int or None. Bytes per device the `"auto"` plan may count on,
            in place of the device's memory (needed to plan on a CPU). Defaults to
            None.
        memory_margin: float in (0, 1]. Share of the limit the `"auto"` plan may use.
            Defaults to `0.8`.
        memory_probe: callable or None. ``memory_probe(micro_batch_size) -> int``:
            the peak bytes of one training step at that micro-batch size. None
            measures it with the backend's figures (TensorFlow's and torch's
            allocator peaks, XLA's memory analysis on JAX). Defaults to None.

    Raises:
        ValueError: for an invalid argument (at construction), and at the start of
            training, before any data is read, for a model compiled with
            `steps_per_execution > 1`, an optimizer that accumulates gradients
            itself (`gradient_accumulation_steps`), an uncompiled model, a
            `keras.distribution` on JAX, or a backend other than TensorFlow, JAX
            and torch.

    Example:

    ```python
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(
        x,
        y,
        batch_size=32,
        callbacks=[keras_parallel.callbacks.GradientAccumulation(micro_batch_size=4)],
    )
    ```
    """

    def __init__(
        self,
        micro_batch_size: int | str,
        memory_budget: int | None = None,
        memory_margin: float = 0.8,
        memory_probe: Callable[[int], int] | None = None,
    ):
        super().__init__()
        # Keras 3's `fit` fails under a multi-worker strategy before any callback is
        # called: made inside its scope, the callback says so now, before any data.
        multi_worker._check_scope_supported("GradientAccumulation")
        self.micro_batch_size = _validation.validate_micro_batch_size(micro_batch_size)
        self.memory_budget = _validation.validate_positive_number(
            memory_budget, "memory_budget", allow_none=True
        )
        self.memory_margin = _validation.validate_fraction(memory_margin, "memory_margin")
        self.memory_probe = _validation.validate_callable(
            memory_probe, "memory_probe", expected="a callable size -> peak bytes", allow_none=True
        )
        self.micro_batch_size_ = None
        self._installed = None
        self._cache = None
        self._supports_tf_logs = True  # tf-keras: its batch hooks need not convert logs
        if _backend.accumulation.SYNCHRONOUS_BATCH_END:
            # A batch-end hook of our own makes Keras call the batch-end callbacks in
            # the training thread (not a thread pool); see SYNCHRONOUS_BATCH_END.
            self.on_train_batch_end = self._on_train_batch_end

    # ------------------------------------------------------------------ train hooks
    def _validate_model(self, model) -> None:
        _backend.accumulation.check_supported()
        if own_steps(model, ("train_step",)):
            raise ValueError(
                f"GradientAccumulation cannot run the train_step that model "
                f"{model.name!r} (class {type(model).__name__}) defines: it trains with "
                "a step of its own (forward, `compute_loss`, backward per micro-batch), "
                "which would silently replace yours. Nothing was trained. Expected a "
                "model that uses Keras's train_step; an extra loss term can go in "
                "`compute_loss`, which the accumulated step calls. Received: "
                f"{type(model).__name__}.train_step"
            )
        if getattr(model, "optimizer", None) is None:
            raise ValueError(
                "GradientAccumulation needs a compiled model. Expected a model with an "
                "optimizer. Received: optimizer=None"
            )
        steps = _steps_per_execution(model)
        if steps != 1:
            raise ValueError(
                "Invalid value for argument `steps_per_execution` of `compile`. "
                "GradientAccumulation expects steps_per_execution=1. "
                f"Received: steps_per_execution={steps!r}"
            )
        accumulation = _accumulation_steps_of(model.optimizer)
        if accumulation:
            raise ValueError(
                "Invalid value for argument `gradient_accumulation_steps` of the "
                "optimizer. GradientAccumulation accumulates itself, so it expects "
                "gradient_accumulation_steps=None. "
                f"Received: gradient_accumulation_steps={accumulation!r}"
            )

    def on_train_begin(self, logs=None):
        # Ahead of the callbacks that read the logs (CSVLogger, ...), whatever the
        # order they were listed in: they then see `micro_batch_size`.
        move_to_front(self)
        model = self.model
        # Held for the batches: on JAX, Keras's `Callback.model` syncs the training
        # state into the variables each time it is read, which inside a train
        # function would hand the step buffers it is about to donate.
        self._fit_model = model
        if num_replicas(model) > 1:
            core = replicas(model)
            self._slicing = (list(core.ratios), list(core.placement))
        else:
            self._slicing = ([1.0], [])
        self._validate_model(model)
        accumulation = _backend.accumulation
        # The model's own train function (one left installed by a fit that raised is
        # taken off first).
        original = accumulation.own_train_function(model)
        # Reuse the train function (and its traced tf.function) of this instance's
        # last fit while the model and its compiled train function are the same.
        replicas_n = num_replicas(model)
        pool = _batch_norm_pool(model)
        key = (model, original, replicas_n, tuple(id(layer) for layer in pool.layers))
        cached_key, train_function = self._cache or ((None, None, None, None), None)
        if cached_key[0] is not model or cached_key[1] is not original or cached_key[2:] != key[2:]:
            train_function = accumulation.AccumulatingTrainFunction(
                model, self._run_batch, replicas_n, pool
            )
        self._cache = (key, train_function)
        self.micro_batch_size_ = None if self.micro_batch_size == _AUTO else self.micro_batch_size
        self._warned_batch_normalization = False
        self._first_rows = None  # rows per device of the fit's first (full) batch
        self._budgets = None  # {device: budget} "auto" planned for, until the first step
        self._has_batch_normalization = _has_batch_normalization(model)
        self._batch_norm_per_slice = (
            num_replicas(model) > 1 and replicas(model).batch_norm == "per_slice"
        )
        self._installed = train_function
        # Until on_train_end, or, if this fit raises, until the next call of the
        # model's train function that no batch of this fit armed.
        train_function.install(original)

    def on_train_batch_begin(self, batch, logs=None):
        if self._installed is not None:
            self._installed.arm()

    def _on_train_batch_end(self, batch, logs=None):
        """Nothing to do: its presence keeps Keras's batch-end callbacks synchronous."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.micro_batch_size_ is not None:
            # The size in use: never more than a full batch's rows per device.
            logs["micro_batch_size"] = min(
                self.micro_batch_size_, self._first_rows or self.micro_batch_size_
            )

    def on_train_end(self, logs=None):
        if self._installed is not None:
            self._installed.uninstall()
        self._installed = None
        self._fit_model = None

    # ------------------------------------------------------------------- policy
    def _run_batch(self, train_function, data):
        """Runs one batch with the train function's mechanisms: the size, and the retries.

        The micro-batch size comes from `_micro_batch_size_for`. With `"auto"`, a step
        that runs out of memory before its update began is undone (the state it
        touched restored) and the same batch redone with half the micro-batch; a
        fixed size, a micro-batch of 1, or an error during the update is raised.
        On several workers (`joint_retries`) the step raises on every worker when
        any ran out, and every worker, running the same size, decides alike.
        """
        rows = train_function.local_batch_rows(data)
        micro = self._micro_batch_size_for(data, rows, train_function)
        if self._budgets:
            budgets, self._budgets = self._budgets, None
            with _PeakCheck(budgets, state_bytes(self._fit_model), micro):
                return self._run_sized_batch(train_function, data, micro)
        return self._run_sized_batch(train_function, data, micro)

    def _run_sized_batch(self, train_function, data, micro: int):
        out_of_memory = _backend.accumulation.OUT_OF_MEMORY_ERRORS
        retries = self.micro_batch_size == _AUTO and train_function.retries_are_safe
        while True:
            saved = train_function.snapshot_state() if retries else None
            try:
                return train_function.step(data, micro)
            except out_of_memory:
                if saved is None or micro <= 1 or train_function.update_began():
                    raise
            # Restored outside the `except` block: there the error's traceback still
            # holds the failed step's tensors (and their memory).
            train_function.restore_state(saved)
            micro = self._on_out_of_memory(micro, max(1, micro // 2))

    def _micro_batch_size_for(self, data, rows: int, train_function) -> int:
        """The micro-batch size (per device) for a batch with `rows` rows on the first replica."""
        replicas_n = train_function.num_replicas
        rows_per_device = -(-rows // replicas_n) if rows else 0
        if self.micro_batch_size_ is None:
            planned = self._plan(data, max(1, rows_per_device), train_function)
            # Several workers (MultiWorkerMirroredStrategy) run the smallest plan.
            self.micro_batch_size_ = train_function.agree_on_size(planned)
        micro = self.micro_batch_size_
        first = self._first_rows is None  # the first batch of the fit: a full one
        if first and micro > rows_per_device > 0:
            warn(
                f"GradientAccumulation(micro_batch_size={micro}) is larger than the batch's "
                f"{rows_per_device} rows per device: each batch runs in one step, without "
                "accumulation (the logs record the micro-batch size in use). Pass a "
                "micro_batch_size below the rows per device to accumulate."
            )
        ratios, placement = self._slicing
        if first:
            self._first_rows = rows_per_device
            step_rows = slice_sizes(min(rows, replicas_n * micro), ratios)
            if replicas_n > 1 and 0 in step_rows and max(step_rows) >= 2:
                idle = [d for d, r in zip(placement, step_rows, strict=True) if r == 0]
                warn(
                    f"GradientAccumulation: micro-batches of {micro} rows per device are "
                    f"cut {' + '.join(map(str, step_rows))} by the ratios {ratios}, so "
                    f"{', '.join(idle)} gets no rows and waits in every micro step. "
                    f"{fewest_rows_note(ratios, rows)}"
                )
        if (
            self._has_batch_normalization
            and not self._warned_batch_normalization
            and micro < rows_per_device
        ):
            self._warned_batch_normalization = True
            if self._batch_norm_per_slice:
                step_rows = slice_sizes(min(rows, replicas_n * micro), ratios)
                whole = " + ".join(map(str, slice_sizes(rows, ratios)))
                seen = (
                    f"{' + '.join(map(str, step_rows))} rows (one per device) instead of "
                    f"the batch's {whole}"
                )
            else:
                seen = f"{micro * replicas_n} rows instead of batches of {rows}"
            warn(
                "The model has BatchNormalization layers, and GradientAccumulation "
                f"feeds them micro-batches of {seen}: their statistics are per "
                "micro-batch (their moving statistics still move once per batch, with "
                "the whole batch's moments). See the 'BatchNormalization' section of "
                "the gradient accumulation docs for remedies (e.g. GroupNormalization, "
                "or larger micro-batches)."
            )
        return micro

    def _plan(self, data, rows_per_device: int, train_function) -> int:
        """Plans the "auto" micro-batch size (per device) before the first update.

        The planner and the memory model are `keras_parallel.plan()`'s: per-device
        limits (each device of a DataParallel model), the template's forward and
        backward pass measured on the first device at a few row counts (the step's
        own memory) plus the model's weights and optimizer state (`state_bytes`),
        a line through them (`plan_auto`), and, where asking costs nothing (JAX),
        exact figures for the size chosen. So the same model, devices and budget
        give the micro-batch size `plan()` printed. Under a distribution strategy
        of several replicas (or workers), or with `memory_probe`, the train
        function's own probe of the real batch is used instead.
        """
        replicas_n = train_function.num_replicas
        template = unwrap(self._fit_model)
        if template is not self._fit_model:
            core = replicas(self._fit_model)
            ratios, devices = list(core.ratios), list(core.placement)
            device = devices[0]
        else:
            ratios, devices = [1.0], [train_function.measured_device()]
            device = train_function.plain_device()
        if self.memory_budget is not None:
            limits = [self.memory_budget] * len(devices)
        else:
            limits = [device_memory_limit(d) for d in devices]
        if any(limit is None for limit in limits):
            return rows_per_device  # no known limit (a CPU): keep the batch whole
        self._budgets = dict(zip(devices, limits, strict=True))
        exact = False
        if self.memory_probe is None and device is not None:
            # plan()'s probe: rows on one device -> the step's memory plus the state.
            probe = with_state(remembered_probe(template, device), state_bytes(self._fit_model))
            measure = rows_measure(probe)
            exact = _backend.accumulation.PROBE_RUNS_NOTHING
        else:
            probe = self.memory_probe
            if probe is None:  # the step's own memory plus the state, as plan() counts
                probe = with_state(train_function.make_probe(data), state_bytes(self._fit_model))

            def measure(size):
                # The probe runs `replicas_n * size` rows; the measured (first) device
                # computes its slice of them.
                return max(1, slice_sizes(replicas_n * size, ratios)[0]), probe(size)

        if probe is None:
            _warn_cannot_measure(devices[0])
            return rows_per_device

        unmeasured = []

        def measured(size):
            point = measure(size)
            if point is None or point[1] is None:
                unmeasured.append(size)
                return None
            return point

        auto = plan_auto(
            rows_per_device * replicas_n,
            ratios,
            limits,
            measured,
            self.memory_margin,
            out_of_memory=_backend.accumulation.OUT_OF_MEMORY_ERRORS,
            exact=exact,
        )
        if unmeasured:  # no statistics on this device, as plan() finds
            _warn_cannot_measure(devices[0])
            return rows_per_device
        if not auto.points:  # the smallest size measured ran out of memory
            return 1
        return min(rows_per_device, auto.micro_batch_size)

    def _on_out_of_memory(self, old: int, new: int) -> int:
        warn(
            f"GradientAccumulation: out of memory with micro-batches of {old} rows "
            f"per device; redoing the same batch with {new}."
        )
        self.micro_batch_size_ = new
        return new


def _warn_cannot_measure(device: str) -> None:
    warn(
        'GradientAccumulation(micro_batch_size="auto") cannot measure memory on '
        f"{device} ({_backend.accumulation.NO_PROBE_REASON}). It keeps the batch whole, "
        "as plan() does without figures, and halves it only on out-of-memory errors. "
        "To plan, make the figures available or pass memory_probe=(a function "
        "micro_batch_size -> peak bytes), or give micro_batch_size as an int "
        "(troubleshooting: '\"auto\" cannot measure memory')."
    )


class _PeakCheck:
    """Around the first step "auto" planned: its measured peak against the budgets.

    Where the allocator keeps statistics, each allocator's peak during the step,
    less what it held before, plus the model's state (the memory model of
    `plan()`), is compared with the budget of the devices it serves (their sum,
    for logical devices sharing one allocator); over it, one warning names the
    devices, the figure and the budget.
    """

    def __init__(self, budgets: dict, state: int, micro: int):
        self.budgets, self.state, self.micro = budgets, state, micro
        self.before: dict[str, tuple[list[str], int]] = {}

    def __enter__(self):
        self.source = source = default_source()
        for device in self.budgets:
            allocator = source.allocator(device)
            if allocator in self.before:
                self.before[allocator][0].append(device)
                continue
            try:
                if not source.reset_peak(device):
                    continue
                self.before[allocator] = ([device], source.read(device).current_bytes)
            except Exception:  # no statistics here: nothing to check
                continue
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            return False
        source = self.source
        for devices, before in self.before.values():
            try:
                peak = source.read(devices[0]).peak_bytes
            except Exception:
                continue
            figure = peak - before + self.state
            budget = sum(self.budgets[d] for d in devices)
            if figure > budget:
                warn(
                    f"GradientAccumulation: the first step with micro-batches of {self.micro} "
                    f"rows per device peaked at {figure / 2**20:,.1f} MiB on "
                    f"{', '.join(devices)} (the step's memory above what was there before, "
                    f"plus the model's state), over the budget of {budget / 2**20:,.1f} MiB "
                    "the plan fitted. Lower `memory_budget` or `memory_margin`, or give a "
                    "smaller micro_batch_size (troubleshooting: 'a step over the budget')."
                )
        return False
