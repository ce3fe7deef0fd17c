"""DataParallel on every Keras 3 backend (TensorFlow, JAX, torch) and on tf-keras.

Backend-neutral: this file imports no TensorFlow, JAX or torch of its own and
runs in every flavour of the suite (`tests/run_flavours.py`). Devices: the
logical CPUs of TensorFlow, the host devices of JAX
(`XLA_FLAGS=--xla_force_host_platform_device_count`), or torch's one CPU, where
the replicas share the device (the slicing, the stand-ins for empty slices and
the merge are the same code).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_weights_close

import keras_parallel
from keras_parallel import DataParallel
from keras_parallel._compat import backend_name, keras
from keras_parallel.devices import list_devices
from keras_parallel.layers.parallel_replicas import ParallelReplicas


def _cpus():
    return [d for d in list_devices() if ":CPU:" in d]


def _parallel(template, count, split=None):
    """A DataParallel model over `count` CPU devices (torch: one CPU, shared)."""
    cpus = _cpus()
    if len(cpus) >= count:
        return DataParallel(template, devices=cpus[:count], split=split)
    if backend_name() != "torch":
        pytest.skip(f"needs {count} CPU devices, found {cpus}")
    inputs = keras.Input(tuple(template.inputs[0].shape)[1:])
    core = ParallelReplicas(template, devices=[cpus[0]] * count, ratios=split)
    return keras.Model(inputs, core(inputs))


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(16, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="mlp")


def conv(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 3))
    x = keras.layers.Conv1D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="conv")


def data(shape, n, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    return x, rng.normal(size=(n, 3)).astype("float32")


def _numpy(value):
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
    return np.asarray(value)


@pytest.mark.parametrize("count, split", [(2, None), (3, [3, 1, 1])])
@pytest.mark.parametrize("build", [mlp, conv])
def test_every_batch_size_predicts_and_trains_like_the_template(build, count, split):
    if build is conv and backend_name() == "tensorflow":
        # The same model on the same splits, every batch size through direct calls,
        # predict, evaluate and fit: test_empty_slices.py::test_conv1d_every_batch_size.
        pytest.skip("on TensorFlow, test_empty_slices.py runs this model on these splits")
    template = build()
    shape = tuple(template.inputs[0].shape)[1:]
    initial = template.get_weights()
    x, y = data(shape, 2 * count + 1)
    template.compile(keras.optimizers.SGD(0.05), "mse")
    expected_predict = template.predict(x, verbose=0)
    template.fit(x, y, batch_size=count + 1, epochs=2, shuffle=False, verbose=0)
    expected = template.get_weights()

    template.set_weights(initial)
    parallel = _parallel(template, count, split)
    for rows in range(1, 2 * count + 2):  # direct calls, 1 .. 2n + 1 rows
        np.testing.assert_allclose(
            _numpy(parallel(x[:rows])), _numpy(template(x[:rows])), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(
        parallel.predict(x, batch_size=count - 1 or 1, verbose=0), expected_predict, atol=1e-6
    )
    parallel.compile(keras.optimizers.SGD(0.05), "mse")
    parallel.fit(x, y, batch_size=count + 1, epochs=2, shuffle=False, verbose=0)
    assert_weights_close(template.get_weights(), expected, rtol=1e-5, atol=1e-6)


def test_save_load_and_unwrap(tmp_path):
    x, _ = data((6,), 5)
    template = mlp()
    parallel = DataParallel(template, devices=_cpus()[:1])
    assert keras_parallel.unwrap(parallel) is template
    path = str(tmp_path / "parallel.keras")
    parallel.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), parallel.predict(x, verbose=0), atol=1e-6
    )
    weights = str(tmp_path / "template.weights.h5")
    parallel.save_weights(weights)
    fresh = mlp(seed=3)
    fresh.load_weights(weights)
    assert_weights_close(fresh.get_weights(), template.get_weights(), rtol=0, atol=0)


def test_loading_without_the_import_says_to_import_it(tmp_path):
    import os
    import subprocess
    import sys

    template = mlp()
    parallel = DataParallel(template, devices=_cpus()[:1])
    path = str(tmp_path / "parallel.keras")
    parallel.save(path)
    script = (
        "import os\n"
        "if os.environ.get('TF_USE_LEGACY_KERAS'):\n"
        "    import tf_keras as keras\n"
        "else:\n"
        "    import keras\n"
        "try:\n"
        f"    keras.models.load_model({path!r})\n"
        "except Exception as error:\n"
        "    print(str(error)[:2000])\n"
        "import sys\n"
        "print('keras_parallel' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ)
    )
    message = result.stdout
    assert "ParallelModel" in message
    assert "run `import keras_parallel` before loading it" in message
    assert "custom_objects=keras_parallel.custom_objects()" in message
    assert message.strip().endswith("False")  # the message came without keras_parallel
    loaded = keras.models.load_model(path)  # with the import it loads (the hint is ignored)
    assert type(loaded).__name__ == "ParallelModel"
    assert list(loaded.get_config())[0] == "keras_parallel"  # and is saved again, first


def test_devices_are_listed_in_canonical_form():
    devices = list_devices()
    assert devices and all(d.startswith("/device:") for d in devices)
    assert "/device:CPU:0" in devices


@pytest.mark.skipif(backend_name() != "jax", reason="JAX's SPMD layout")
def test_jax_each_device_computes_its_own_block():
    import re

    import jax

    template = mlp()
    parallel = _parallel(template, 3, [3, 1, 1])
    x, _ = data((6,), 7)  # slices of 5, 1 and 1 rows: blocks of 5 rows per device
    params = [v.value for v in parallel.trainable_variables]
    forward = jax.jit(lambda p, t: parallel.stateless_call(p, [], t)[0])
    compiled = forward.lower(params, x).compile()
    assert len(compiled.output_shardings.device_set) == 3
    dots = set(re.findall(r"f32\[(\d+),16\]\{[^}]*\} dot", compiled.as_text()))
    assert dots == {"5"}  # each device: its block of 5 rows, not the padded 15
    np.testing.assert_allclose(_numpy(forward(params, x)), _numpy(template(x)), atol=1e-6)


@pytest.mark.skipif(backend_name() != "jax", reason="JAX's SPMD layout")
def test_jax_under_a_distribution_each_device_computes_its_own_block(
    jax_data_parallel_distribution,
):
    import re

    import jax

    template = mlp()
    parallel = _parallel(template, 3, [2, 1, 1])
    x, _ = data((6,), 12)  # slices of 6, 3 and 3 rows: blocks of 6 rows per device
    sharding = jax_data_parallel_distribution.get_data_layout(x.shape).backend_layout
    x = jax.device_put(x, sharding)  # as Keras lays out the batch: 4 rows a device
    params = [v.value for v in parallel.trainable_variables]
    forward = jax.jit(lambda p, t: parallel.stateless_call(p, [], t)[0])
    compiled = forward.lower(params, x).compile()
    dots = set(re.findall(r"f32\[(\d+),16\]\{[^}]*\} dot", compiled.as_text()))
    assert dots == {"6"}  # not the even 4 rows, nor the padded 18
    expected = template(np.asarray(x))
    np.testing.assert_allclose(_numpy(forward(params, x)), _numpy(expected), atol=1e-6)


@pytest.mark.skipif(backend_name() != "jax", reason="JAX's SPMD layout")
def test_jax_distributed_blocks_keep_each_process_rows_on_its_devices():
    from types import SimpleNamespace

    from keras_parallel._backend.jax.replicas import _distributed_arrangement

    # 2 processes x 2 devices, mesh in id order; 8 global rows (4 a process),
    # each process cut 3:1 over its devices, blocks of 3 padded with its first row.
    devices = [
        SimpleNamespace(id=i, process_index=p) for i, p in ((0, 0), (1, 0), (2048, 1), (2049, 1))
    ]
    mesh = SimpleNamespace(devices=np.array(devices, dtype=object))
    take, back = _distributed_arrangement(mesh, [3, 1], ["/device:CPU:0", "/device:CPU:1"], 8)
    assert take.tolist() == [0, 1, 2, 3, 0, 0, 4, 5, 6, 7, 4, 4]
    assert back.tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    # DataParallel's devices listed the other way round: the 3 rows go to device 1.
    take, _ = _distributed_arrangement(mesh, [3, 1], ["/device:CPU:1", "/device:CPU:0"], 8)
    assert take.tolist() == [3, 0, 0, 0, 1, 2, 7, 4, 4, 4, 5, 6]


def _concrete(value):
    """The array under `jax.grad`'s tracers (outside a jit they wrap concrete arrays)."""
    while hasattr(value, "primal"):
        value = value.primal
    return value


