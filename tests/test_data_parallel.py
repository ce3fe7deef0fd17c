"""DataParallel on a CPU split into logical devices: equivalence, placement, I/O, saving."""

from __future__ import annotations

import json
import os
import warnings
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    assert_config_round_trip,
    assert_save_load_same_outputs,
    assert_weights_close,
    op_device_indices,
)

import keras_parallel
from keras_parallel import DataParallel, unwrap
from keras_parallel._compat import IS_KERAS_3, keras

CPU2 = ["/cpu:0", "/cpu:1"]
CPU3 = ["/cpu:0", "/cpu:1", "/cpu:2"]


def mlp(seed=0, batchnorm=False, l2=0.0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,), name="features")
    reg = keras.regularizers.L2(l2) if l2 else None
    x = keras.layers.Dense(16, activation="tanh", kernel_regularizer=reg, name="hidden")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="mlp")


def data(n=23, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.normal(size=(n, 3)).astype("float32")
    return x, y


# Even splits over 2 and 3 devices, every batch size through direct calls and predict:
# test_backends.py (this mlp on 2 devices) and test_empty_slices.py (every split).
@pytest.mark.parametrize("devices, split", [(CPU2, [2, 1]), (CPU3, [3.0, 1.5, 1.0])])
def test_predict_equals_template_for_every_batch_size(devices, split):
    model = mlp()
    parallel = DataParallel(model, devices=devices, split=split)
    x, _ = data(9)
    for batch in range(1, 10):
        np.testing.assert_allclose(
            parallel.predict(x[:batch], verbose=0), model.predict(x[:batch], verbose=0), atol=1e-5
        )
        # and as a single call with an arbitrary batch (eager)
        np.testing.assert_allclose(
            np.asarray(parallel(x[:batch])), np.asarray(model(x[:batch])), atol=1e-5
        )


@pytest.mark.parametrize("devices, split", [(CPU2, [2, 1]), (CPU3, None)])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_equals_single_device_fit(devices, split, optimizer):
    x, y = data(23)  # batch 5 -> last batch has 3 rows
    template = mlp(l2=1e-3)
    initial = template.get_weights()
    template.compile(optimizer=optimizer, loss="mse")
    history_single = template.fit(x, y, batch_size=5, epochs=2, shuffle=False, verbose=0)
    expected = template.get_weights()

    template.set_weights(initial)
    fresh = keras.optimizers.get(optimizer)
    parallel = DataParallel(template, devices=devices, split=split)
    parallel.compile(optimizer=fresh, loss="mse")
    history = parallel.fit(x, y, batch_size=5, epochs=2, shuffle=False, verbose=0)
    # Same variables: training the parallel model trained the template.
    assert_weights_close(template.get_weights(), expected, rtol=1e-5)
    np.testing.assert_allclose(history.history["loss"], history_single.history["loss"], rtol=1e-5)


def test_steps_per_execution_trains_like_single_device_fit():
    # Several steps per call (what docs/benchmarks.md recommends on CPUs): the
    # updates are the template's, one per batch.
    x, y = data(23)  # batch 5: 4 batches of 5 and one of 3; 3 steps per call
    template = mlp()
    initial = template.get_weights()
    template.compile(optimizer="sgd", loss="mse")
    template.fit(x, y, batch_size=5, epochs=2, shuffle=False, verbose=0)
    expected = template.get_weights()

    template.set_weights(initial)
    parallel = DataParallel(template, devices=CPU2, split=[2, 1])
    parallel.compile(optimizer="sgd", loss="mse", steps_per_execution=3)
    parallel.fit(x, y, batch_size=5, epochs=2, shuffle=False, verbose=0)
    assert_weights_close(template.get_weights(), expected)
    assert int(np.asarray(parallel.optimizer.iterations)) == 10


def test_template_variables_are_shared_not_copied():
    model = mlp()
    parallel = DataParallel(model, devices=CPU2)
    assert {id(v) for v in parallel.trainable_weights} == {id(v) for v in model.trainable_weights}
    assert len(parallel.weights) == len(model.weights)
    assert unwrap(parallel) is model
    assert unwrap(model) is model


def test_replicas_run_on_their_devices():
    parallel = DataParallel(mlp(), devices=CPU3, split=[1, 2, 3])
    core = keras_parallel.replicas(parallel)
    x, _ = data(12)
    # Eager: the replica outputs live on their devices.
    outs = core.replica_outputs(tf.constant(x))
    assert [tf.DeviceSpec.from_string(o.device).device_index for o in outs] == [0, 1, 2]
    assert [o.shape[0] for o in outs] == [2, 4, 6]
    # Traced, as in a fit step: each replica's MatMuls are placed on its device.
    fn = tf.function(lambda t: parallel(t, training=True)).get_concrete_function(
        tf.TensorSpec([None, 6], tf.float32)
    )
    # (inside the branch functions that skip empty slices too)
    assert op_device_indices(fn, "MatMul") == {0, 1, 2}
    concat = [op for op in fn.graph.get_operations() if op.type == "ConcatV2"]
    assert concat and all(tf.DeviceSpec.from_string(op.device).device_index == 0 for op in concat)


def test_merge_on_first_device():
    parallel = DataParallel(mlp(), devices=["/cpu:1", "/cpu:2"], merge_device="first")
    assert keras_parallel.replicas(parallel)._merge_on == "/device:CPU:1"
    fn = tf.function(lambda t: parallel(t)).get_concrete_function(
        tf.TensorSpec([None, 6], tf.float32)
    )
    concat = [op for op in fn.graph.get_operations() if op.type == "ConcatV2"]
    assert concat and all(tf.DeviceSpec.from_string(op.device).device_index == 1 for op in concat)


def multi_io_model(seed=0):
    keras.utils.set_random_seed(seed)
    image = keras.Input((4, 4, 1), name="image")
    meta = keras.Input((3,), name="meta")
    flat = keras.layers.Flatten()(image)
    joined = keras.layers.Concatenate()([flat, meta])
    hidden = keras.layers.Dense(8, activation="relu", name="shared")(joined)
    label = keras.layers.Dense(2, activation="softmax", name="label")(hidden)
    score = keras.layers.Dense(1, name="score")(hidden)
    return keras.Model({"image": image, "meta": meta}, {"label": label, "score": score})


def multi_io_data(n=11):
    rng = np.random.default_rng(3)
    x = {
        "image": rng.random((n, 4, 4, 1)).astype("float32"),
        "meta": rng.random((n, 3)).astype("float32"),
    }
    y = {"label": rng.integers(0, 2, n), "score": rng.random((n, 1)).astype("float32")}
    return x, y


def test_dict_inputs_and_outputs_keep_names_and_train_like_template():
    x, y = multi_io_data()
    template = multi_io_model()
    initial = template.get_weights()
    compile_args = dict(
        optimizer="sgd",
        loss={"label": "sparse_categorical_crossentropy", "score": "mse"},
        metrics={"label": ["accuracy"]},
    )
    template.compile(**compile_args)
    single = template.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    expected = template.get_weights()

    template.set_weights(initial)
    parallel = DataParallel(template, devices=CPU2, split=[1, 2])
    assert sorted(parallel.output_names) == sorted(template.output_names)
    parallel.compile(**compile_args)
    history = parallel.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert_weights_close(template.get_weights(), expected)
    assert set(history.history) == set(single.history)
    for key in single.history:
        np.testing.assert_allclose(history.history[key], single.history[key], rtol=1e-5)


def test_list_inputs_and_outputs():
    keras.utils.set_random_seed(0)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    template = keras.Model([a, b], [keras.layers.Dense(1, name="o1")(h), keras.layers.Dense(2)(h)])
    parallel = DataParallel(template, devices=CPU3)
    rng = np.random.default_rng(0)
    x = [rng.random((5, 3), dtype="float32"), rng.random((5, 2), dtype="float32")]
    got_all, want_all = parallel.predict(x, verbose=0), template.predict(x, verbose=0)
    for got, want in zip(got_all, want_all, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert list(parallel.output_names) == list(template.output_names)


def test_siamese_output_names_get_suffixes():
    keras.utils.set_random_seed(0)
    encoder_in = keras.Input((4,))
    encoder = keras.Model(encoder_in, keras.layers.Dense(2)(encoder_in), name="encoder")
    left, right = keras.Input((4,), name="left"), keras.Input((4,), name="right")
    template = keras.Model([left, right], [encoder(left), encoder(right)])
    parallel = DataParallel(template, devices=CPU2)
    assert list(parallel.output_names) == ["encoder", "encoder_1"]
    rng = np.random.default_rng(0)
    x = [rng.random((5, 4), dtype="float32") for _ in range(2)]
    got_all, want_all = parallel.predict(x, verbose=0), template.predict(x, verbose=0)
    for got, want in zip(got_all, want_all, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    parallel.compile("sgd", ["mse", "mse"])
    parallel.fit(x, [np.zeros((5, 2)), np.ones((5, 2))], epochs=1, verbose=0)


def test_batch_norm_per_slice_uses_per_slice_statistics():
    template = mlp(batchnorm=True)
    parallel = DataParallel(template, devices=CPU2, split=[2, 1], batch_norm="per_slice")
    x, _ = data(9)
    sizes = keras_parallel.replicas(parallel).slice_sizes(9)
    assert sizes == [6, 3]
    got = np.asarray(parallel(x, training=True))
    # batch_norm="per_slice": each slice is normalised with its own batch statistics ...
    first = np.asarray(template(x[:6], training=True))
    second = np.asarray(template(x[6:], training=True))
    np.testing.assert_allclose(got, np.concatenate([first, second]), atol=1e-5)
    # ... which differs from whole-batch statistics.
    assert not np.allclose(got, np.asarray(template(x, training=True)), atol=1e-3)


def test_batch_norm_per_slice_moves_the_statistics_slice_by_slice_in_order():
    x, y = data(9)
    template = mlp(batchnorm=True)
    initial = template.get_weights()
    parallel = DataParallel(template, devices=CPU2, split=[2, 1], batch_norm="per_slice")
    parallel.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    parallel.fit(x, y, batch_size=9, epochs=1, shuffle=False, verbose=0)
    bn = template.get_layer("bn")
    got = [np.asarray(bn.moving_mean), np.asarray(bn.moving_variance)]

    template.set_weights(initial)
    template(x[:6], training=True)  # slice 0 updates first,
    template(x[6:], training=True)  # then slice 1
    want = [np.asarray(bn.moving_mean), np.asarray(bn.moving_variance)]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_batch_smaller_than_devices_in_training_keeps_statistics_finite():
    x, y = data(5)
    template = mlp(batchnorm=True)
    parallel = DataParallel(template, devices=CPU3)
    parallel.compile("sgd", "mse")
    parallel.fit(x, y, batch_size=2, epochs=1, verbose=0)  # last batch: 1 row, 3 devices
    assert all(np.isfinite(w).all() for w in template.get_weights())
    assert np.asarray(parallel(x[:1], training=True)).shape == (1, 3)


def test_sequential_template_with_batchnorm_trains_on_batches_smaller_than_devices():
    keras.utils.set_random_seed(0)
    template = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )
    parallel = DataParallel(template, devices=CPU3)
    x, y = data(5)
    parallel.compile("sgd", "mse")
    parallel.fit(x, y, batch_size=2, epochs=1, verbose=0)  # last batch: 1 row, 3 devices
    assert all(np.isfinite(w).all() for w in template.get_weights())
    np.testing.assert_allclose(
        parallel.predict(x, verbose=0), template.predict(x, verbose=0), atol=1e-5
    )


def test_one_device_works_and_warns_once():
    import keras_parallel.parallel as module

    module._warned_single_device = False
    with pytest.warns(UserWarning, match="one device"):
        parallel = DataParallel(mlp(), devices=["/cpu:0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        DataParallel(mlp(), devices=["/cpu:1"])
    x, _ = data(4)
    np.testing.assert_allclose(parallel.predict(x, verbose=0), unwrap(parallel)(x), atol=1e-6)


def test_default_devices_without_gpu_is_the_cpu():
    import keras_parallel.parallel as module

    module._warned_single_device = True
    parallel = DataParallel(mlp())
    gpus = tf.config.list_logical_devices("GPU")
    want = [f"/device:GPU:{i}" for i in range(len(gpus))] or ["/device:CPU:0"]
    assert keras_parallel.replicas(parallel).devices == want


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"devices": ["/gpu:7"]}, r"Unknown device '/gpu:7'. Available devices: \["),
        ({"devices": ["/cpu:0", "/cpu:0"]}, "once"),
        ({"devices": []}, "at least one"),
        ({"devices": "nonsense!"}, "`devices`"),
        ({"devices": 99}, "`devices`"),
        ({"devices": CPU2, "split": [1, 2, 3]}, r"one ratio per device \(2"),
        ({"devices": CPU2, "split": [1, 0]}, "`split`"),
        ({"devices": CPU2, "split": "fastest"}, "`split`"),
        ({"devices": CPU2, "merge_device": 3}, "`merge_device`"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataParallel(mlp(), **kwargs)


def test_fixed_batch_size_raises():
    inputs = keras.Input(batch_shape=(8, 3), name="clips")
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    with pytest.raises(ValueError, match="Input 'clips' has a fixed batch size"):
        DataParallel(model, devices=CPU2)


def test_stateful_rnn_raises():
    try:
        inputs = keras.Input((5, 2))
        outputs = keras.layers.SimpleRNN(3, stateful=True, name="rnn")(inputs)
    except ValueError:  # Keras 3 demands a fixed batch size for stateful RNNs
        inputs = keras.Input(batch_shape=(4, 5, 2))
        outputs = keras.layers.SimpleRNN(3, stateful=True, name="rnn")(inputs)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match="Layer 'rnn' is stateful"):
        DataParallel(model, devices=CPU2)


def test_not_a_model_raises():
    with pytest.raises(ValueError, match="Expected a Keras model. Received"):
        DataParallel(keras.layers.Dense(3), devices=CPU2)
    with pytest.raises(ValueError, match=r"load the model first, with `keras.models.load_model"):
        DataParallel("classifier.keras", devices=CPU2)


def test_core_layer_config_round_trip():
    parallel = DataParallel(mlp(), devices=CPU2, split=[2, 1])
    core = keras_parallel.replicas(parallel)
    clone = assert_config_round_trip(core)
    assert clone.ratios == [2.0, 1.0] and clone.devices == ["/device:CPU:0", "/device:CPU:1"]


def test_save_and_load_keras_format(tmp_path):
    x, y = multi_io_data(7)
    parallel = DataParallel(multi_io_model(), devices=CPU3, split=[1, 2, 1])
    parallel.compile("adam", {"label": "sparse_categorical_crossentropy", "score": "mse"})
    parallel.fit(x, y, epochs=1, verbose=0)
    # The registered classes load without custom_objects, and with custom_objects().
    for objects in (keras_parallel.custom_objects(), None):
        loaded = assert_save_load_same_outputs(parallel, x, tmp_path, custom_objects=objects)
        core = keras_parallel.replicas(loaded)
        assert core.ratios == [1.0, 2.0, 1.0]
    loaded.fit(x, y, epochs=1, verbose=0)  # the optimizer state came along


@pytest.mark.skipif(IS_KERAS_3, reason="tf-keras native formats")
@pytest.mark.parametrize("suffix", ["h5", "tf"])
def test_save_and_load_tf_keras_native_formats(tmp_path, suffix):
    x, _ = data(7)
    parallel = DataParallel(mlp(), devices=CPU2, split=[2, 1])
    path = str(tmp_path / ("model.h5" if suffix == "h5" else "saved_model"))
    parallel.save(path, save_format=suffix)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), parallel.predict(x, verbose=0), atol=1e-6
    )


