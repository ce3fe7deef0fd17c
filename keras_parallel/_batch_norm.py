"""BatchNormalization over several parts of a batch with the whole batch's moments.

A BatchNormalization layer in training normalises a batch of N rows with the
batch's mean and (biased) variance per channel, and moves its moving statistics
once with them. Here the batch is held in parts, one per device: each part's
sum and count are computed on its device, added on one device, and the mean
sent back; then the same for the squared deviations from that mean (two
passes: as exact as one device's own moments, also when |mean| >> std). Every
part is then normalised with the whole batch's moments, and the moving
statistics move once, by the rule of the Keras flavour in use:

- Keras 3: ``moving = moving * momentum + batch * (1 - momentum)``, with the
  biased variance;
- tf-keras: the same with the biased variance for a layer that is not fused,
  and with the unbiased one (``N / (N - 1)``) for a fused layer (4-D and 5-D
  inputs), as TensorFlow's fused kernel does.

Gradients flow through the sums, so they are the single-device gradients.
Under a `tf.distribute` strategy of several replicas (one per worker), the
sums are all-reduced over the replicas as well: the moments are the global
batch's.
Padding rows (JAX) and masked positions get weight 0: they are never counted.
"""

from __future__ import annotations

import contextlib

from keras_parallel import _backend, _ops
from keras_parallel._compat import IS_KERAS_3, keras
from keras_parallel.devices import device_scope as _device_scope

__all__ = ["is_batch_norm", "unsupported_reason", "normalize_parts"]


def device_scope(device):
    """`device_scope(device)`, or no placement for None (JAX's sharded batch)."""
    return contextlib.nullcontext() if device is None else _device_scope(device)


def is_batch_norm(layer) -> bool:
    """True for a Keras BatchNormalization layer (or a subclass of it)."""
    return isinstance(layer, keras.layers.BatchNormalization)


def unsupported_reason(layer) -> str | None:
    """Why `layer` cannot be normalised with the whole batch's moments, or None."""
    if getattr(layer, "renorm", False):
        return "renorm=True"
    if not IS_KERAS_3:
        if getattr(layer, "virtual_batch_size", None) is not None:
            return "virtual_batch_size is set"
        if getattr(layer, "adjustment", None) is not None:
            return "adjustment is set"
    if type(layer).call is not keras.layers.BatchNormalization.call:
        return f"{type(layer).__name__} overrides call()"
    return None


def _axes(layer, rank: int) -> tuple[list[int], list[int]]:
    """(channel axes, reduction axes) of `layer` for inputs of `rank` dimensions."""
    axis = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
    channels = sorted(a % rank for a in axis)
    return channels, [a for a in range(rank) if a not in channels]


def _compute_dtype(x) -> str:
    return "float64" if _ops.dtype_name(x) == "float64" else "float32"


def _keep_shape(stat, rank, channels):
    """`stat` (one value per channel) shaped to broadcast against an input of `rank` dims."""
    shape = [1] * rank
    for a, size in zip(channels, _ops.static_shape(stat), strict=True):
        shape[a] = size
    return _ops.reshape(stat, shape)


def normalize_parts(layer, parts, devices, weights=None, groups=None):
    """`layer` applied in training to a batch held in `parts`, with whole-batch moments.

    Args:
        layer: a built BatchNormalization layer (`unsupported_reason` is None).
        parts: the input of each part (same shape but for the rows).
        devices: the device of each part (None: no placement).
        weights: per part, None or a float tensor broadcastable to the part
            (rows first) with 1 for the rows and positions that count and 0 for
            padding rows or masked positions.
        groups: lists of part indices normalised together, each with its own
            moments and each moving the moving statistics once, in order.
            Defaults to one group of every part.

    Returns:
        The normalised parts, in the layer's compute dtype.
    """
    weights = weights or [None] * len(parts)
    groups = groups or [list(range(len(parts)))]
    stats_device = devices[0]  # where the parts' sums are added
    rank = len(_ops.static_shape(parts[0]))
    channels, reduce = _axes(layer, rank)
    dtype = _compute_dtype(parts[0])
    masked = any(w is not None for w in weights)
    outputs = [None] * len(parts)
    move = _backend.devices.move_to  # explicit moves where a backend needs them (JAX)
    for group in groups:
        xs, sums, counts = {}, [], []
        for k in group:
            with device_scope(devices[k]):
                x = _ops.cast(parts[k], dtype)
                xs[k] = x
                w = weights[k]
                if w is None:
                    sums.append(_ops.sum_over(x, reduce))
                    counts.append(_ops.count_over(x, reduce, dtype))
                else:
                    w = _ops.cast(w, dtype)
                    sums.append(_ops.sum_over(x * w, reduce))
                    counts.append(_ops.sum_over(_ops.broadcast_like(w, x), reduce))
        with device_scope(stats_device):
            counts = [move(c, stats_device) for c in counts]
            sums = [move(v, stats_device) for v in sums]
            # Over the replicas of a tf.distribute strategy too (one per worker).
            total, summed = _backend.cross_replica_sum([_ops.add_n(counts), _ops.add_n(sums)])
            divisor = _divisor(total, masked)
            mean = summed / divisor
        squares = []
        for k in group:
            with device_scope(devices[k]):
                centred = xs[k] - _keep_shape(move(mean, devices[k]), rank, channels)
                if weights[k] is not None:
                    centred = centred * _ops.cast(weights[k], dtype)
                squares.append(_ops.sum_over(centred * centred, reduce))
        with device_scope(stats_device):
            squares = [move(v, stats_device) for v in squares]
            (squared,) = _backend.cross_replica_sum([_ops.add_n(squares)])
            variance = squared / divisor
            _move(layer, mean, variance, total, stats_device)
        for k in group:
            with device_scope(devices[k]):
                outputs[k] = _ops.batch_normalization(
                    xs[k],
                    move(mean, devices[k]),
                    move(variance, devices[k]),
                    _keep_shape,
                    channels,
                    layer,
                    device=devices[k],
                )
    return outputs


def _divisor(total, masked):
    """What the sums are divided by: the count, as each flavour's own moments do.

    Keras 3 adds its epsilon to the count with a mask; without one the count is
    never 0 on one device, and 0 here only for an empty batch (then 1, so that
    nothing is NaN; the moving statistics do not move).
    """
    if masked and IS_KERAS_3:
        return total + keras.backend.epsilon()
    return _ops.maximum(total, 1.0)


def _move(layer, mean, variance, total, device=None):
    """Moves `layer`'s moving statistics once with the batch's moments (no move for 0 rows),
    computed on `device` (where the moments are)."""
    momentum = float(layer.momentum)
    if not IS_KERAS_3 and getattr(layer, "fused", False):
        variance = variance * total / _ops.maximum(total - 1.0, 1.0)
    for variable, value in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
        old = _backend.devices.move_to(_ops.cast(variable, _ops.dtype_name(value)), device)
        if IS_KERAS_3:
            new = old * momentum + value * (1.0 - momentum)
        else:
            new = old - (old - value) * (1.0 - momentum)
        new = _ops.where_positive(total, new, old)
        variable.assign(_ops.cast(new, variable.dtype))
