"""DataParallel and BatchNormalization: whole-batch moments by default, per slice on request.

Backend-neutral: runs on Keras 3 with TensorFlow, JAX and torch, and on tf-keras.
On torch (one CPU) the slices share the CPU device; the arithmetic is the same.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_backends import _cpus, _numpy, _parallel

import keras_parallel
from keras_parallel import _graph
from keras_parallel._compat import IS_KERAS_3, backend_name, keras
from keras_parallel.layers.parallel_replicas import ParallelReplicas

SPLITS = [[1, 1], [2, 1], [3, 1, 1]]


def dense_bn(seed=0, momentum=0.8):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4)(inputs)
    x = keras.layers.BatchNormalization(momentum=momentum, name="bn")(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="dense_bn")


def video_cnn(seed=0):
    """A 3D CNN with two BatchNormalization layers (the video classifiers' pattern)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, 4, 4, 2))
    x = keras.layers.Conv3D(3, 2, padding="same")(inputs)
    # synchronized=True (TensorFlow only) is the same as False on one device.
    x = keras.layers.BatchNormalization(synchronized=backend_name() == "tensorflow")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Conv3D(4, 2, padding="same")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, center=False)(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="video_cnn")


def nested_backbone(seed=0):
    """A functional backbone and a Sequential head, each with BatchNormalization, nested."""
    keras.utils.set_random_seed(seed)
    backbone_in = keras.Input((6,))
    b = keras.layers.Dense(5)(backbone_in)
    b = keras.layers.BatchNormalization(scale=False)(b)
    backbone = keras.Model(backbone_in, keras.layers.Activation("relu")(b), name="backbone")
    head = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4), keras.layers.BatchNormalization()],
        name="head",
    )
    inputs = keras.Input((6,))
    x = head(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="nested")


def data(shape, n, seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, *shape)) * 2 + 1).astype("float32")
    return x, rng.normal(size=(n, 3)).astype("float32")


def _shape(model):
    return tuple(model.inputs[0].shape)[1:]


def _train(model, x, y, batch_size, epochs=2):
    model.compile(keras.optimizers.SGD(0.05, momentum=0.5), "mse")
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)


def _assert_training_outputs_equal(parallel, template, x, tol=2e-5):
    np.testing.assert_allclose(
        _numpy(parallel(x, training=True)), _numpy(template(x, training=True)), rtol=tol, atol=tol
    )


def _assert_weights(actual, expected, tol=2e-5):
    # Weights and moving statistics (get_weights lists both), relative 2e-5 as the
    # issue asks: float32 sums in another order across devices.
    for a, b in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("split", SPLITS, ids=str)
def test_training_outputs_are_the_whole_batch_ones(split):
    template = dense_bn()
    parallel = _parallel(template, len(split), split)
    x, _ = data((5,), 2 * len(split) + 1)
    for rows in range(1, 2 * len(split) + 2):  # 1 .. 2n + 1 rows, empty slices included
        _assert_training_outputs_equal(parallel, template, x[:rows])


@pytest.mark.parametrize("split", [[2, 1], [3, 1, 1]], ids=str)
@pytest.mark.parametrize("build", [video_cnn, nested_backbone])
def test_fit_equals_one_device_weights_and_moving_statistics(build, split):
    template = build()
    initial = template.get_weights()
    x, y = data(_shape(template), 7)
    _train(template, x, y, batch_size=5)  # a full batch of 5, then a last one of 2
    expected = template.get_weights()

    template.set_weights(initial)
    parallel = _parallel(template, len(split), split)
    _train(parallel, x, y, batch_size=5)
    _assert_weights(template.get_weights(), expected)