def _record_slice_calls(monkeypatch):
    """Records (device, rows, devices of the outputs) of each per-device program call."""
    import jax

    from keras_parallel._backend.jax import replicas as jax_replicas

    calls = []
    original = jax_replicas.SliceCalls.call

    def call(self, layer, args, kwargs, device, index):
        outputs, loss = original(self, layer, args, kwargs, device, index)
        rows = int(jax.tree_util.tree_leaves(args)[0].shape[0])
        leaves = jax.tree_util.tree_leaves(outputs)
        placed = {str(d) for leaf in leaves for d in _concrete(leaf).devices()}
        calls.append((layer.name, device, rows, placed))
        return outputs, loss

    monkeypatch.setattr(jax_replicas.SliceCalls, "call", call)
    return calls


@pytest.mark.skipif(backend_name() != "jax", reason="JAX's per-device programs")
def test_jax_unequal_split_runs_each_device_on_its_own_rows(monkeypatch):
    template = mlp()
    initial = template.get_weights()
    x, y = data((6,), 7)
    template.compile(keras.optimizers.SGD(0.05), "mse")
    template.fit(x, y, batch_size=7, epochs=2, shuffle=False, verbose=0)
    expected = template.get_weights()

    template.set_weights(initial)
    parallel = _parallel(template, 3, [3, 1, 1])
    parallel.compile(keras.optimizers.SGD(0.05), "mse")
    assert parallel.jit_compile is False  # "auto": the step dispatches one program per device
    calls = _record_slice_calls(monkeypatch)
    parallel.fit(x, y, batch_size=7, epochs=2, shuffle=False, verbose=0)
    # slices of 5, 1 and 1 rows, each computed on its own device, no padding
    assert [(device, rows) for _, device, rows, _ in calls[:3]] == [
        ("/device:CPU:0", 5),
        ("/device:CPU:1", 1),
        ("/device:CPU:2", 1),
    ]
    assert [len(placed) for *_, placed in calls[:3]] == [1, 1, 1]
    assert len({next(iter(placed)) for *_, placed in calls[:3]}) == 3  # three devices
    assert_weights_close(template.get_weights(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        parallel.evaluate(x, y, batch_size=7, verbose=0),
        template.evaluate(x, y, batch_size=7, verbose=0),
        rtol=1e-5,
    )


@pytest.mark.skipif(backend_name() != "jax", reason="JAX's per-device programs")
def test_jax_unequal_split_is_saved_and_loaded_with_its_programs(tmp_path, monkeypatch):
    template = mlp()
    parallel = _parallel(template, 2, [2, 1])
    parallel.compile(keras.optimizers.SGD(0.05), "mse")
    x, y = data((6,), 6)
    parallel.fit(x, y, batch_size=6, epochs=1, verbose=0)
    path = str(tmp_path / "parallel.keras")
    parallel.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.jit_compile is False
    calls = _record_slice_calls(monkeypatch)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), _numpy(template(x)), rtol=1e-5, atol=1e-6
    )
    assert [rows for *_, rows, _ in calls[:2]] == [4, 2]  # 6 rows cut 2:1
    loaded.fit(x, y, batch_size=6, epochs=1, verbose=0)  # trains on, per device


