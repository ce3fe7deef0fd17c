"""BatchSlice: slicing arithmetic (properties), shapes, dtypes, errors, serialization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_config_round_trip, assert_save_load_same_outputs
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_parallel
from keras_parallel import BatchSlice, slice_sizes
from keras_parallel._compat import keras

ratio_lists = st.lists(
    st.one_of(
        st.integers(1, 20).map(float),
        st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False),
    ),
    min_size=1,
    max_size=8,
)


def _check_size_properties(batch, ratios, sizes):
    assert sum(sizes) == batch
    assert all(s >= 0 for s in sizes)
    total = sum(ratios)
    for size, ratio in zip(sizes, ratios, strict=True):
        assert abs(size - batch * ratio / total) < 1 + 1e-6
    if len(set(ratios)) == 1:
        assert max(sizes) - min(sizes) <= 1


@given(batch=st.integers(0, 400), ratios=ratio_lists)
def test_slice_sizes_properties(batch, ratios):
    sizes = slice_sizes(batch, ratios)
    _check_size_properties(batch, ratios, sizes)
    assert sizes == slice_sizes(batch, ratios)  # deterministic


@given(batch=st.integers(0, 300), ratios=ratio_lists)
def test_eager_slices_concatenate_to_input(batch, ratios):
    x = np.arange(batch * 3, dtype="int64").reshape(batch, 3)
    pieces = [np.asarray(BatchSlice(index=i, ratios=ratios)(x)) for i in range(len(ratios))]
    _check_size_properties(batch, ratios, [len(p) for p in pieces])
    np.testing.assert_array_equal(np.concatenate(pieces, axis=0), x)


@settings(max_examples=15)  # each example traces a tf.function
@given(batch=st.integers(0, 300), ratios=ratio_lists)
def test_unknown_batch_in_tf_function_matches_static_rule(batch, ratios):
    layers = [BatchSlice(index=i, ratios=ratios) for i in range(len(ratios))]

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    def cut(x):
        return [layer(x) for layer in layers]

    x = np.random.default_rng(batch).random((batch, 2)).astype("float32")
    pieces = [p.numpy() for p in cut(x)]
    assert [len(p) for p in pieces] == slice_sizes(batch, ratios)
    np.testing.assert_array_equal(np.concatenate(pieces, axis=0), x)


def test_equal_slices_like_mirrored_strategy():
    assert slice_sizes(7, [1, 1, 1, 1]) == [2, 2, 2, 1]
    assert [len(BatchSlice(index=i, num_slices=3)(np.zeros((7, 1)))) for i in range(3)] == [
        3,
        2,
        2,
    ]
    assert slice_sizes(32, [2, 1]) == [22, 10]


def test_batch_smaller_than_slices_gives_empty_slices():
    x = np.ones((1, 5, 2), "float32")
    pieces = [BatchSlice(index=i, num_slices=3)(x) for i in range(3)]
    assert [tuple(p.shape) for p in pieces] == [(1, 5, 2), (0, 5, 2), (0, 5, 2)]


@pytest.mark.parametrize(
    "value",
    [
        np.arange(5, dtype="int32"),
        np.arange(10, dtype="float64").reshape(5, 2),
        np.ones((5, 2, 3, 4), "float16"),
        np.array([True, False, True, True, False]),
        np.array([b"a", b"b", b"c", b"d", b"e"]),
    ],
)
def test_any_rank_and_dtype_kept(value):
    out = BatchSlice(index=1, ratios=[3, 2])(value)
    assert tf.as_dtype(out.dtype) == tf.as_dtype(value.dtype)
    np.testing.assert_array_equal(np.asarray(out), value[3:])


def test_nested_inputs_sliced_alike():
    x = {"a": np.arange(6).reshape(6, 1), "b": np.arange(12).reshape(6, 2)}
    out = BatchSlice(index=0, num_slices=2)(x)
    np.testing.assert_array_equal(np.asarray(out["a"]), x["a"][:3])
    np.testing.assert_array_equal(np.asarray(out["b"]), x["b"][:3])


def test_symbolic_output_shape():
    inputs = keras.Input((4, 3))
    assert tuple(BatchSlice(index=0, num_slices=2)(inputs).shape) == (None, 4, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"index": 2, "num_slices": 2}, "`index`"),
        ({"index": -1, "num_slices": 2}, "`index`"),
        ({"index": 0}, "exactly one of"),
        ({"index": 0, "num_slices": 2, "ratios": [1, 1]}, "exactly one of"),
        ({"index": 0, "num_slices": 0}, "`num_slices`"),
        ({"index": 0, "ratios": []}, "`ratios`"),
        ({"index": 0, "ratios": [1, 0]}, "`ratios`"),
        ({"index": 0, "ratios": [1, -2]}, "`ratios`"),
        ({"index": 0, "ratios": [1, math.nan]}, "`ratios`"),
        ({"index": 0, "ratios": [1, math.inf]}, "`ratios`"),
        ({"index": 0, "ratios": "11"}, "`ratios`"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchSlice(**kwargs)


def test_scalar_input_raises():
    with pytest.raises(ValueError, match="rank >= 1"):
        BatchSlice(index=0, num_slices=1)(np.float32(3.0))


@pytest.mark.parametrize("kwargs", [{"num_slices": 3}, {"ratios": [2.0, 1.0, 0.5]}])
def test_config_round_trip_and_save_load(kwargs, tmp_path):
    layer = BatchSlice(index=1, name="cut", **kwargs)
    clone = assert_config_round_trip(layer)
    assert clone.index == 1
    inputs = keras.Input((3,))
    model = keras.Model(inputs, BatchSlice(index=1, **kwargs)(inputs))
    x = np.arange(21, dtype="float32").reshape(7, 3)
    assert_save_load_same_outputs(model, x, tmp_path)
    assert_save_load_same_outputs(
        model, x, tmp_path, custom_objects=keras_parallel.custom_objects()
    )


@pytest.mark.parametrize(
    "kwargs, rows", [({"index": 0, "num_slices": 2}, 5), ({"index": 2, "ratios": [1, 1, 3]}, 7)]
)
def test_layer_contract(kwargs, rows, tmp_path):
    from helpers import run_layer_contract

    x = np.arange(rows * 4, dtype="float32").reshape(rows, 4)
    mask = np.arange(rows * 4).reshape(rows, 4) % 3 > 0
    run_layer_contract(BatchSlice(**kwargs), x, tmp_path, mask=mask)


def test_masks_are_sliced_with_their_inputs_into_an_rnn(tmp_path):
    # Embedding(mask_zero=True) -> BatchSlice -> LSTM: the LSTM sees the mask of
    # its own rows (a wrong mask fails with a shape error or changes the output).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    lstm = keras.layers.LSTM(3)
    model = keras.Model(inputs, lstm(BatchSlice(index=1, num_slices=2)(embedded)))
    x = np.array([[1, 2, 0, 0, 0], [3, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    reference_inputs = keras.Input((5,), dtype="int32")
    reference = keras.Model(reference_inputs, lstm(model.layers[1](reference_inputs)))
    np.testing.assert_allclose(
        model.predict(x, verbose=0), reference.predict(x[2:], verbose=0), atol=1e-6
    )
    # The masked steps matter: the same row without its padding gives another output.
    assert not np.allclose(
        reference.predict(np.array([[1, 2, 0, 0, 0]]), verbose=0),
        reference.predict(np.array([[1, 2, 5, 5, 5]]), verbose=0),
    )
    assert_save_load_same_outputs(model, x, tmp_path)


def test_ratios_are_plain_python_values():
    layer = BatchSlice(index=0, ratios=[2, 1])
    assert type(layer.ratios) is list and layer.ratios == [2.0, 1.0]
    assert BatchSlice(index=0, num_slices=2).ratios is None
