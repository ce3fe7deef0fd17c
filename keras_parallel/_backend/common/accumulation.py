"""What every backend's accumulating train function shares, and the refusals for the rest.

`TrainFunctionSwitch` is the life cycle of an accumulating `model.train_function`
for one `fit`, the same on every backend: `install` puts it in
`model.train_function`, `arm` (before each batch of that fit) lets it run one
step, `uninstall` puts the model's own train function back. A call it was not
armed for, or made after another `fit` began, comes from outside the fit that
installed it (that fit raised before its `on_train_end`): it uninstalls itself and
hands the call to the model's own train function, so the model trains as plain
Keras would. Each backend subclasses it with its step, its state snapshot and
its probe (`_backend/<name>/accumulation.py`).

For a backend with no accumulation of its own, `check_supported` refuses with a
clear error, and the other names refuse too.
"""

from __future__ import annotations

from keras_parallel._compat import backend_name

__all__ = [
    "AccumulatingTrainFunction",
    "BatchNormPool",
    "OUT_OF_MEMORY_ERRORS",
    "TrainFunctionSwitch",
    "check_supported",
    "own_train_function",
    "state_variables",
]

#: Errors a step raises when the device runs out of memory: none known here.
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = ()

#: Whether Keras must call the batch-end callbacks in the training thread.
SYNCHRONOUS_BATCH_END = False

#: Whether asking the probe costs no device memory (no probe here).
PROBE_RUNS_NOTHING = False

#: Why `make_probe` may give no figure.
NO_PROBE_REASON = "no memory statistics on this backend"


def check_supported(backend: str | None = None) -> None:
    """Raises ValueError: no gradient accumulation on this backend."""
    backend = backend or backend_name()
    raise ValueError(
        "GradientAccumulation supports the TensorFlow, JAX and torch backends. Expected "
        'KERAS_BACKEND="tensorflow", "jax" or "torch". '
        f"Received: backend={backend!r}"
    )


def state_variables(model) -> list:
    """Variables a failed step may have changed: non-trainable (BN, seeds), metrics, counters.

    The trainable variables and the optimizer's slots are not among them: a step
    changes those only in its update, and a step that failed there is not retried.
    """
    variables = list(model.non_trainable_variables)
    for metric in model.metrics:
        variables.extend(metric.variables)
    counter = getattr(model, "_train_counter", None)  # tf-keras
    if counter is not None:
        variables.append(counter)
    iterations = getattr(model.optimizer, "iterations", None)
    if iterations is not None:  # a scalar: cheap insurance against a double count
        variables.append(iterations)
    unique, seen = [], set()
    for variable in variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            unique.append(variable)
    return unique


def loss_tracker(model):
    """Keras 3's loss tracker: the "loss" Mean its `train_step` updates (None if absent)."""
    for metric in model.metrics:
        if metric.name == "loss":
            return metric
    return None


class BatchNormPool:
    """Moves BatchNormalization moving statistics once per accumulated batch.

    Under accumulation each micro step's BatchNormalization layers normalise
    with the micro-batch's moments and would move their moving statistics once
    per micro step. With this pool they move once per batch, with the pooled
    moments of all its micro-batches (the mean and biased variance of the whole
    batch's inputs to the layer), as one step on the whole batch would.

    How it reads a micro-batch's moments from the layer's own update: before
    each micro step the moving statistics are set to 0, so the step leaves
    ``(1 - momentum) * moment`` in them (one rounding, no subtraction). Each
    micro step's (rows, mean, variance) is merged into the running pool by
    Chan's pairwise rule (exact, also when |mean| >> std). After the last micro
    step the moving statistics are set from the values saved at the start:
    ``moving * momentum + pooled * (1 - momentum)``. tf-keras's fused layers
    keep the unbiased variance: it is unbiased per micro-batch on the way in,
    and for the whole batch on the way out, as TensorFlow's kernel does.

    Backend-neutral: it works on the values (tensors of any backend, through
    their arithmetic operators); each backend's accumulating step calls
    `zeros`, `merge` and `finish` around its micro steps.

    Args:
        layers: the BatchNormalization layers to pool: ones whose statistics
            move exactly once per micro step (a trainable layer, not `renorm`).
        unbiased_rows: per layer, None, or for a layer that keeps the unbiased
            variance (tf-keras fused), the values per row and channel
            (``N = rows * unbiased_rows``).
    """

    def __init__(self, layers, unbiased_rows=None):
        self.layers = list(layers)
        self.unbiased_rows = list(unbiased_rows or [None] * len(self.layers))
        self.variables = [
            v for layer in self.layers for v in (layer.moving_mean, layer.moving_variance)
        ]

    def __bool__(self) -> bool:
        return bool(self.layers)

    @staticmethod
    def zeros(values):
        """The moving statistics' values to set before a micro step."""
        return [value * 0 for value in values]

    def start(self, values, zero=0.0):
        """The pool at the start of a batch: (the saved values, no rows yet).

        `zero` is the count's 0 in the backend's type (a scalar tensor where the
        pool is carried through a compiled loop).
        """
        values = list(values)
        return (values, [(zero, m * 0, m * 0) for m in values[::2]])

    def merge(self, pool, values, rows):
        """The pool with one micro step merged: `values` read after it, `rows` its rows."""
        saved, moments = pool
        merged = []
        for i, layer in enumerate(self.layers):
            keep = 1.0 - float(layer.momentum)
            mean, variance = values[2 * i] / keep, values[2 * i + 1] / keep
            if self.unbiased_rows[i] is not None:
                n = rows * self.unbiased_rows[i]
                variance = variance * ((n - 1) / n)
            count, old_mean, m2 = moments[i]
            total = count + rows
            delta = mean - old_mean
            merged.append(
                (
                    total,
                    old_mean + delta * (rows / total),
                    m2 + variance * rows + delta * delta * (count * rows / total),
                )
            )
        return (saved, merged)

    def finish(self, pool):
        """The moving statistics' values after the batch (at least one micro step with rows)."""
        saved, moments = pool
        values = []
        for i, layer in enumerate(self.layers):
            momentum = float(layer.momentum)
            count, mean, m2 = moments[i]
            variance = m2 / count
            if self.unbiased_rows[i] is not None:
                n = count * self.unbiased_rows[i]
                variance = variance * (n / (n - 1))  # n >= 2 but for 1 row of 1 value
            for old, value in ((saved[2 * i], mean), (saved[2 * i + 1], variance)):
                values.append(old * momentum + value * (1.0 - momentum))
        return values


