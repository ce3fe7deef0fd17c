"""Backend-neutral tensor helpers: `keras.ops` on Keras 3, TensorFlow on tf-keras."""

from __future__ import annotations

from keras_parallel._compat import IS_KERAS_3, keras

if IS_KERAS_3:
    ops = keras.ops
    map_structure = keras.tree.map_structure
    flatten = keras.tree.flatten
    pack_sequence_as = keras.tree.pack_sequence_as

    def batch_size(x):
        static = x.shape[0]
        return int(static) if static is not None else ops.shape(x)[0]

    def slice_rows(x, start, stop):
        shape = ops.shape(x)
        return ops.slice(x, [start] + [0] * (len(shape) - 1), [stop - start, *shape[1:]])

    def concatenate(parts):
        return ops.concatenate(list(parts), axis=0)

    def ceil_boundary(batch, numerator, denominator, tolerance):
        value = ops.ceil(ops.cast(batch, "float64") * numerator / denominator - tolerance)
        return ops.minimum(ops.cast(value, "int32"), ops.cast(batch, "int32"))

    greater = ops.greater
    cond = ops.cond

    def empty_rows(shape, dtype):
        return ops.zeros((0, *shape), dtype=dtype)

else:
    from keras_parallel._tensorflow.ops import (  # noqa: F401
        batch_size,
        ceil_boundary,
        concatenate,
        cond,
        empty_rows,
        flatten,
        greater,
        map_structure,
        pack_sequence_as,
        slice_rows,
    )
