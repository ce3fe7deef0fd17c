"""GradientAccumulation: exact updates, logging, BN warning, loss scaling, "auto", faults."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_weights_close

from keras_parallel._compat import IS_KERAS_3, keras
from keras_parallel.callbacks import GradientAccumulation

N_SAMPLES = 70  # batch 32: batches of 32, 32 and a partial 6
RNG = np.random.default_rng(0)
X = RNG.normal(size=(N_SAMPLES, 5)).astype("float32")
Y = RNG.integers(0, 3, size=(N_SAMPLES,))


class RowRecorder(keras.layers.Layer):
    """Identity that counts its calls and the rows it sees, records the largest call,
    and (above `limit` rows) raises a real allocator `ResourceExhaustedError`."""

    def __init__(self, limit=None, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def build(self, input_shape):
        self.seen = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="seen", dtype="float32"
        )
        self.largest = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="largest", dtype="float32"
        )
        self.calls = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="calls", dtype="float32"
        )

    def call(self, x):
        rows = tf.cast(tf.shape(x)[0], "float32")
        self.seen.assign_add(rows)
        self.largest.assign(tf.maximum(self.largest, rows))
        self.calls.assign_add(1.0)
        if self.limit is None:
            return x

        def explode():
            # Rows known only at run time: TensorFlow 2.16 would fold a constant
            # shape into a 2 TiB constant and fail before allocating anything.
            huge = tf.fill(
                [2**30 + tf.shape(x)[0] * 0, 512], tf.reduce_sum(x) * 0.0
            )  # 2 TiB: the allocator fails
            return x + tf.reduce_sum(huge)

        return tf.cond(tf.shape(x)[0] > self.limit, explode, lambda: x)

    def compute_output_shape(self, input_shape):
        return input_shape


def _model(batch_norm=False, recorder=None, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((5,))]
    if recorder is not None:
        layers.append(recorder)
    layers.append(
        keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.l2(0.01))
    )
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def _optimizer(name):
    opt = keras.optimizers
    return {
        "sgd": lambda: opt.SGD(0.1),
        "momentum": lambda: opt.SGD(0.1, momentum=0.9),
        "adam": lambda: opt.Adam(0.01),
        "clipnorm": lambda: opt.SGD(0.5, clipnorm=0.05),
    }[name]()


def _train(callbacks, optimizer="sgd", model=None, epochs=2, batch_size=32, n=N_SAMPLES, **fit):
    model = model or _model()
    model.compile(
        optimizer=_optimizer(optimizer) if isinstance(optimizer, str) else optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        X[:n],
        Y[:n],
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **fit,
    )
    return model, history.history


def _assert_same_training(accumulated, plain, rtol=1e-5):
    (model_a, hist_a), (model_p, hist_p) = accumulated, plain
    # Trainable weights: RowRecorder's counters record how the rows arrived.
    trainable_a = [np.asarray(w) for w in model_a.trainable_weights]
    trainable_p = [np.asarray(w) for w in model_p.trainable_weights]
    assert_weights_close(trainable_a, trainable_p, rtol=rtol)
    np.testing.assert_allclose(hist_a["loss"], hist_p["loss"], rtol=1e-6)
    np.testing.assert_allclose(hist_a["accuracy"], hist_p["accuracy"], rtol=1e-6)
    assert int(model_a.optimizer.iterations.numpy()) == int(model_p.optimizer.iterations.numpy())


# Plain fit's updates with each optimizer feature. In this flavour
# test_accumulation_backends.py (test_updates_and_logs_equal_plain_fit_on_the_whole_batch)
# checks SGD (micro-batches of 1 and of the whole batch), Adam with a learning-rate
# schedule, and AdamW's weight decay (micro-batches of 5 on batches of 16 and 6), every
# case with sample weights; here what that file does not have.
CASES = {
    "momentum": dict(optimizer="momentum"),
    "clipnorm": dict(optimizer="clipnorm"),  # SGD: the clipped norm is the whole step's
    "class_weights": dict(optimizer="momentum", class_weight={0: 0.5, 1: 2.0, 2: 1.0}),
    "full_batches_only": dict(optimizer="adam", n=64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_updates_and_logged_loss_equal_plain_fit(case):
    # Micro-batches of 5: 32 rows -> 6 x 5 + 2, the partial last batch of 6 -> 5 + 1.
    kwargs = CASES[case]
    plain = _train([], **kwargs)
    accumulated = _train([GradientAccumulation(micro_batch_size=5)], **kwargs)
    _assert_same_training(accumulated, plain)
    assert accumulated[1]["micro_batch_size"] == [5, 5]


def test_train_function_is_restored_after_fit():
    callback = GradientAccumulation(4)
    model, _ = _train([callback], epochs=1)
    assert type(model.train_function).__name__ != "AccumulatingTrainFunction"
    before = int(model.optimizer.iterations.numpy())
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == before + 3
    # The instance is reusable: a second fit resets its state.
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    assert callback.micro_batch_size_ == 4


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _Raises(keras.callbacks.Callback):
    """Raises `error` in the hook `where` (at batch `batch` for a batch hook)."""

    def __init__(self, where, batch=0, error=RuntimeError):
        super().__init__()
        self.where, self.batch, self.error = where, batch, error

    def _maybe_raise(self, where, batch=0):
        if where == self.where and batch == self.batch:
            raise self.error(f"raised in {where} at batch {batch}")

    def on_train_begin(self, logs=None):
        self._maybe_raise("on_train_begin")

    def on_train_batch_begin(self, batch, logs=None):
        self._maybe_raise("on_train_batch_begin", batch)

    def on_train_batch_end(self, batch, logs=None):
        self._maybe_raise("on_train_batch_end", batch)


def _batches_then_failure():
    """A data source that yields two batches of 16 rows, then raises."""
    for start in (0, 16):
        yield X[start : start + 16], Y[start : start + 16]
    raise RuntimeError("the data source failed")


# How the fit with GradientAccumulation raises. Each callback comes after ours.
FAILURES = {
    "a callback raises mid-epoch": dict(callbacks=[_Raises("on_train_batch_end", batch=2)]),
    "the data source raises mid-epoch": dict(data=_batches_then_failure),
    "a callback raises in on_train_begin": dict(callbacks=[_Raises("on_train_begin")]),
    # Between our on_train_batch_begin and the step: the step was expected.
    "an interrupt just before a step": dict(
        callbacks=[_Raises("on_train_batch_begin", batch=1, error=KeyboardInterrupt)],
        error=KeyboardInterrupt,
    ),
    # Micro-batches of 12 rows exceed the 8 the model can take; fixed size: no retry.
    "out of memory in the first step": dict(
        limit=8, micro=12, error=tf.errors.ResourceExhaustedError
    ),
}


def _fail_a_fit_with_accumulation(model, failure):
    case = FAILURES[failure]
    callbacks = [GradientAccumulation(case.get("micro", 4)), *case.get("callbacks", [])]
    data = case["data"]() if "data" in case else (X, Y)
    kwargs = dict(batch_size=16) if "data" not in case else {}
    with pytest.raises(case.get("error", Exception)):
        model.fit(*data, epochs=1, shuffle=False, verbose=0, callbacks=callbacks, **kwargs)


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_fit_that_raises_leaves_the_model_as_plain_keras_would(failure):
    limit = FAILURES[failure].get("limit")
    batch = 8 if limit else 16  # the whole batch fits the model

    def compiled_model():
        model = _model(recorder=RowRecorder(limit))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
        return model

    model = compiled_model()
    _fail_a_fit_with_accumulation(model, failure)
    weights = model.get_weights()
    recorder = model.layers[0]
    recorder.largest.assign(0.0)
    recorder.calls.assign(0.0)
    model.fit(X, Y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    # Whole batches from the first step on: one forward pass each, of all its rows.
    assert float(recorder.largest.numpy()) == batch
    assert float(recorder.calls.numpy()) == -(-N_SAMPLES // batch)

    plain = compiled_model()
    plain.set_weights(weights)
    plain.fit(X, Y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    assert_weights_close(model.trainable_weights, plain.trainable_weights)


def test_train_on_batch_after_a_fit_that_raised_takes_the_whole_batch():
    model = _model(recorder=RowRecorder())
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    _fail_a_fit_with_accumulation(model, "a callback raises mid-epoch")
    recorder = model.layers[0]
    recorder.largest.assign(0.0)
    recorder.calls.assign(0.0)
    model.train_on_batch(X[:16], Y[:16])
    assert float(recorder.largest.numpy()) == 16
    assert float(recorder.calls.numpy()) == 1


def test_after_a_fit_that_raised_the_callback_accumulates_again_until_its_fit_ends():
    model = _model(recorder=RowRecorder())
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    _fail_a_fit_with_accumulation(model, "a callback raises mid-epoch")
    recorder = model.layers[0]
    for callback in (GradientAccumulation(2), GradientAccumulation(4)):  # another, then ours
        recorder.largest.assign(0.0)
        model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
        assert float(recorder.largest.numpy()) == callback.micro_batch_size
    recorder.largest.assign(0.0)
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    assert float(recorder.largest.numpy()) == 16


@pytest.mark.parametrize("bad", [0, -3, 2.5, "big", True, None, [4]])
def test_invalid_micro_batch_size_raises(bad):
    with pytest.raises(ValueError, match="Invalid value for argument `micro_batch_size`"):
        GradientAccumulation(micro_batch_size=bad)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(memory_budget=-1), "memory_budget"),
        (dict(memory_margin=1.5), "memory_margin"),
        (dict(memory_probe=3), "memory_probe"),
    ],
)
def test_invalid_auto_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        GradientAccumulation("auto", **kwargs)


def _assert_rejected_before_training(model, match):
    recorder = model.layers[0]
    before = model.get_weights()
    with pytest.raises(ValueError, match=match):
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[GradientAccumulation(4)])
    assert float(recorder.seen.numpy()) == 0.0  # no batch reached the model
    assert_weights_close(model.get_weights(), before, rtol=0)


def test_steps_per_execution_above_one_is_rejected_before_any_data():
    model = _model(recorder=RowRecorder())
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", steps_per_execution=2)
    _assert_rejected_before_training(model, "steps_per_execution")


@pytest.mark.skipif(not IS_KERAS_3, reason="tf-keras optimizers do not accumulate")
def test_optimizer_that_accumulates_is_rejected_before_any_data():
    model = _model(recorder=RowRecorder())
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
        loss="sparse_categorical_crossentropy",
    )
    _assert_rejected_before_training(model, "gradient_accumulation_steps")


def test_batch_normalization_warns_once_when_it_sees_micro_batches():
    # Two whole batches (one traced step): the warning comes for the first only.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train([GradientAccumulation(8)], model=_model(batch_norm=True), epochs=1, n=64)
    warned = [w for w in caught if "BatchNormalization" in str(w.message)]
    assert len(warned) == 1
    message = str(warned[0].message)
    assert "micro-batches of 8 rows instead of batches of 32" in message
    assert "'BatchNormalization' section of the gradient accumulation docs" in message
    assert warned[0].filename == __file__  # the user's fit line, not Keras internals

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train([GradientAccumulation(32)], model=_model(batch_norm=True), epochs=1, n=64)
    assert not [w for w in caught if "BatchNormalization" in str(w.message)]


def _loss_scale_optimizer():
    if IS_KERAS_3:
        return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    return keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.1))


def _loss_scale(optimizer):
    value = optimizer.dynamic_scale if IS_KERAS_3 else optimizer.loss_scale
    return float(np.asarray(value))


def test_non_finite_micro_batch_skips_the_update_and_adapts_the_loss_scale():
    x = X.copy()
    x[40, 2] = np.inf  # second batch, micro-batch [40, 45): its gradients are not finite
    results = []
    for callbacks in ([], [GradientAccumulation(5)]):
        model = _model()
        model.compile(
            optimizer=_loss_scale_optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, Y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        results.append((model.get_weights(), _loss_scale(model.optimizer)))
    (accumulated, scale_a), (plain, scale_p) = results
    assert_weights_close(accumulated, plain)
    assert scale_a == scale_p < 2.0**15  # halved once from the initial scale


def test_auto_keeps_the_batch_whole_without_a_memory_limit():
    callback = GradientAccumulation("auto")
    _, history = _train([callback], epochs=1)
    assert callback.micro_batch_size_ == 32
    assert history["micro_batch_size"] == [32]


def test_auto_with_a_budget_but_no_allocator_figures_warns_and_keeps_the_batch_whole(
    monkeypatch,
):
    # A CPU without TF_CPU_ALLOCATOR_USE_BFC has no figures to plan from, whether
    # oneDNN is on (its allocator counts only large blocks) or off (none at all).
    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    callback = GradientAccumulation("auto", memory_budget=2**30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, history = _train([callback], epochs=1)
    warned = [w for w in caught if "cannot measure memory" in str(w.message)]
    assert len(warned) == 1
    assert "TF_CPU_ALLOCATOR_USE_BFC=true" in str(warned[0].message)
    assert warned[0].filename == __file__  # the user's fit line
    assert history["micro_batch_size"] == [32]


def test_auto_plans_from_an_injected_probe_and_budget():
    measured = []

    def probe(micro_batch_size):
        measured.append(micro_batch_size)
        return 1000 + 100 * micro_batch_size

    callback = GradientAccumulation("auto", memory_budget=2000, memory_probe=probe)
    accumulated = _train([callback], optimizer="adam")
    # (0.8 * 2000 - 1000) / 100 = 6 rows, planned once, from small sizes.
    assert callback.micro_batch_size_ == 6
    assert measured and max(measured) <= 8 and len(measured) == len(set(measured))
    _assert_same_training(accumulated, _train([], optimizer="adam"))


def test_out_of_memory_halves_and_redoes_the_same_batch():
    # Above 8 rows, RowRecorder raises a real ResourceExhaustedError. "auto" on a CPU
    # starts with the whole batch of 32 and must halve twice, on the same batch.
    callback = GradientAccumulation("auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accumulated = _train([callback], optimizer="adam", model=_model(recorder=RowRecorder(8)))
    plain = _train([], optimizer="adam", model=_model(recorder=RowRecorder()))
    assert callback.micro_batch_size_ == 8
    out_of_memory = [w for w in caught if "out of memory" in str(w.message)]
    assert len(out_of_memory) == 2
    assert {w.filename for w in out_of_memory} == {__file__}  # the user's fit line
    model_a, model_p = accumulated[0], plain[0]
    assert type(model_a.train_function).__name__ != "AccumulatingTrainFunction"
    # Every sample used exactly once per epoch: the failed tries were rolled back.
    assert float(model_a.layers[0].seen.numpy()) == 2 * N_SAMPLES
    assert float(model_p.layers[0].seen.numpy()) == 2 * N_SAMPLES
    assert float(model_a.layers[0].largest.numpy()) == 8
    _assert_same_training(accumulated, plain)


def _sgd_whose_first_update_runs_out_of_memory():
    """SGD(0.1) whose first update raises a real allocator error, once."""
    first = tf.Variable(True, trainable=False)

    class SGD(keras.optimizers.SGD):
        def apply_gradients(self, grads_and_vars, *args, **kwargs):
            (grad, variable), *rest = list(grads_and_vars)

            def explode():
                with tf.control_dependencies([first.assign(False)]):
                    huge = tf.fill(
                        [2**30 + tf.shape(grad)[0] * 0, 512], tf.reduce_sum(grad) * 0.0
                    )  # 2 TiB
                    return grad + tf.reduce_sum(huge)

            grad = tf.cond(first, explode, lambda: grad)
            return super().apply_gradients([(grad, variable), *rest], *args, **kwargs)

    return SGD(0.1)


def test_out_of_memory_during_the_update_is_raised_not_retried():
    # Part of an update may have been applied when its out-of-memory error comes: a
    # retry could apply it twice. "auto" retries only errors from before the update.
    results = []
    for callbacks in ([], [GradientAccumulation("auto")]):
        model = _model()
        model.compile(optimizer=_sgd_whose_first_update_runs_out_of_memory(), loss=LOSS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(tf.errors.ResourceExhaustedError):
                model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
        assert not [w for w in caught if "out of memory" in str(w.message)]
        results.append(int(model.optimizer.iterations.numpy()))
    assert results[1] == results[0]  # what plain Keras counts for the failed update


def test_data_parallel_models_take_micro_batches_of_n_devices_rows():
    # A DataParallel model over n devices takes n * micro_batch_size rows per micro
    # step: ceil(32 / (2 * 4)) = 4 steps per batch, 4 rows per device each.
    from keras_parallel import DataParallel

    template = _model(recorder=RowRecorder())
    parallel = DataParallel(template, devices=["/cpu:0", "/cpu:1"])
    callback = GradientAccumulation(4)
    accumulated = _train([callback], model=parallel, optimizer="momentum")
    recorder = template.layers[0]
    assert float(recorder.largest.numpy()) == 4  # each device's slice of a micro step
    assert float(recorder.seen.numpy()) == 2 * N_SAMPLES
    plain = _train([], model=_model(recorder=RowRecorder()), optimizer="momentum")
    _assert_same_training(accumulated, plain)


def test_auto_on_an_unequal_data_parallel_model_does_what_plan_shows():
    # One rule for plan(..., "auto") and GradientAccumulation("auto"): with a 2:1 split
    # the first device's rows bound the micro step. Device rows cost 1000 + 100 * rows
    # bytes; a 2000-byte budget at margin 0.8 fits 6 rows: 8-row micro steps (6 + 2).
    import keras_parallel
    from keras_parallel import DataParallel

    def device_peak(rows):
        return 1000 + 100 * rows

    parallel = DataParallel(_model(), devices=["/cpu:0", "/cpu:1"], split=[2, 1])
    shown = keras_parallel.plan(
        parallel, 32, micro_batch_size="auto", memory_budget=2000, memory_probe=device_peak
    )
    assert shown.micro_batch_size == 4 and shown.rows_per_device == [6, 2]

    def micro_probe(micro):  # what the first device computes of a 2 * micro row step
        return device_peak(keras_parallel.slice_sizes(2 * micro, [2, 1])[0])

    callback = GradientAccumulation("auto", memory_budget=2000, memory_probe=micro_probe)
    accumulated = _train([callback], model=parallel, optimizer="adam")
    assert callback.micro_batch_size_ == shown.micro_batch_size
    _assert_same_training(accumulated, _train([], optimizer="adam"))


def test_batch_normalization_inside_a_data_parallel_model_warns():
    from keras_parallel import DataParallel

    parallel = DataParallel(_model(batch_norm=True), devices=["/cpu:0", "/cpu:1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train([GradientAccumulation(4)], model=parallel, epochs=1, n=64)  # 2 batches
    assert len([w for w in caught if "BatchNormalization" in str(w.message)]) == 1


def test_mirrored_strategy_gives_the_weights_of_a_single_device():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        # 64 rows, batches of 16 (8 per replica): micro-batches of 3 -> 3 + 3 + 2.
        accumulated = _train([GradientAccumulation(3)], optimizer="momentum", n=64, batch_size=16)
    plain = _train([], optimizer="momentum", n=64, batch_size=16)
    _assert_same_training(accumulated, plain)


def test_a_micro_batch_larger_than_the_batch_says_so_and_logs_what_runs():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, history = _train([GradientAccumulation(64)], epochs=1, batch_size=32, n=40)
    larger = [w for w in caught if "is larger than the batch's 32 rows" in str(w.message)]
    assert len(larger) == 1  # the first batch only, not the short last one
    assert history["micro_batch_size"] == [32]