class TrainFunctionSwitch:
    """Installs itself as `model.train_function` for one `fit`, and steps aside outside it.

    The base of every backend's accumulating train function. Subclasses define
    `__call__` with their backend's train-function signature: it calls
    `armed_for_this_fit()` first and, when that is False, returns
    `call_own_train_function(*args)`; else it hands the fetched batch to
    ``run_batch(self, data)``.

    Args:
        model: the compiled Keras model.
        run_batch: callable ``run_batch(function, data) -> logs``. Runs one fetched
            batch `data` with the function's mechanisms (`step`, `snapshot_state`,
            `restore_state`, `update_began`, `make_probe`) and returns the step's
            logs: the policy of the caller (`GradientAccumulation`).
        num_replicas: int. Devices the model itself splits each micro-batch over
            (a keras_parallel DataParallel model): rows per micro step are
            ``num_replicas * micro_batch_size``.
        batch_norm_pool: `BatchNormPool` or None. The BatchNormalization layers
            whose moving statistics move once per batch, with pooled moments.
    """

    def __init__(self, model, run_batch=None, num_replicas=1, batch_norm_pool=None):
        self.model = model
        self._run_batch = run_batch
        self.num_replicas = num_replicas
        #: `BatchNormPool` of the layers whose statistics move once per batch (or None).
        self.batch_norm_pool = batch_norm_pool or None
        self.original = None  # the model's own train function, while installed
        self._history = None  # model.history of the fit that installed this function
        self._armed = False

    #: Whether a step that ran out of memory before its update may be undone and
    #: redone (the backend can recover in-process, and no other worker waits on it).
    retries_are_safe = True

    def agree_on_size(self, size: int) -> int:
        """The micro-batch size every worker runs: `size` itself with one worker."""
        return size

    def plain_device(self) -> str | None:
        """The one device the step runs on, without a distribution of several
        replicas; None under one (then "auto" probes the real step instead)."""
        return self.measured_device()

    def build_optimizer(self) -> None:
        """Builds the optimizer's slots now, if they are not yet.

        Built lazily inside a step that then runs out of memory, they would be
        left half made (Keras 3: uninitialized, shape [0]) for the retry.
        """
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)

    def install(self, original) -> None:
        """Becomes `model.train_function` for the `fit` now beginning; `original` is the model's."""
        self.original = original
        self._history = getattr(self.model, "history", None)
        self._armed = False
        self.model.train_function = self

    def arm(self) -> None:
        """Lets the next call run one accumulating step (called before each batch of the fit)."""
        self._armed = True

    def uninstall(self) -> None:
        """Puts the model's own train function back, if this one is still installed."""
        if self.model.train_function is self:
            self.model.train_function = self.original
        self.original = None
        self._history = None
        self._armed = False

    def _another_fit_began(self) -> bool:
        # Each fit gives the model a new History and starts it (`on_train_begin` sets
        # `epoch`) before its first step. tf-keras' evaluate and predict also set a
        # new History, which is never started: those calls, made by callbacks within
        # the fit, are not a new fit.
        history = getattr(self.model, "history", None)
        return history is not self._history and hasattr(history, "epoch")

    def armed_for_this_fit(self) -> bool:
        """Whether this call comes from a batch of the fit that installed this function.

        Disarms: each arming allows one call.
        """
        armed, self._armed = self._armed, False
        return armed and not self._another_fit_began()

    def call_own_train_function(self, *args):
        """Uninstalls this function and runs the model's own train function instead."""
        self.uninstall()
        train_function = self.model.train_function
        if train_function is None:
            self.model.make_train_function()
            train_function = self.model.train_function
        return train_function(*args)


def own_train_function(model, switch_type: type = TrainFunctionSwitch):
    """`model.train_function`, with an accumulating one left by a `fit` that raised taken off."""
    function = model.train_function
    if isinstance(function, switch_type):
        function.uninstall()
        function = model.train_function
    return function


class AccumulatingTrainFunction:
    """Refuses: no accumulating train function on this backend."""

    def __init__(self, model, run_batch, num_replicas=1):
        check_supported()
