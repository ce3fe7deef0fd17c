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


def dtype_name(x) -> str:
    return tf.as_dtype(x.dtype).name


def static_shape(x) -> list:
    return x.shape.as_list()


def cast(x, dtype):
    return tf.cast(x, dtype)


def reshape(x, shape):
    return tf.reshape(x, shape)


def maximum(a, b):
    return tf.maximum(a, b)


def sum_over(x, axes):
    return tf.reduce_sum(x, axis=axes)


def count_over(x, axes, dtype):
    """How many values of `x` each reduction over `axes` sums (one per channel)."""
    shape = tf.shape(x)
    return tf.cast(tf.reduce_prod(tf.gather(shape, axes)), dtype)


def broadcast_like(w, x):
    return tf.broadcast_to(w, tf.shape(x))


def constant(values):
    return tf.constant(values, dtype=tf.float32)


def expand_last(x):
    return tf.expand_dims(x, -1)


def min_of(values):
    return tf.reduce_min(tf.stack([tf.cast(v, tf.int32) for v in values]))


def where_positive(total, new, old):
    return tf.where(total > 0, new, old)


def batch_normalization(x, mean, variance, keep_shape, channels, layer, device=None):
    """`x` normalised as `layer` does in training, with the given moments (per channel).

    `device` is unused: TensorFlow reads the layer's variables from any device."""
    rank = len(x.shape)
    gamma = keep_shape(tf.cast(layer.gamma, x.dtype), rank, channels) if layer.scale else None
    beta = keep_shape(tf.cast(layer.beta, x.dtype), rank, channels) if layer.center else None
    outputs = tf.nn.batch_normalization(
        x,
        keep_shape(mean, rank, channels),
        keep_shape(variance, rank, channels),
        beta,
        gamma,
        layer.epsilon,
    )
    return tf.cast(outputs, layer.compute_dtype)


def in_replicas_that_sync() -> bool:
    """True inside a replica context of a `tf.distribute` strategy with several replicas."""
    context = tf.distribute.get_replica_context()
    return context is not None and context.num_replicas_in_sync > 1


def cross_replica_sum(values: list) -> list:
    """`values` summed over the replicas of a `tf.distribute` strategy (as they are outside one).

    Inside a replica context of several replicas (MultiWorkerMirroredStrategy,
    MirroredStrategy), an all-reduce; else `values` unchanged.
    """
    if not in_replicas_that_sync():
        return list(values)
    context = tf.distribute.get_replica_context()
    return list(context.all_reduce(tf.distribute.ReduceOp.SUM, list(values)))
