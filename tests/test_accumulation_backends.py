"""GradientAccumulation on every backend: the update plain `fit` makes on the whole batch.

Backend-neutral (runs in every flavour of `tests/run_flavours.py`; imports no
TensorFlow, JAX or torch of its own at module level). The TensorFlow-specific
mechanics (the traced loop, allocator probes, strategies) are in
test_gradient_accumulation.py; this file holds what a user of any backend relies
on: equality with plain training (optimizers, schedules, clipping, weights,
mixed precision, DataParallel), the logs, `"auto"` planning, the out-of-memory
retry where the backend can recover (torch), and a fit that raises.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from helpers import assert_weights_close
from test_backends import _parallel

from keras_parallel._compat import IS_KERAS_3, backend_name, keras
from keras_parallel.callbacks import GradientAccumulation

N_SAMPLES = 38  # batch 16: batches of 16, 16 and a partial 6
RNG = np.random.default_rng(0)
X = RNG.normal(size=(N_SAMPLES, 5)).astype("float32")
Y = RNG.integers(0, 3, size=(N_SAMPLES,))
SW = RNG.uniform(0.2, 3.0, size=(N_SAMPLES,)).astype("float32")


def _model(seed=0, batch_norm=False, extra=None, width=8):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((5,))]
    if extra is not None:
        layers.append(extra)
    layers.append(
        keras.layers.Dense(width, activation="tanh", kernel_regularizer=keras.regularizers.l2(0.01))
    )
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def _optimizer(name):
    opt = keras.optimizers
    schedule = opt.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)
    return {
        "sgd": lambda: opt.SGD(0.1),
        "adam_schedule": lambda: opt.Adam(schedule),
        "adamw_clipnorm": lambda: opt.AdamW(0.01, weight_decay=0.1, clipnorm=0.05),
    }[name]()


def _train(model, optimizer, callbacks, batch_size=16, epochs=2, sample_weight=True):
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
    )
    history = model.fit(
        X,
        Y,
        sample_weight=SW if sample_weight else None,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    return history.history


def _iterations(model):
    return int(np.asarray(model.optimizer.iterations.numpy()))


@pytest.mark.parametrize(
    "name, micro",
    [("sgd", 1), ("sgd", 16), ("adam_schedule", 5), ("adamw_clipnorm", 1), ("adamw_clipnorm", 5)],
)
def test_updates_and_logs_equal_plain_fit_on_the_whole_batch(name, micro):
    plain = _model()
    expected_logs = _train(plain, _optimizer(name), [])
    accumulated = _model()
    logs = _train(accumulated, _optimizer(name), [GradientAccumulation(micro)])

    assert_weights_close(accumulated.get_weights(), plain.get_weights())
    assert _iterations(accumulated) == _iterations(plain) == 6  # one update per batch
    for key in ("loss", "sparse_categorical_accuracy"):
        np.testing.assert_allclose(logs[key], expected_logs[key], rtol=1e-5)
    assert logs["micro_batch_size"] == [micro, micro]


@pytest.mark.skipif(not IS_KERAS_3, reason="Keras 3's dtype policies and loss scaling")
def test_mixed_precision_with_loss_scaling_equals_plain_fit():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        plain = _model()
        _train(plain, keras.optimizers.SGD(0.1), [], sample_weight=False)
        accumulated = _model()
        _train(
            accumulated, keras.optimizers.SGD(0.1), [GradientAccumulation(4)], sample_weight=False
        )
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert type(plain.optimizer).__name__ == "LossScaleOptimizer"
    # float16 activations: the sums of 4 micro-batches round differently from the
    # sum over the batch, at float16's resolution (~1e-3 relative).
    assert_weights_close(accumulated.get_weights(), plain.get_weights(), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("count, split", [(2, None), (3, [3, 1, 1])])
def test_data_parallel_with_accumulation_equals_the_plain_template(count, split):
    plain = _model()
    initial = plain.get_weights()
    _train(plain, keras.optimizers.SGD(0.1), [])

    template = _model()
    template.set_weights(initial)
    parallel = _parallel(template, count, split)
    logs = _train(parallel, keras.optimizers.SGD(0.1), [GradientAccumulation(2)])
    assert_weights_close(template.get_weights(), plain.get_weights())
    assert logs["micro_batch_size"] == [2, 2]


def test_auto_on_a_cpu_without_a_budget_keeps_the_batch_whole():
    model = _model()
    callback = GradientAccumulation("auto")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _train(model, keras.optimizers.SGD(0.1), [callback], epochs=1)
    assert callback.micro_batch_size_ == 16


def test_auto_plans_from_a_probe_and_budget_and_trains_like_plain_fit():
    # peak = 1000 + 100 * rows: a budget of 1500 bytes at margin 1.0 allows 5 rows.
    asked = []

    def probe(size):
        asked.append(size)
        return 1000 + 100 * size

    plain = _model()
    _train(plain, keras.optimizers.SGD(0.1), [])
    model = _model()
    callback = GradientAccumulation(
        "auto", memory_budget=1500, memory_margin=1.0, memory_probe=probe
    )
    logs = _train(model, keras.optimizers.SGD(0.1), [callback])
    assert callback.micro_batch_size_ == 5
    assert logs["micro_batch_size"] == [5, 5]
    assert asked, "the probe was never asked"
    assert_weights_close(model.get_weights(), plain.get_weights())


@pytest.mark.skipif(backend_name() != "jax", reason="XLA's memory analysis of the step: JAX")
def test_jax_auto_plans_from_the_compiled_step_without_running_out():
    from keras_parallel import _backend

    # 512 activations a row: memory grows with the rows well above XLA's
    # layout noise at a few rows (a few hundred bytes).

    model = _model(width=512)
    _train(model, keras.optimizers.SGD(0.1), [], epochs=1)  # builds the state
    function = _backend.accumulation.AccumulatingTrainFunction(model, None)
    function._state = tuple(  # the state `fit` hands a train function
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    probe = function.make_probe((X[:16], Y[:16], SW[:16]))  # a batch as fit gives it
    small, large = probe(2), probe(64)
    assert 0 < small < large

    # A budget that one micro-batch of 6 rows fills: "auto" picks one that fits it.
    budget = probe(6)
    plain = _model(width=512)
    _train(plain, keras.optimizers.SGD(0.1), [])
    accumulated = _model(width=512)
    callback = GradientAccumulation("auto", memory_budget=budget, memory_margin=1.0)
    _train(accumulated, keras.optimizers.SGD(0.1), [callback])
    assert 1 <= callback.micro_batch_size_ < 16
    assert probe(callback.micro_batch_size_) <= budget
    assert_weights_close(accumulated.get_weights(), plain.get_weights())


@pytest.mark.skipif(backend_name() != "torch", reason="torch's out-of-memory error")
def test_torch_out_of_memory_is_recovered_with_nothing_lost_or_applied_twice():
    import torch

    class OutOfMemoryAbove(keras.layers.Layer):
        """Identity that raises torch's real out-of-memory error above `limit` rows."""

        def __init__(self, limit, **kwargs):
            super().__init__(**kwargs)
            self.limit = limit

        def call(self, x):
            if x.device.type != "meta" and x.shape[0] > self.limit:  # not Keras's shape pass
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return x

    plain = _model()
    _train(plain, keras.optimizers.Adam(0.01), [])
    model = _model(extra=OutOfMemoryAbove(limit=6))
    # The probe says everything fits: the first step runs the whole batch and fails.
    callback = GradientAccumulation("auto", memory_budget=10**9, memory_probe=lambda size: size)
    with pytest.warns(UserWarning, match="out of memory with micro-batches of 16"):
        logs = _train(model, keras.optimizers.Adam(0.01), [callback])
    assert callback.micro_batch_size_ == 4  # 16 -> 8 -> 4
    assert logs["micro_batch_size"] == [4, 4]
    assert _iterations(model) == 6
    assert_weights_close(model.get_weights(), plain.get_weights())


