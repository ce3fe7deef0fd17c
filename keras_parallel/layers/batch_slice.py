"""The `BatchSlice` layer and the slicing arithmetic it documents."""

from __future__ import annotations

import math
from collections.abc import Sequence

from keras_parallel import _ops
from keras_parallel._compat import keras, register
from keras_parallel._validation import validate_positive_int, validate_ratios

__all__ = ["BatchSlice", "slice_boundaries", "slice_sizes"]


#: Slack against float64 rounding: equal but inexact ratios ([0.1, 0.1, 0.1])
#: must cut like [1, 1, 1]. A boundary is ceil(B * C_k / R - ROUNDING_TOLERANCE).
ROUNDING_TOLERANCE = 1e-7


def _cumulative(ratios: Sequence[float]) -> list[float]:
    total = 0.0
    cumulative = []
    for value in ratios:
        total += float(value)
        cumulative.append(total)
    return cumulative


def slice_boundaries(batch_size: int, ratios: Sequence[float]) -> list[int]:
    """Row boundaries of the slices of a batch: slice i is rows [b[i], b[i+1]).

    The rule (the one `BatchSlice` applies, in float64): with the cumulative
    ratios ``C_k = r_0 + ... + r_{k-1}`` and ``R = C_n``,
    ``b[0] = 0``, ``b[n] = B`` and ``b[k] = min(B, ceil(B * C_k / R - 1e-7))``
    (the 1e-7 absorbs float64 rounding, so `[0.1, 0.1, 0.1]` cuts like `[1, 1, 1]`).
    So every slice is within one row of its exact share ``B * r_i / R``,
    the sizes sum to B, equal ratios give sizes that differ by at most one
    (the first slices take the extra rows: 7 rows over 4 slices is 2, 2, 2, 1),
    and a batch smaller than the number of slices leaves the last slices empty.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(
            "Invalid value for argument `batch_size`. Expected a non-negative int. "
            f"Received: batch_size={batch_size!r}"
        )
    ratios = validate_ratios(ratios)
    cumulative = _cumulative(ratios)
    total = cumulative[-1]
    inner = [
        min(batch_size, math.ceil(batch_size * c / total - ROUNDING_TOLERANCE))
        for c in cumulative[:-1]
    ]
    return [0, *inner, batch_size]


def slice_sizes(batch_size: int, ratios: Sequence[float]) -> list[int]:
    """Sizes of the slices of a batch of `batch_size` rows; see `slice_boundaries`.

    Example:

    ```python
    import keras_parallel

    keras_parallel.slice_sizes(7, [1, 1, 1, 1])  # [2, 2, 2, 1]
    keras_parallel.slice_sizes(32, [12, 6])  # [22, 10]
    keras_parallel.slice_sizes(2, [1, 1, 1])  # [1, 1, 0]: the last slice is empty
    ```
    """
    bounds = slice_boundaries(batch_size, ratios)
    return [stop - start for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


@register
class BatchSlice(keras.layers.Layer):
    """Returns one slice of its input along the batch axis.

    A batch of B rows is cut into consecutive slices whose sizes are as equal as
    possible (`num_slices`) or proportional to `ratios`, and the layer returns
    slice `index`. With the cumulative ratios ``C_k = r_0 + ... + r_{k-1}`` and
    ``R = C_n``, slice i holds rows ``[b_i, b_{i+1})`` where ``b_0 = 0``,
    ``b_n = B`` and ``b_k = min(B, ceil(B * C_k / R - 1e-7))``, computed in
    float64 (the 1e-7 absorbs rounding, so `[0.1, 0.1, 0.1]` cuts like `[1, 1, 1]`).
    Hence: the sizes sum to B; each is within one row of its exact share
    ``B * r_i / R``; equal ratios give sizes that differ by at most one, the
    first slices taking the extra rows (7 rows over 4 slices: 2, 2, 2, 1, as
    `tf.distribute.MirroredStrategy` does); the result is deterministic; and a
    batch smaller than the number of slices gives empty slices of shape
    ``(0, ...)`` at the end instead of an error.

    B may be known only at run time (symbolic inputs, `tf.function` with an
    unknown batch size). The input may have any rank of at least one and any
    dtype (no autocasting), or be a nested structure of such tensors, all with
    the same batch size; each is sliced the same way.

    Args:
        index: int. Which slice to return, from 0 to the number of slices - 1.
        num_slices: int or None. Cut the batch into this many slices of
            (nearly) equal size. Give either `num_slices` or `ratios`.
            Defaults to `None`.
        ratios: sequence of positive, finite numbers, or None. Cut the batch
            into `len(ratios)` slices with sizes proportional to `ratios`
            (`[2, 1]` gives the first slice two thirds of the rows).
            Defaults to `None`.
        **kwargs: base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: a tensor of rank >= 1, or a nested structure of them.

    Returns:
        The rows of slice `index`, with the structure of `inputs`.

    Raises:
        ValueError: if `index` is out of range, if neither or both of
            `num_slices` and `ratios` are given, if `num_slices` is not a
            positive int, or if `ratios` is empty or holds a number that is not
            positive and finite.

    Example:

    ```python
    import numpy as np
    import keras_parallel

    x = np.arange(7)
    [keras_parallel.BatchSlice(index=i, num_slices=3)(x).shape[0] for i in range(3)]
    # [3, 2, 2]
    [keras_parallel.BatchSlice(index=i, ratios=[2, 1])(x).shape[0] for i in range(2)]
    # [5, 2]
    ```
    """

    def __init__(self, index, num_slices=None, ratios=None, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if (num_slices is None) == (ratios is None):
            raise ValueError(
                "Invalid arguments for `BatchSlice`. Expected exactly one of `num_slices` "
                f"and `ratios`. Received: num_slices={num_slices!r}, ratios={ratios!r}"
            )
        if num_slices is not None:
            num_slices = validate_positive_int(num_slices, "num_slices")
            resolved = [1.0] * num_slices
        else:
            resolved = validate_ratios(ratios)
        count = len(resolved)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(
                f"Invalid value for argument `index`. Expected an int from 0 to {count - 1}. "
                f"Received: index={index!r}"
            )
        self.index = index
        self.num_slices = num_slices
        self._given_ratios = None if ratios is None else tuple(resolved)
        self._ratios = tuple(resolved)
        self._cumulative = _cumulative(resolved)
        self.supports_masking = True

    @property
    def ratios(self) -> list[float] | None:
        """The `ratios` given (as floats), or None when `num_slices` was given."""
        return None if self._given_ratios is None else list(self._given_ratios)

    def _bounds(self, batch):
        if isinstance(batch, int):
            bounds = slice_boundaries(batch, self._ratios)
            return bounds[self.index], bounds[self.index + 1]
        total = self._cumulative[-1]
        last = len(self._ratios) - 1
        if self.index == 0:
            start = 0
        else:
            start = _ops.ceil_boundary(
                batch, self._cumulative[self.index - 1], total, ROUNDING_TOLERANCE
            )
        if self.index == last:
            stop = batch
        else:
            stop = _ops.ceil_boundary(
                batch, self._cumulative[self.index], total, ROUNDING_TOLERANCE
            )
        return start, stop

    def call(self, inputs):
        flat = _ops.flatten(inputs)
        if not flat:
            return inputs
        for tensor in flat:
            if len(tensor.shape) == 0:
                raise ValueError(
                    "`BatchSlice` expects inputs of rank >= 1 (a batch axis). "
                    f"Received a scalar input with shape {tuple(tensor.shape)}."
                )
        start, stop = self._bounds(_ops.batch_size(flat[0]))
        return _ops.map_structure(lambda t: _ops.slice_rows(t, start, stop), inputs)

    def compute_mask(self, inputs, mask=None):
        if mask is None or all(m is None for m in _ops.flatten(mask)):
            return None
        batch = _ops.batch_size(_ops.flatten(inputs)[0])
        if batch is None:
            # Keras 3, building a functional model: the batch size is unknown, so
            # no symbolic mask is recorded (the input's own mask would be fed,
            # unsliced, to the next layer). When the model runs, Keras asks this
            # method again with real tensors and passes the sliced mask on.
            return None
        start, stop = self._bounds(batch)
        return _ops.map_structure(
            lambda m: None if m is None else _ops.slice_rows(m, start, stop), mask
        )

    def compute_output_shape(self, input_shape):
        def one(shape):
            shape = tuple(shape)
            batch = shape[0]
            if batch is not None:
                bounds = slice_boundaries(int(batch), self._ratios)
                batch = bounds[self.index + 1] - bounds[self.index]
            return (batch, *shape[1:])

        if isinstance(input_shape, dict):
            return {k: one(v) for k, v in input_shape.items()}
        if (
            isinstance(input_shape, list | tuple)
            and input_shape
            and not (input_shape[0] is None or isinstance(input_shape[0], int))
        ):
            return type(input_shape)(one(s) for s in input_shape)
        return one(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "index": self.index,
            "num_slices": self.num_slices,
            "ratios": self.ratios,
        }