@pytest.mark.skipif(backend_name() != "jax", reason="JAX's per-device programs")
def test_jax_jit_compile_keeps_the_padded_program_only_when_asked(monkeypatch):
    even = _parallel(mlp(), 2)
    even.compile("sgd", "mse")
    assert even.jit_compile is True  # the even split: one SPMD program
    asked = _parallel(mlp(), 2, [2, 1])
    asked.compile("sgd", "mse", jit_compile=True)
    assert asked.jit_compile is True  # asked for one program: the padded SPMD one
    calls = _record_slice_calls(monkeypatch)
    x, y = data((6,), 6)
    asked.fit(x, y, batch_size=6, epochs=1, verbose=0)
    assert calls == []


@pytest.mark.skipif(backend_name() != "jax", reason="JAX's per-device programs")
def test_jax_slices_draw_their_own_dropout_masks_and_the_seed_moves_once():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    dropout = keras.layers.Dropout(0.5)
    template = keras.Model(inputs, dropout(inputs))
    parallel = _parallel(template, 2, [2, 1])
    (state,) = [v for v in template.non_trainable_variables if "seed" in v.name]
    before = _numpy(state.value).copy()
    out = _numpy(parallel(np.ones((3, 64), "float32"), training=True))
    assert not np.array_equal(out[0] == 0, out[2] == 0)  # slice 0 and slice 1 differ
    after = _numpy(state.value)
    template(np.ones((3, 64), "float32"), training=True)  # one call moves it once more
    assert (after - before).tolist() == (_numpy(state.value) - after).tolist()