def test_a_fixed_micro_batch_that_runs_out_of_memory_is_raised_and_nothing_applied():
    if backend_name() != "torch":
        pytest.skip("an injected out-of-memory error that the backend raises eagerly: torch")
    import torch

    class Fails(keras.layers.Layer):
        def call(self, x):
            if x.device.type != "meta":  # not Keras's shape pass
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return x

    model = _model(extra=Fails())
    before = model.get_weights()
    with pytest.raises(torch.OutOfMemoryError):
        _train(model, keras.optimizers.SGD(0.1), [GradientAccumulation(4)])
    assert_weights_close(model.get_weights(), before, rtol=0, atol=0)


def test_a_fit_that_raises_leaves_the_model_training_plainly():
    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt

    model = _model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    with pytest.raises(KeyboardInterrupt):
        model.fit(
            X,
            np.zeros((N_SAMPLES, 3), "float32"),
            batch_size=16,
            verbose=0,
            callbacks=[GradientAccumulation(4), Stop()],
        )
    before = _iterations(model)
    history = model.fit(X, np.zeros((N_SAMPLES, 3), "float32"), batch_size=16, verbose=0)
    assert type(model.train_function).__name__ != "AccumulatingTrainFunction"
    assert "micro_batch_size" not in history.history
    assert _iterations(model) == before + 3  # whole batches, one update each