def test_load_on_machine_with_fewer_devices_warns_and_works(tmp_path):
    x, _ = data(7)
    parallel = DataParallel(mlp(), devices=CPU2, split=[2, 1])
    path = tmp_path / "model.keras"
    parallel.save(str(path))
    # Pretend the file came from a machine with two GPUs.
    edited = tmp_path / "from_gpus.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(edited, "w") as dst:
        for item in src.infolist():
            content = src.read(item.filename)
            if item.filename == "config.json":
                text = content.decode().replace('"/device:CPU:0"', '"/device:GPU:0"')
                content = text.replace('"/device:CPU:1"', '"/device:GPU:1"').encode()
                assert "GPU:1" in json.dumps(json.loads(content))
            dst.writestr(item, content)
    with pytest.warns(UserWarning, match="not available here"):
        loaded = keras.models.load_model(str(edited))
    core = keras_parallel.replicas(loaded)
    assert core.devices == ["/device:GPU:0", "/device:GPU:1"]  # what was saved is kept
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        assert core.placement == ["/device:CPU:0", "/device:CPU:0"]
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), parallel.predict(x, verbose=0), atol=1e-6
    )


def test_template_checkpoint_writes_the_template(tmp_path):
    x, y = data(12)
    template = mlp()
    parallel = DataParallel(template, devices=CPU2)
    parallel.compile("sgd", "mse")
    path = str(tmp_path / "ckpt-{epoch}.keras")
    checkpoint = keras_parallel.callbacks.TemplateCheckpoint(path, monitor="loss")
    parallel.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[checkpoint])
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1.keras", "ckpt-2.keras"]
    saved = keras.models.load_model(str(tmp_path / "ckpt-2.keras"))
    assert not any(isinstance(layer, keras_parallel.ParallelReplicas) for layer in saved.layers)
    assert saved.name == template.name
    assert_weights_close(saved.get_weights(), template.get_weights(), rtol=0, atol=0)


