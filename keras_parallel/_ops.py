"""Backend-neutral tensor helpers: `keras.ops` on Keras 3, TensorFlow on tf-keras."""

from __future__ import annotations

from keras_parallel import _backend
from keras_parallel._compat import IS_KERAS_3, keras

#: Keras 3 can run a layer on given variable values (`keras.StatelessScope`);
#: `call_on_local_values` needs it.
HAS_STATELESS_SCOPE = IS_KERAS_3 and hasattr(keras, "StatelessScope")


def inside_xla_compilation() -> bool:
    """True while TensorFlow traces a function for XLA; False on other backends."""
    return _backend.inside_xla_compilation()


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

    def zero_loss():
        return ops.zeros((), dtype="float32")

    def add_n(values):
        total = values[0]
        for value in values[1:]:
            total = ops.add(total, value)
        return total

    def scale_by_ratio(value, numerator, denominator):
        ratio = ops.divide(ops.cast(numerator, "float32"), ops.cast(denominator, "float32"))
        return ops.multiply(value, ratio)

    def dtype_name(x) -> str:
        return keras.backend.standardize_dtype(x.dtype)

    def static_shape(x) -> list:
        return list(x.shape)

    cast = ops.cast
    reshape = ops.reshape
    maximum = ops.maximum

    def sum_over(x, axes):
        return ops.sum(x, axis=axes)

    def count_over(x, axes, dtype):
        """How many values of `x` each reduction over `axes` sums (one per channel)."""
        shape = ops.shape(x)
        count = ops.cast(shape[axes[0]], dtype)
        for axis in axes[1:]:
            count = count * ops.cast(shape[axis], dtype)
        return count

    def broadcast_like(w, x):
        return ops.broadcast_to(w, ops.shape(x))

    def constant(values):
        return ops.convert_to_tensor(values, dtype="float32")

    def expand_last(x):
        return ops.expand_dims(x, -1)

    def min_of(values):
        return ops.min(ops.stack([ops.cast(v, "int32") for v in values]))

    def where_positive(total, new, old):
        return ops.where(ops.greater(total, 0), new, old)

    def batch_normalization(x, mean, variance, keep_shape, channels, layer, device=None):
        """`x` normalised as `layer` does in training, with the given moments (per channel).

        `device`: where `x` is, for the backends that move values explicitly (JAX's
        per-device path); the layer's scale and offset are read there.
        """
        move = _backend.devices.move_to
        gamma = move(ops.cast(layer.gamma, x.dtype), device) if layer.scale else None
        beta = move(ops.cast(layer.beta, x.dtype), device) if layer.center else None
        outputs = ops.batch_normalization(
            x, mean, variance, axis=layer.axis, offset=beta, scale=gamma, epsilon=layer.epsilon
        )
        return ops.cast(outputs, layer.compute_dtype)

    def call_on_local_values(layer, args, kwargs):
        """Calls `layer(*args, **kwargs)` with its variables read as values on the current device.

        Each variable of `layer` is copied once onto the device in scope (the
        copy carries the gradient back to the variable), so nothing inside the
        call reaches into another device's variables: an XLA-compiled function
        inside the layer (Keras's grouped convolutions) cannot read a variable
        that lives on another device. Updates the call makes (BatchNormalization's
        moving statistics, random seeds) are applied to the variables afterwards,
        as a plain call would; losses it adds are returned, summed, with the
        outputs: `(outputs, loss)`.
        """
        variables = list(getattr(layer, "variables", None) or [])
        mapping = [(v, ops.copy(v)) for v in variables]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            given = {id(v): scope.get_current_value(v) for v in variables}
            outputs = layer(*args, **kwargs)
            losses = list(scope.losses)
        for variable in variables:
            value = scope.get_current_value(variable)
            if value is not given[id(variable)]:
                variable.assign(value)
        loss = add_n([ops.cast(x, "float32") for x in losses]) if losses else zero_loss()
        return outputs, loss

else:
    # tf-keras: the TensorFlow backend's helpers, through the backend seam.
    add_n = _backend.ops.add_n
    batch_normalization = _backend.ops.batch_normalization
    batch_size = _backend.ops.batch_size
    broadcast_like = _backend.ops.broadcast_like
    cast = _backend.ops.cast
    ceil_boundary = _backend.ops.ceil_boundary
    concatenate = _backend.ops.concatenate
    cond = _backend.ops.cond
    constant = _backend.ops.constant
    count_over = _backend.ops.count_over
    dtype_name = _backend.ops.dtype_name
    empty_rows = _backend.ops.empty_rows
    expand_last = _backend.ops.expand_last
    flatten = _backend.ops.flatten
    greater = _backend.ops.greater
    map_structure = _backend.ops.map_structure
    maximum = _backend.ops.maximum
    min_of = _backend.ops.min_of
    pack_sequence_as = _backend.ops.pack_sequence_as
    reshape = _backend.ops.reshape
    slice_rows = _backend.ops.slice_rows
    static_shape = _backend.ops.static_shape
    sum_over = _backend.ops.sum_over
    where_positive = _backend.ops.where_positive
    zero_loss = _backend.ops.zero_loss

    def call_on_local_values(layer, args, kwargs):  # pragma: no cover - Keras 3 only
        raise NotImplementedError("call_on_local_values needs keras.StatelessScope (Keras 3)")
