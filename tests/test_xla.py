"""XLA and DataParallel: `jit_compile` never drops the placement of the slices.

Keras 3 compiles the training step with XLA by default on machines with a GPU
(`jit_compile="auto"`), and XLA compiles the whole step for one device. These
tests give Keras the view of a GPU machine (a GPU entry in the device list it
reads) and check what DataParallel does with every `jit_compile` setting, and
that layers which compile themselves with XLA (grouped convolutions) work when
their replica runs on another device than the variables.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_save_load_same_outputs, assert_weights_close, op_device_indices

import keras_parallel
from keras_parallel import DataParallel
from keras_parallel._backend.tensorflow.xla import inside_xla_compilation
from keras_parallel._compat import IS_KERAS_3, keras

CPU2 = ["/cpu:0", "/cpu:1"]
CPU3 = ["/cpu:0", "/cpu:1", "/cpu:2"]


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="mlp")


def data(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")


def test_inside_xla_compilation_reads_tensorflow_tracing_state():
    # The one private TensorFlow attribute keras_parallel reads: this fails if
    # TensorFlow changes how it marks XLA tracing.
    seen = {}

    @tf.function(jit_compile=True)
    def compiled(x):
        seen["jit"] = inside_xla_compilation()
        return tf.cond(x[0] > 0, lambda: _mark(seen, "jit_cond", x), lambda: x)

    @tf.function(jit_compile=False)
    def plain(x):
        seen["plain"] = inside_xla_compilation()
        return tf.cond(x[0] > 0, lambda: _mark(seen, "plain_cond", x), lambda: x)

    compiled(tf.ones(2))
    plain(tf.ones(2))
    assert seen == {"jit": True, "jit_cond": True, "plain": False, "plain_cond": False}
    assert inside_xla_compilation() is False  # eager


def _mark(seen, key, x):
    seen[key] = inside_xla_compilation()
    return x


@pytest.fixture
def gpu_machine_view(monkeypatch):
    """Makes `tf.config.list_physical_devices` show a GPU, as on a GPU machine."""
    real = tf.config.list_physical_devices

    def with_gpu(device_type=None):
        devices = list(real(device_type))
        if device_type in (None, "GPU"):
            devices.append(
                tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
            )
        return devices

    monkeypatch.setattr(tf.config, "list_physical_devices", with_gpu)


@pytest.mark.skipif(not IS_KERAS_3, reason="jit_compile='auto' is Keras 3's")
def test_auto_resolves_to_no_xla_on_a_gpu_machine(gpu_machine_view):
    plain = mlp()
    plain.compile("sgd", "mse")
    assert plain.jit_compile is True  # the fake GPU works: Keras picks XLA for a plain model
    parallel = DataParallel(mlp(), devices=CPU2)
    parallel.compile("sgd", "mse")  # jit_compile="auto"
    assert parallel.jit_compile is False
    # The mechanism, also for a DataParallel model nested in another model:
    core = keras_parallel.replicas(parallel)
    assert core.supports_jit is False
    inputs = keras.Input((6,))
    outer = keras.Model(inputs, parallel(inputs))
    outer.compile("sgd", "mse")
    assert outer.jit_compile is False


def _jit(model):
    return model.jit_compile if IS_KERAS_3 else model._jit_compile


@pytest.mark.parametrize("setting", [True, False, "default"])
def test_jit_compile_settings(setting, gpu_machine_view):
    x, y = data(7)
    parallel = DataParallel(mlp(), devices=CPU2, split=[2, 1])
    kwargs = {} if setting == "default" else {"jit_compile": setting}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallel.compile("sgd", "mse", **kwargs)
    ours = [w for w in caught if "jit_compile=True` is turned off" in str(w.message)]
    if setting is True:
        assert len(ours) == 1
        assert "every slice would run on one device" in str(ours[0].message)
        assert ours[0].filename == __file__  # points at the user's compile() line
    else:
        assert not ours
    assert not _jit(parallel)
    # Trains, each slice on its own device.
    parallel.fit(x, y, batch_size=7, epochs=1, verbose=0)
    fn = tf.function(lambda t: parallel(t, training=True)).get_concrete_function(
        tf.TensorSpec([None, 6], tf.float32)
    )
    assert op_device_indices(fn, "MatMul") == {0, 1}


def test_calling_inside_an_xla_function_is_refused_clearly():
    parallel = DataParallel(mlp(), devices=CPU2)
    x, _ = data(4)
    with pytest.raises(Exception, match="cannot run inside an XLA-compiled function"):
        tf.function(lambda t: parallel(t), jit_compile=True)(tf.constant(x))


@pytest.mark.skipif(IS_KERAS_3, reason="Keras 3's own setter refuses jit for this model")
def test_tf_keras_jit_turned_on_after_compile_is_refused_before_any_update():
    x, y = data(6)
    model = mlp()
    before = [w.copy() for w in model.get_weights()]
    parallel = DataParallel(model, devices=CPU2)
    parallel.compile("sgd", "mse")
    parallel.jit_compile = True
    with pytest.raises(Exception, match="cannot run inside an XLA-compiled function"):
        parallel.fit(x, y, batch_size=3, epochs=1, verbose=0)
    assert_weights_close(model.get_weights(), before, rtol=0, atol=0)


def grouped_conv_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 3, groups=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(8, 3, groups=4, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="grouped")


def image_data(n, seed=2, size=8, channels=4, classes=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, channels)).astype("float32")
    return x, rng.integers(0, classes, size=(n,))


@pytest.mark.parametrize("devices", [CPU2, CPU3])
def test_grouped_convolutions_predict_fit_save(devices, tmp_path):
    x, y = image_data(7)
    template = grouped_conv_model()
    initial = template.get_weights()
    template.compile("adam", "sparse_categorical_crossentropy")
    expected_predict = template.predict(x, verbose=0)
    template.fit(x, y, batch_size=7, epochs=2, shuffle=False, verbose=0)
    expected = template.get_weights()

    template.set_weights(initial)
    parallel = DataParallel(template, devices=devices)
    np.testing.assert_allclose(parallel.predict(x, verbose=0), expected_predict, atol=1e-5)
    parallel.compile("adam", "sparse_categorical_crossentropy")
    parallel.fit(x, y, batch_size=7, epochs=2, shuffle=False, verbose=0)
    assert_weights_close(template.get_weights(), expected, rtol=1e-5, atol=1e-6)
    assert_save_load_same_outputs(parallel, x, tmp_path)


@pytest.mark.skipif(
    not IS_KERAS_3 and not os.environ.get("KERAS_PARALLEL_SLOW_TESTS"),
    reason="about 2 minutes; on tf-keras the grouped-convolution test covers the same path "
    "(tf-keras reads the kernel outside its XLA function); set KERAS_PARALLEL_SLOW_TESTS=1",
)
def test_convnext_tiny_on_two_and_three_devices(tmp_path):
    # ConvNeXt's depthwise convolutions are grouped convolutions, which Keras 3
    # runs as XLA-compiled functions on CPUs; 32x32 is the smallest input it takes.
    keras.utils.set_random_seed(0)
    template = keras.applications.ConvNeXtTiny(
        weights=None, input_shape=(32, 32, 3), classes=3, include_top=True
    )
    x, y = image_data(4, size=32, channels=3)
    initial = template.get_weights()
    # Eager calls, not predict(): tracing ConvNeXt's predict step takes longer
    # than the computation on 4 images.
    expected_predict = np.asarray(template(x, training=False))
    template.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
    template.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    expected = template.get_weights()

    for devices in (CPU2, CPU3):
        template.set_weights(initial)
        parallel = DataParallel(template, devices=devices)
        # 28M parameters through ~150 layers: float32 sums in another order per slice.
        np.testing.assert_allclose(
            np.asarray(parallel(x, training=False)), expected_predict, atol=1e-4
        )
        parallel.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
        parallel.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        # LayerNormalization and GELU over 1-2 rows per slice: 1e-4 relative (the
        # same float32 reordering), far below what one SGD step changes.
        assert_weights_close(template.get_weights(), expected, rtol=1e-4, atol=1e-6)
    path = str(tmp_path / "convnext_parallel.keras")
    parallel.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        np.asarray(loaded(x, training=False)), np.asarray(parallel(x, training=False)), atol=1e-5
    )