def test_model_from_the_other_keras_flavour_is_named_as_such():
    if IS_KERAS_3:
        other = pytest.importorskip("tf_keras")
    else:
        import keras as other  # Keras 3, while keras_parallel uses tf-keras
    inputs = other.Input((3,))
    model = other.Model(inputs, other.layers.Dense(2)(inputs))
    with pytest.raises(ValueError) as raised:
        DataParallel(model, devices=CPU2)
    message = str(raised.value)
    assert "Invalid value for argument `model`" in message
    assert ("comes from tf-keras" if IS_KERAS_3 else "comes from Keras 3") in message
    assert "TF_USE_LEGACY_KERAS" in message


def test_replicas_attributes_are_plain_python_values():
    parallel = DataParallel(mlp(), devices=CPU2, split=[2, 1])
    core = keras_parallel.replicas(parallel)
    for value in (core.ratios, core.devices, core.placement, core.split):
        assert type(value) is list
    assert repr(core.ratios) == "[2.0, 1.0]"


def test_core_layer_contract(tmp_path):
    from helpers import run_layer_contract

    x, _ = data(5)
    core = keras_parallel.replicas(DataParallel(mlp(), devices=CPU3, split=[2, 1, 1]))
    run_layer_contract(core, x, tmp_path)


def _weight_formats():
    if IS_KERAS_3:
        return ["model.weights.h5"]
    return ["model.h5", "ckpt"]


