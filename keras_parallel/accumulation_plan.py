"""Micro-batch arithmetic: accumulation step counts and memory-based planning.

Pure Python, no framework import, so that `GradientAccumulation(micro_batch_size="auto")`
and a later ``keras_parallel.plan()`` share one tested implementation.

Training memory grows about linearly with the number of rows a device processes at
once: ``peak(m) = a + b * m`` (``a``: weights, optimizer slots, workspace; ``b``: the
activations of one row). `fit_peak_line` fits that line through peaks measured at a
few small sizes, and `largest_fitting_micro_batch` picks the largest ``m`` with
``a + b * m <= margin * limit``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

_TOLERANCE = 1e-9

__all__ = [
    "accumulation_steps",
    "validate_micro_batch_size",
    "micro_batch_sizes",
    "fit_peak_line",
    "largest_fitting_micro_batch",
    "plan_micro_batch_size",
    "probe_sizes",
]


def _check_positive_int(name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a {kind} int. "
            f"Received: {name}={value!r}"
        )


def validate_micro_batch_size(value, allow_none: bool = False):
    """Checks a `micro_batch_size` argument: a positive int or "auto" (or None).

    Returns:
        The value, with integers (numpy's too) as a Python int.

    Raises:
        ValueError: naming the argument, what was expected and what came.
    """
    if value == "auto" or (allow_none and value is None):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        expected = 'None, a positive int or "auto"' if allow_none else 'a positive int or "auto"'
        raise ValueError(
            f"Invalid value for argument `micro_batch_size`. Expected {expected}. "
            f"Received: micro_batch_size={value!r}"
        )
    return int(value)


def accumulation_steps(batch_size: int, micro_batch_size: int, num_replicas: int = 1) -> int:
    """Number of micro-batch steps one batch takes.

    Each micro step feeds ``num_replicas * micro_batch_size`` rows (each of the
    ``num_replicas`` devices processes ``micro_batch_size`` rows), so a batch of
    ``batch_size`` rows takes ``ceil(batch_size / (num_replicas * micro_batch_size))``
    steps. An empty batch takes 0 steps.

    Args:
        batch_size: int. Rows in the batch, >= 0.
        micro_batch_size: int. Rows per device per micro step, >= 1.
        num_replicas: int. Devices the model splits each micro-batch over. Defaults to 1.

    Returns:
        The number of accumulation steps, an int.
    """
    _check_positive_int("batch_size", batch_size, allow_zero=True)
    _check_positive_int("micro_batch_size", micro_batch_size)
    _check_positive_int("num_replicas", num_replicas)
    return -(-batch_size // (num_replicas * micro_batch_size))


def micro_batch_sizes(batch_size: int, rows_per_step: int) -> list[int]:
    """Row counts of the micro-batches a batch is cut into, in order.

    Every micro-batch holds ``rows_per_step`` rows except the last, which holds
    the remainder. The shares ``size / batch_size`` sum to 1; they are the weights
    of the micro-batch losses.
    """
    _check_positive_int("batch_size", batch_size, allow_zero=True)
    _check_positive_int("rows_per_step", rows_per_step)
    full, rest = divmod(batch_size, rows_per_step)
    return [rows_per_step] * full + ([rest] if rest else [])


def fit_peak_line(points: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line ``peak = a + b * m`` through measured ``(m, peak)`` points.

    With one distinct size the line goes through the origin (``a = 0``), the
    cautious choice: all memory is taken to grow with the batch.

    Returns:
        ``(a, b)``: intercept in bytes and bytes per row.

    Raises:
        ValueError: when there is no point, or a size is not positive.
    """
    points = [(float(m), float(peak)) for m, peak in points]
    if not points:
        raise ValueError(
            "Invalid value for argument `points`. Expected at least one (size, peak) "
            "pair. Received: points=[]"
        )
    if any(m <= 0 for m, _ in points):
        raise ValueError(
            "Invalid value for argument `points`. Expected positive sizes. "
            f"Received: points={points!r}"
        )
    sizes = {m for m, _ in points}
    if len(sizes) == 1:
        m0 = points[0][0]
        return 0.0, sum(p for _, p in points) / len(points) / m0
    n = len(points)
    mean_m = sum(m for m, _ in points) / n
    mean_p = sum(p for _, p in points) / n
    var = sum((m - mean_m) ** 2 for m, _ in points)
    cov = sum((m - mean_m) * (p - mean_p) for m, p in points)
    slope = cov / var
    return mean_p - slope * mean_m, slope


def largest_fitting_micro_batch(
    intercept: float,
    slope: float,
    limit: float,
    margin: float = 0.8,
    max_size: int | None = None,
) -> int:
    """The largest ``m`` with ``intercept + slope * m <= margin * limit``.

    Args:
        intercept: float. Bytes used whatever the micro-batch size.
        slope: float. Bytes per row.
        limit: float. Device memory in bytes.
        margin: float in (0, 1]. Share of `limit` the plan may use. Defaults to 0.8.
        max_size: int or None. Upper bound (the batch); None for no bound.

    Returns:
        An int >= 1 (1 also when even one row does not fit: the smallest micro-batch
        is the best there is), at most `max_size`. A line that does not grow
        (``slope <= 0``) fits any size: `max_size` is returned.
    """
    if not 0 < margin <= 1:
        raise ValueError(
            "Invalid value for argument `margin`. Expected a float in (0, 1]. "
            f"Received: margin={margin!r}"
        )
    if max_size is not None:
        _check_positive_int("max_size", max_size)
    # A relative tolerance keeps float rounding (0.8 * 2000, a fitted slope of
    # 99.999999) from costing a row that fits exactly.
    budget = margin * limit * (1 + _TOLERANCE)
    if slope <= 0:
        if max_size is None:
            raise ValueError(
                "Memory does not grow with the micro-batch (slope <= 0), so a bound is "
                "needed. Expected `max_size`. Received: max_size=None"
            )
        return max_size
    size = math.floor((budget - intercept) / slope + _TOLERANCE)
    # Guard the float division: step down while the line says it does not fit.
    while size > 1 and intercept + slope * size > budget:
        size -= 1
    size = max(1, size)
    if max_size is not None:
        size = min(size, max_size)
    return size


def probe_sizes(batch_size: int) -> list[int]:
    """Small micro-batch sizes to measure for a batch: about 1/16, 1/8 and 1/4 of it."""
    _check_positive_int("batch_size", batch_size)
    return sorted({max(1, batch_size // d) for d in (16, 8, 4)})


def plan_micro_batch_size(
    points: Iterable[tuple[float, float]],
    limit: float,
    batch_size: int,
    margin: float = 0.8,
) -> int:
    """Plans the micro-batch size from measured peaks: fit the line, pick the largest fit.

    Args:
        points: iterable of ``(micro_batch_size, peak_bytes)``.
        limit: float. Device memory in bytes.
        batch_size: int. Rows per device in a batch: the plan never exceeds it.
        margin: float in (0, 1]. Share of `limit` the plan may use. Defaults to 0.8.

    Returns:
        The micro-batch size, an int in ``[1, batch_size]``.
    """
    intercept, slope = fit_peak_line(points)
    return largest_fitting_micro_batch(intercept, slope, limit, margin, max_size=batch_size)
