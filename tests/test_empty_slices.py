"""Batches with fewer rows than devices, through every kind of layer.

A replica whose slice has no rows is never called (oneDNN's convolutions, on by
default on AVX-512 CPUs, return wrong shapes for 0 rows; statistics must not
see empty batches); its place in the output is a 0-row tensor. Every batch size
from 1 to 2n + 1 goes through predict, evaluate, fit and a direct call, with
even and unequal splits, and gives the template's results.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_weights_close

from keras_parallel import DataParallel
from keras_parallel._compat import IS_KERAS_3, keras

ops = keras.ops if IS_KERAS_3 else None


@keras.saving.register_keras_serializable(package="keras_parallel_tests")
class ScaleAndCenter(keras.layers.Layer):
    """A custom layer: learned scale, minus the row mean."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        if IS_KERAS_3:
            return x * self.scale - ops.mean(x, axis=-1, keepdims=True)
        return x * self.scale - tf.reduce_mean(x, axis=-1, keepdims=True)


def conv1d():
    inputs = keras.Input((6, 3))
    x = keras.layers.Conv1D(4, 3, activation="relu")(inputs)
    return inputs, keras.layers.GlobalAveragePooling1D()(x)


def conv2d():
    inputs = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    return inputs, keras.layers.Flatten()(x)


def conv3d():
    inputs = keras.Input((3, 5, 5, 2))
    x = keras.layers.Conv3D(4, 2, activation="relu")(inputs)
    return inputs, keras.layers.GlobalAveragePooling3D()(x)


def time_distributed_lstm():
    inputs = keras.Input((3, 5, 5, 2))
    x = keras.layers.TimeDistributed(keras.layers.Conv2D(3, 3, activation="relu"))(inputs)
    x = keras.layers.TimeDistributed(keras.layers.GlobalAveragePooling2D())(x)
    return inputs, keras.layers.LSTM(4)(x)


def attention_gru():
    inputs = keras.Input((4, 6))
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    return inputs, keras.layers.GRU(4)(x)


def custom():
    inputs = keras.Input((6,))
    return inputs, ScaleAndCenter()(keras.layers.Dense(5)(inputs))


BUILDERS = {
    "conv1d": conv1d,
    "conv2d": conv2d,
    "conv3d": conv3d,
    "time_distributed_lstm": time_distributed_lstm,
    "attention_gru": attention_gru,
    "custom": custom,
}


def build(name, seed=0, batchnorm=False):
    keras.utils.set_random_seed(seed)
    inputs, features = BUILDERS[name]()
    if batchnorm:
        features = keras.layers.BatchNormalization()(features)
    return keras.Model(inputs, keras.layers.Dense(3)(features), name=name)


def batches(model, max_rows, seed=3):
    """Batches of 1, 2, ..., max_rows rows (one dataset, so one traced step)."""
    rng = np.random.default_rng(seed)
    shape = tuple(model.inputs[0].shape)[1:]
    xs, ys = [], []
    for rows in range(1, max_rows + 1):
        xs.append(rng.normal(size=(rows, *shape)).astype("float32"))
        ys.append(rng.normal(size=(rows, 3)).astype("float32"))

    def dataset(with_labels=True):
        def gen():
            for x, y in zip(xs, ys, strict=True):
                yield (x, y) if with_labels else x

        x_spec = tf.TensorSpec((None, *shape), tf.float32)
        y_spec = tf.TensorSpec((None, 3), tf.float32)
        signature = (x_spec, y_spec) if with_labels else x_spec
        dataset = tf.data.Dataset.from_generator(gen, output_signature=signature)
        return dataset.apply(tf.data.experimental.assert_cardinality(len(xs)))

    return xs, ys, dataset


CONFIGS = [
    pytest.param(["/cpu:0", "/cpu:1"], None, id="2-even"),
    pytest.param(["/cpu:0", "/cpu:1"], [2, 1], id="2-unequal"),
    pytest.param(["/cpu:0", "/cpu:1", "/cpu:2"], None, id="3-even"),
    pytest.param(["/cpu:0", "/cpu:1", "/cpu:2"], [3, 1, 1], id="3-unequal"),
]