@pytest.mark.skipif(backend_name() != "jax", reason="JAX's per-device programs")
def test_jax_auto_plans_each_device_by_its_own_rows_as_plan_does():
    from keras_parallel import _backend
    from keras_parallel.callbacks import GradientAccumulation

    template = mlp()
    parallel = _parallel(template, 2, [2, 1])
    peak = _backend.probes.peak_probe(template, "/device:CPU:0")
    limit = peak(5)  # the first device fits 5 rows of its own at margin 1
    planned = keras_parallel.plan(
        parallel, 12, micro_batch_size="auto", memory_budget=limit, memory_margin=1.0
    )
    x, y = data((6,), 12)
    parallel.compile(keras.optimizers.SGD(0.05), "mse")
    callback = GradientAccumulation("auto", memory_budget=limit, memory_margin=1.0)
    parallel.fit(x, y, batch_size=12, epochs=1, verbose=0, callbacks=[callback])
    assert planned.rows_computed == planned.rows_per_device  # no padding counted
    assert planned.rows_per_device[0] <= 5 < 8  # accumulates: 12 rows cut 8 + 4 do not fit
    assert callback.micro_batch_size_ == planned.micro_batch_size


def test_one_device_trains_like_the_template_and_skips_its_layers_where_steps_are_eager(
    monkeypatch,
):
    """Over one device on torch (eager steps) the model's call goes straight to the template:
    the graph's own layers would cost every step. Same predictions and weights as the template."""
    from keras_parallel import _backend

    template = mlp()
    initial = template.get_weights()
    x, y = data((6,), 12)
    template.compile(keras.optimizers.SGD(0.05), "mse")
    expected_predict = template.predict(x, verbose=0)
    template.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    expected = template.get_weights()
    template.set_weights(initial)
    parallel = DataParallel(template, devices=_cpus()[:1])
    parallel.compile(keras.optimizers.SGD(0.05), "mse")
    through_layer = []
    original = ParallelReplicas.__call__

    def counted(self, *args, **kwargs):
        through_layer.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ParallelReplicas, "__call__", counted)
    np.testing.assert_allclose(parallel.predict(x, verbose=0), expected_predict, atol=1e-6)
    parallel.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert_weights_close(template.get_weights(), expected, rtol=1e-5, atol=1e-6)
    if _backend.devices.EAGER_STEPS:
        assert through_layer == []  # 6 steps and a predict, none through the graph's layers