def test_batch_normalization_is_warned_about_once():
    model = _model(batch_norm=True)
    with pytest.warns(UserWarning, match="BatchNormalization") as caught:
        _train(model, keras.optimizers.SGD(0.1), [GradientAccumulation(4)])
    assert sum("BatchNormalization" in str(w.message) for w in caught) == 1


def test_an_optimizer_that_accumulates_itself_is_refused_before_training():
    if not IS_KERAS_3:
        pytest.skip("Keras 3's gradient_accumulation_steps")
    model = _model()
    before = model.get_weights()
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        _train(
            model,
            keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
            [GradientAccumulation(4)],
        )
    assert_weights_close(model.get_weights(), before, rtol=0, atol=0)


@pytest.mark.skipif(backend_name() != "jax", reason="Keras's asynchronous callbacks on JAX")
def test_jax_batch_end_callbacks_run_in_the_training_thread():
    # Keras converts logs in a thread pool on JAX; with the accumulating step over
    # several host devices that race hung XLA's CPU runtime, so the callback keeps
    # the batch-end callbacks in the training thread.
    in_main_thread = []

    class Recorder(keras.callbacks.Callback):
        async_safe = True  # leaves the choice to the other callbacks

        def on_train_batch_end(self, batch, logs=None):
            in_main_thread.append(threading.current_thread() is threading.main_thread())

    _train(_model(), keras.optimizers.SGD(0.1), [GradientAccumulation(4), Recorder()], epochs=1)
    assert in_main_thread and all(in_main_thread)


def _adam_model(**compile_kwargs):
    model = _model()
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    return model


def _fit_all(model, callbacks, epochs):
    model.fit(
        X,
        Y,
        sample_weight=SW,
        batch_size=16,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def test_run_eagerly_equals_plain_fit():
    # Nothing compiled (no tf.function, no jax.jit): the same update.
    models = []
    for callbacks in ([], [GradientAccumulation(5)]):
        model = _adam_model(run_eagerly=True)
        _fit_all(model, callbacks, epochs=1)
        models.append(model)
    assert_weights_close(models[1].get_weights(), models[0].get_weights())


@pytest.mark.skipif(backend_name() != "jax", reason="XLA compilations of the jitted step: JAX")
def test_jax_compiles_no_more_programs_than_plain_fit():
    # One program per batch: the micro-batches, the last shorter one and the update
    # compiled together, once per batch shape (here 16 and the last 6), as plain
    # fit's train step. Separate programs for them (several dispatches a batch)
    # compile more.
    import jax

    monitoring = jax.monitoring
    if not hasattr(monitoring, "unregister_event_duration_listener"):
        pytest.skip("jax.monitoring cannot unregister a listener in this JAX")
    compiled = []

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    counts = []
    monitoring.register_event_duration_secs_listener(listener)
    try:
        for callbacks in ([], [GradientAccumulation(5)]):
            model = _adam_model(metrics=["sparse_categorical_accuracy"])
            # A first fit: what Keras compiles once per model (building the optimizer).
            model.fit(X[:2], Y[:2], batch_size=2, verbose=0, callbacks=callbacks)
            del compiled[:]
            _fit_all(model, callbacks, epochs=2)
            counts.append(len(compiled))
    finally:
        monitoring.unregister_event_duration_listener(listener)
    plain, accumulated = counts
    assert 1 <= accumulated <= plain, counts


@pytest.mark.parametrize(
    "micro, split",
    [(2, None), (3, None), (2, [2, 1, 1])],
    ids=["micro-divides", "micro-ragged", "data-parallel-2-1-1"],
)
def test_jax_accumulation_under_a_data_parallel_distribution_equals_plain_fit(
    jax_data_parallel_distribution, micro, split
):
    # Batches of 12 rows over 3 devices: 4 a device, taken 2 (or 3, then 1) at a
    # time from every device; with DataParallel over the 3 devices, 2:1:1.
    x, y = X[:36], Y[:36]

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
        )

    def fit(model, callbacks):
        model.compile(
            keras.optimizers.SGD(0.1),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(
            x, y, batch_size=12, epochs=2, shuffle=False, verbose=0, callbacks=callbacks
        )
        return history.history

    keras.distribution.set_distribution(None)
    plain = model()
    initial = plain.get_weights()
    expected = fit(plain, [])
    keras.distribution.set_distribution(jax_data_parallel_distribution)

    template = model()
    template.set_weights(initial)
    model = template if split is None else _parallel(template, 3, split)
    logs = fit(model, [GradientAccumulation(micro)])
    assert_weights_close(template.get_weights(), plain.get_weights())
    np.testing.assert_allclose(logs["loss"], expected["loss"], rtol=1e-5)
    assert logs["micro_batch_size"] == [micro, micro]


def test_jax_data_parallel_over_some_mesh_devices_is_refused_before_data(
    jax_data_parallel_distribution,
):
    class Unread(keras.utils.PyDataset):
        """A dataset whose batches must not be read (the error comes first)."""

        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise AssertionError("a batch was read before the error")

    template = _model()
    parallel = _parallel(template, 2)  # 2 of the mesh's 3 devices
    parallel.compile(keras.optimizers.SGD(0.1), "mse")
    with pytest.raises(ValueError, match="must use every device this process has"):
        parallel.fit(Unread(), epochs=1, verbose=0)


def test_jax_a_distribution_other_than_data_parallel_is_refused():
    if backend_name() != "jax":
        pytest.skip("keras.distribution lays out a jitted step: JAX")
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, len(devices)), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map))
    try:
        model = _model()
        with pytest.raises(ValueError, match="Received: ModelParallel"):
            _train(model, keras.optimizers.SGD(0.1), [GradientAccumulation(2)])
    finally:
        keras.distribution.set_distribution(None)


