"""Shared test helpers (the Keras test base's round-trip checks)."""

from __future__ import annotations

import copy
import json

import numpy as np

from keras_parallel._compat import keras


def assert_config_round_trip(layer):
    """from_config(get_config()) gives a layer with the same JSON config."""
    config = layer.get_config()
    clone = layer.__class__.from_config(copy.deepcopy(config))  # from_config may pop keys
    assert json.dumps(clone.get_config(), sort_keys=True, default=str) == json.dumps(
        config, sort_keys=True, default=str
    )
    return clone


def assert_save_load_same_outputs(model, x, tmp_path, custom_objects=None, atol=1e-6):
    """save -> load_model -> equal predictions; returns the loaded model."""
    path = str(tmp_path / "model.keras")
    expected = model.predict(x, verbose=0)
    model.save(path)
    loaded = keras.models.load_model(path, custom_objects=custom_objects)
    got = loaded.predict(x, verbose=0)
    for a, b in zip(_flat(expected), _flat(got), strict=True):
        np.testing.assert_allclose(a, b, atol=atol)
    return loaded


def _flat(value):
    if isinstance(value, dict):
        return [value[k] for k in sorted(value)]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def assert_weights_close(actual, expected, rtol=1e-5, atol=1e-7):
    """Weights within `rtol` relative (atol guards entries that are ~0)."""
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def op_device_indices(concrete_function, op_type: str) -> set[int]:
    """Device indices of every `op_type` op in a traced function, nested functions included.

    The ops of `tf.cond` branches live in the graph's function library; their
    device placement is read from there too.
    """
    import tensorflow as tf

    graph_def = concrete_function.graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return {
        tf.DeviceSpec.from_string(node.device).device_index for node in nodes if node.op == op_type
    }


def run_layer_contract(layer, x, tmp_path, mask=None):
    """The contract every layer of the package meets (as Keras's `run_layer_test`).

    - symbolic: on a `keras.Input` with an unknown batch, the output's non-batch
      shape is the eager output's;
    - empty batch: 0 rows in give 0 rows out, same non-batch shape and dtype;
    - masking: with `supports_masking`, a mask comes out cut like the data
      (`mask`: a boolean array with the rows of `x`);
    - serialization: `from_config(get_config())` gives the same config, and a
      functional model around the layer saves and loads with equal outputs.
    """
    eager = np.asarray(layer(x))
    inputs = keras.Input(x.shape[1:], dtype=str(x.dtype))
    symbolic = layer(inputs)
    assert tuple(symbolic.shape)[1:] == eager.shape[1:]
    empty = np.asarray(layer(x[:0]))
    assert empty.shape == (0, *eager.shape[1:])
    assert empty.dtype == eager.dtype
    if mask is not None and getattr(layer, "supports_masking", False):
        import tensorflow as tf

        sliced = layer.compute_mask(tf.constant(x), tf.constant(mask))
        assert tuple(sliced.shape)[0] == eager.shape[0]
    assert_config_round_trip(layer)
    model = keras.Model(inputs, symbolic)
    assert_save_load_same_outputs(model, x, tmp_path)