def test_moving_statistics_move_once_per_step():
    template = dense_bn(momentum=0.5)
    parallel = _parallel(template, 2, [2, 1])
    x, y = data((5,), 6)
    before = [_numpy(v) for v in template.get_layer("bn").non_trainable_weights]
    features = _numpy(template.layers[1](x))  # the BatchNormalization layer's inputs
    parallel.compile(keras.optimizers.SGD(0.0), "mse")  # no weight moves: only the statistics
    parallel.fit(x, y, batch_size=6, epochs=1, verbose=0)
    mean, variance = features.mean(axis=0), features.var(axis=0)
    moving_mean, moving_variance = (
        _numpy(v) for v in template.get_layer("bn").non_trainable_weights
    )
    np.testing.assert_allclose(moving_mean, 0.5 * before[0] + 0.5 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        moving_variance, 0.5 * before[1] + 0.5 * variance, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("split", [[1, 1], [2, 1]], ids=str)
def test_per_slice_equals_the_template_on_each_slice(split):
    template = dense_bn()
    parallel = _parallel_per_slice(template, split)
    x, _ = data((5,), 7)
    core = keras_parallel.replicas(parallel) if _cpus()[1:] else None
    sizes = core.slice_sizes(7) if core else keras_parallel.slice_sizes(7, split)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(_numpy(template(x[start : start + size], training=True)))
        start += size
    np.testing.assert_allclose(
        _numpy(parallel(x, training=True)), np.concatenate(pieces), rtol=2e-5, atol=2e-5
    )
    whole = _numpy(template(x, training=True))
    assert np.abs(whole - np.concatenate(pieces)).max() > 1e-2  # the two modes differ


def _parallel_per_slice(template, split):
    cpus = _cpus()
    if len(cpus) >= len(split):
        return keras_parallel.DataParallel(
            template, devices=cpus[: len(split)], split=split, batch_norm="per_slice"
        )
    inputs = keras.Input(_shape(template))
    core = ParallelReplicas(
        template, devices=[cpus[0]] * len(split), ratios=split, batch_norm="per_slice"
    )
    return keras.Model(inputs, core(inputs))


def test_inference_and_frozen_layers_use_the_moving_statistics():
    template = dense_bn()
    parallel = _parallel(template, 2, [2, 1])
    x, _ = data((5,), 5)
    np.testing.assert_allclose(_numpy(parallel(x)), _numpy(template(x)), rtol=1e-5, atol=1e-6)
    template.get_layer("bn").trainable = False
    _assert_training_outputs_equal(parallel, template, x, tol=1e-6)


def test_an_invalid_batch_norm_is_named():
    with pytest.raises(ValueError, match=r"argument `batch_norm`.*Received: batch_norm='sync'"):
        keras_parallel.DataParallel(dense_bn(), devices=_cpus()[:1], batch_norm="sync")
    with pytest.raises(ValueError, match="argument `batch_norm`"):
        ParallelReplicas(dense_bn(), devices=_cpus()[:1], batch_norm=None)


def test_batch_norm_is_saved_with_the_model(tmp_path):
    template = dense_bn()
    parallel = _parallel_per_slice(template, [1, 1])
    core = [layer for layer in parallel.layers if isinstance(layer, ParallelReplicas)][0]
    assert core.get_config()["batch_norm"] == "per_slice"
    path = str(tmp_path / "parallel.keras")
    parallel.save(path)
    loaded = keras.models.load_model(path)
    restored = [layer for layer in loaded.layers if isinstance(layer, ParallelReplicas)][0]
    assert restored.batch_norm == "per_slice"
    x, _ = data((5,), 5)
    np.testing.assert_allclose(
        _numpy(loaded(x, training=True)), _numpy(parallel(x, training=True)), atol=1e-6
    )


class _Block(keras.layers.Layer):
    """A subclassed layer with its own BatchNormalization: out of keras_parallel's reach."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)
        self.norm = keras.layers.BatchNormalization(name="inner_bn")

    def call(self, inputs, training=None):
        return self.norm(self.dense(inputs), training=training)


def _subclassed_template():
    inputs = keras.Input((5,))
    return keras.Model(inputs, keras.layers.Dense(2)(_Block(name="block")(inputs)))


def test_a_batch_norm_out_of_reach_is_named_once():
    template = _subclassed_template()
    with pytest.warns(UserWarning, match=r"'inner_bn'.*inside 'block'.*per_slice"):
        _parallel(template, 2, [1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _parallel_per_slice(template, [1, 1])


def test_the_graph_contracts_keras_keeps():
    """The functional-graph attributes `keras_parallel._graph` reads: fails by name if Keras
    renames them."""
    model = dense_bn()
    assert _graph.is_graph_model(model)
    assert isinstance(model._nodes_by_depth, dict)
    node = [n for nodes in model._nodes_by_depth.values() for n in nodes if not n.is_input][0]
    if IS_KERAS_3:
        assert node.operation is not None and node.outputs and node.input_tensors is not None
        assert callable(node.arguments.fill_in)
    else:
        assert node.layer is not None and node.flat_input_ids and node.flat_output_ids
        assert callable(node.map_arguments)
    assert not _graph.is_graph_model(_Block())


def test_masked_positions_are_not_counted():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(6, 3, mask_zero=True)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    template = keras.Model(inputs, keras.layers.Dense(2)(x))
    if backend_name() == "jax":
        with pytest.warns(UserWarning, match="cannot read on JAX"):
            _parallel(template, 2, [2, 1])
        return
    parallel = _parallel(template, 2, [2, 1])
    ids = np.array([[1, 2, 0, 0], [3, 0, 0, 0], [4, 5, 1, 0], [2, 2, 2, 2], [5, 0, 0, 0]])
    _assert_training_outputs_equal(parallel, template, ids)


def test_plan_says_what_the_statistics_cover():
    devices = _cpus()[:1]
    plain = keras_parallel.plan(dense_bn(), 8, devices=devices)
    assert plain.batch_norm == "global" and "statistics of the whole batch (8 rows" in str(plain)
    per_slice = keras_parallel.plan(
        dense_bn(), 8, devices=devices, micro_batch_size=2, batch_norm="per_slice"
    )
    assert per_slice.batch_norm == "per_slice"
    assert "statistics of each micro step (2 rows" in str(per_slice)  # one device: no slices
    keras.utils.set_random_seed(0)
    no_bn = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    assert keras_parallel.plan(no_bn, 8, devices=devices).batch_norm is None
    with pytest.raises(ValueError, match="argument `batch_norm`"):
        keras_parallel.plan(dense_bn(), 8, devices=devices, batch_norm="Global")
    if len(_cpus()) >= 2:
        parallel = _parallel_per_slice(dense_bn(), [2, 1])
        planned = keras_parallel.plan(parallel, 9)
        assert "statistics of each device's slice (6, 3 rows)" in str(planned)
        with pytest.raises(ValueError, match="brings its own batch_norm"):
            keras_parallel.plan(parallel, 9, batch_norm="global")


@pytest.mark.parametrize("count, split", [(1, None), (2, [2, 1])], ids=["one device", "2:1"])
def test_accumulation_moves_the_statistics_once_with_the_whole_batch_moments(count, split):
    from keras_parallel.callbacks import GradientAccumulation

    template = dense_bn(momentum=0.7)
    initial = template.get_weights()
    x, y = data((5,), 12)
    template.compile(keras.optimizers.SGD(0.0), "mse")  # no weight moves: only the statistics
    template.fit(x, y, batch_size=12, epochs=1, shuffle=False, verbose=0)
    expected = [_numpy(v) for v in template.get_layer("bn").non_trainable_weights]

    template.set_weights(initial)
    model = template if count == 1 else _parallel(template, count, split)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the micro-batch warning
        model.fit(
            x,
            y,
            batch_size=12,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[GradientAccumulation(2)],  # micro steps of 2 rows per device
        )
    got = [_numpy(v) for v in template.get_layer("bn").non_trainable_weights]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_accumulation_with_per_slice_statistics_moves_them_per_slice():
    from keras_parallel.callbacks import GradientAccumulation

    template = dense_bn(momentum=0.7)
    x, y = data((5,), 12)
    bn = template.get_layer("bn")
    moving = [_numpy(v).astype("float64") for v in (bn.moving_mean, bn.moving_variance)]
    features = _numpy(template.layers[1](x)).astype("float64")  # the layer's inputs
    parallel = _parallel_per_slice(template, [1, 1])
    parallel.compile(keras.optimizers.SGD(0.0), "mse")  # no weight moves: only the statistics
    with pytest.warns(
        UserWarning, match=r"2 \+ 2 rows \(one per device\) instead of the batch.s 6 \+ 6"
    ):
        parallel.fit(
            x,
            y,
            batch_size=12,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[GradientAccumulation(2)],
        )
    # 3 micro steps of 4 rows, each cut 2 + 2: one move per slice, in row order.
    for start in range(0, 12, 2):
        rows = features[start : start + 2]
        moments = (rows.mean(0), rows.var(0))
        moving = [0.7 * m + 0.3 * s for m, s in zip(moving, moments, strict=True)]
    for variable, expected in zip((bn.moving_mean, bn.moving_variance), moving, strict=True):
        np.testing.assert_allclose(_numpy(variable), expected, rtol=1e-5, atol=1e-6)


def test_mixed_precision_keeps_the_statistics_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        template = dense_bn()
        parallel = _parallel(template, 2, [2, 1])
        x, _ = data((5,), 7)
        got, expected = parallel(x, training=True), template(x, training=True)
        assert "float16" in str(got.dtype)
        # float16 outputs: half precision's own rounding (2**-11 relative).
        np.testing.assert_allclose(
            _numpy(got).astype("float32"), _numpy(expected).astype("float32"), rtol=2e-3, atol=2e-3
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