@pytest.mark.parametrize("filename", _weight_formats())
def test_weights_files_move_between_parallel_model_and_template(tmp_path, filename):
    x, y = data(8)
    template = mlp()
    parallel = DataParallel(template, devices=CPU2, split=[2, 1])
    parallel.compile("adam", "mse")
    parallel.fit(x, y, batch_size=4, epochs=1, verbose=0)
    trained = template.get_weights()

    # Parallel model -> a fresh template (a one-GPU inference machine).
    path = str(tmp_path / filename)
    parallel.save_weights(path)
    fresh = mlp(seed=5)
    fresh.load_weights(path)
    assert_weights_close(fresh.get_weights(), trained, rtol=0, atol=0)

    # A template's file -> the parallel model.
    other = mlp(seed=7)
    other_path = str(tmp_path / ("other_" + filename))
    other.save_weights(other_path)
    parallel.load_weights(other_path)
    assert_weights_close(template.get_weights(), other.get_weights(), rtol=0, atol=0)
    np.testing.assert_allclose(
        parallel.predict(x, verbose=0), other.predict(x, verbose=0), atol=1e-6
    )


@pytest.mark.skipif(not IS_KERAS_3, reason="tf-keras: activity losses are per-slice means")
def test_activity_regularizer_loss_is_the_single_device_one():
    # Keras divides activity regularization by the rows of the call; each slice's
    # share is weighed by its rows, so the loss is the whole batch's.
    def model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(8, activation="relu", activity_regularizer="l2")(inputs)
        return keras.Model(inputs, keras.layers.Dense(3)(hidden))

    x, y = data(7)
    template = model()
    template.compile("sgd", "mse")
    expected = template.evaluate(x, y, batch_size=7, verbose=0)
    parallel = DataParallel(model(), devices=CPU3, split=[3, 2, 1])
    parallel.compile("sgd", "mse")
    got = parallel.evaluate(x, y, batch_size=7, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_weights_file_in_the_old_parallel_layout_still_loads(tmp_path):
    # keras_parallel 0.1 returned a plain functional model, whose weights files
    # had the parallel model's layout.
    from keras_parallel.parallel_model import ParallelModel

    x, _ = data(4)
    source = DataParallel(mlp(seed=3), devices=CPU2)
    path = str(tmp_path / ("old.weights.h5" if IS_KERAS_3 else "old.h5"))
    super(ParallelModel, source).save_weights(path)  # the plain functional layout
    target = DataParallel(mlp(seed=4), devices=CPU2)
    target.load_weights(path)
    np.testing.assert_allclose(
        target.predict(x, verbose=0), source.predict(x, verbose=0), atol=1e-6
    )