def check_against_template(name, devices, split):
    n = len(devices)
    template = build(name)
    initial = template.get_weights()
    xs, ys, dataset = batches(template, 2 * n + 1)

    expected_predict = template.predict(dataset(False), verbose=0)
    template.compile(keras.optimizers.SGD(0.05), "mse")
    expected_eval = template.evaluate(dataset(), verbose=0)
    template.fit(dataset(), epochs=1, shuffle=False, verbose=0)
    expected = template.get_weights()

    template.set_weights(initial)
    parallel = DataParallel(template, devices=devices, split=split)
    for x in xs:  # direct, eager calls
        np.testing.assert_allclose(
            np.asarray(parallel(x)), np.asarray(template(x)), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(
        parallel.predict(dataset(False), verbose=0), expected_predict, rtol=1e-5, atol=1e-6
    )
    parallel.compile(keras.optimizers.SGD(0.05), "mse")
    np.testing.assert_allclose(parallel.evaluate(dataset(), verbose=0), expected_eval, rtol=1e-5)
    parallel.fit(dataset(), epochs=1, shuffle=False, verbose=0)
    assert_weights_close(template.get_weights(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("devices, split", CONFIGS)
def test_conv3d_every_batch_size(devices, split):
    check_against_template("conv3d", devices, split)


# Also test_backends.py's conv model and splits on TensorFlow (it skips them there).
@pytest.mark.parametrize("devices, split", [CONFIGS[0], CONFIGS[3]])
def test_conv1d_every_batch_size(devices, split):
    check_against_template("conv1d", devices, split)


@pytest.mark.parametrize("name", ["conv2d", "time_distributed_lstm", "attention_gru", "custom"])
def test_other_layers_every_batch_size(name):
    check_against_template(name, ["/cpu:0", "/cpu:1", "/cpu:2"], [2, 1, 1])


@pytest.mark.parametrize("devices, split", [CONFIGS[1], CONFIGS[2]])
def test_batchnorm_never_sees_an_empty_slice(devices, split):
    # Per-slice statistics differ from the template's by design; what matters
    # here is that every batch size trains, the statistics stay finite, and
    # inference (moving statistics) equals the template's.
    template = build("conv2d", batchnorm=True)
    xs, _, dataset = batches(template, 2 * len(devices) + 1)
    parallel = DataParallel(template, devices=devices, split=split)
    parallel.compile(keras.optimizers.SGD(0.05), "mse")
    parallel.fit(dataset(), epochs=2, shuffle=False, verbose=0)
    for weight in template.weights:
        assert np.all(np.isfinite(np.asarray(weight)))
    for x in xs:
        np.testing.assert_allclose(
            np.asarray(parallel(x, training=False)),
            np.asarray(template(x, training=False)),
            rtol=1e-5,
            atol=1e-6,
        )


def test_empty_replica_output_keeps_shape_and_dtype():
    template = build("conv3d")
    parallel = DataParallel(template, devices=["/cpu:0", "/cpu:1", "/cpu:2"])
    core = parallel.layers[1]
    x = np.zeros((1, 3, 5, 5, 2), "float32")
    outputs = core.replica_outputs(tf.constant(x))
    assert [tuple(o.shape) for o in outputs] == [(1, 3), (0, 3), (0, 3)]
    assert {o.dtype.name if hasattr(o.dtype, "name") else str(o.dtype) for o in outputs} == {
        "float32"
    }


def test_output_with_a_dimension_known_only_at_run_time():
    # A sequence model whose time axis is None: the stand-in for an empty slice
    # takes that dimension from the first replica's output.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, 4))
    outputs = keras.layers.Conv1D(3, 1)(inputs)
    template = keras.Model(inputs, outputs)
    parallel = DataParallel(template, devices=["/cpu:0", "/cpu:1", "/cpu:2"])
    rng = np.random.default_rng(0)
    for rows in (1, 2, 4):
        x = rng.normal(size=(rows, 7, 4)).astype("float32")
        np.testing.assert_allclose(
            parallel.predict(x, verbose=0), template.predict(x, verbose=0), atol=1e-6
        )
    parallel.compile("sgd", "mse")
    x = rng.normal(size=(5, 7, 4)).astype("float32")
    parallel.fit(x, np.zeros((5, 7, 3), "float32"), batch_size=2, epochs=1, verbose=0)