def test_a_micro_batch_that_leaves_a_device_without_rows_is_named():
    template = _model()
    parallel = _parallel(template, 2, [2, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(parallel, keras.optimizers.SGD(0.1), [GradientAccumulation(1)], epochs=1)
    idle = [str(w.message) for w in caught if "gets no rows" in str(w.message)]
    assert len(idle) == 1
    assert "cut 2 + 0 by the ratios [2.0, 1.0]" in idle[0]
    assert "micro_batch_size=2 is the smallest that gives every device rows (3 + 1)" in idle[0]


def test_a_first_step_over_the_budget_is_named_with_both_figures(monkeypatch):
    from keras_parallel.callbacks import gradient_accumulation as module
    from keras_parallel.memory import MemoryReading, MemorySource

    class Source(MemorySource):
        """An allocator whose step peaks 3 MiB above what it held."""

        def __init__(self):
            self.reset = False

        def reset_peak(self, device):
            self.reset = True
            return True

        def read(self, device):
            return MemoryReading(50 * 2**20, (53 if self.reset else 50) * 2**20, None)

    monkeypatch.setattr(module, "default_source", Source)

    def probe(size):  # the plan: 1 MiB a row on a 16 MiB budget
        return size * 2**20

    def run(budget):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callback = GradientAccumulation(
                "auto", memory_budget=budget, memory_margin=1.0, memory_probe=probe
            )
            _train(_model(), keras.optimizers.SGD(0.1), [callback], epochs=1)
        return [str(w.message) for w in caught if "over the budget" in str(w.message)]

    over = run(2 * 2**20)  # 3 MiB (+ the model's state) over a 2 MiB budget
    assert len(over) == 1
    assert "peaked at 3.0 MiB" in over[0] and "budget of 2.0 MiB" in over[0]
    assert run(16 * 2**20) == []


@pytest.mark.parametrize("csv_first", [True, False], ids=["csv_first", "csv_last"])
def test_log_keys_reach_a_csv_logger_listed_in_any_order(tmp_path, csv_first):
    """GradientAccumulation and GPUMemoryLogger move to the front of fit's callbacks,
    so a CSVLogger listed before them still gets their columns (on every flavour:
    this fails by name when Keras changes how it calls the callbacks)."""
    from keras_parallel.callbacks import GPUMemoryLogger
    from keras_parallel.callbacks._order import move_to_front
    from keras_parallel.memory import MIB, MemoryReading, MemorySource

    class OneFakeGPU(MemorySource):
        def devices(self):
            return ["/device:GPU:0"]

        def read(self, device):
            return MemoryReading(10 * MIB, 12 * MIB, 100 * MIB)

    path = tmp_path / "log.csv"
    csv_logger = keras.callbacks.CSVLogger(str(path))
    ours = [GradientAccumulation(5), GPUMemoryLogger(source=OneFakeGPU(), nvml=False)]
    callbacks = [csv_logger, *ours] if csv_first else [*ours, csv_logger]
    _train(_model(), keras.optimizers.SGD(0.1), callbacks)
    header = path.read_text().splitlines()[0].split(",")
    assert {"micro_batch_size", "gpu0_peak_mib", "gpu0_limit_mib", "loss"} <= set(header)
    # Outside fit (a hook called by hand) nothing is found and nothing moves.
    assert move_to_front(csv_logger) is False
