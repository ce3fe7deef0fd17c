"""The few tensor operations keras_parallel needs, for tf-keras (no `keras.ops`)."""

from __future__ import annotations

import tensorflow as tf

map_structure = tf.nest.map_structure
flatten = tf.nest.flatten
pack_sequence_as = tf.nest.pack_sequence_as


def batch_size(x):
    static = x.shape[0]
    return int(static) if static is not None else tf.shape(x)[0]


def slice_rows(x, start, stop):
    return x[start:stop]


def concatenate(parts):
    return tf.concat(parts, axis=0)


def ceil_boundary(batch, numerator, denominator, tolerance):
    value = tf.math.ceil(tf.cast(batch, tf.float64) * numerator / denominator - tolerance)
    return tf.minimum(tf.cast(value, tf.int32), tf.cast(batch, tf.int32))


def greater(a, b):
    return tf.greater(a, b)


def cond(pred, true_fn, false_fn):
    return tf.cond(pred, true_fn, false_fn)


def empty_rows(shape, dtype):
    return tf.zeros([0, *shape], dtype=dtype)


def zero_loss():
    return tf.zeros((), dtype=tf.float32)


def add_n(values):
    return tf.add_n(list(values))
