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
from collections.abc import Iterable

from keras_parallel import _validation

_TOLERANCE = 1e-9

__all__ = [
    "accumulation_steps",
    "micro_batch_sizes",
    "fit_peak_line",
    "least_squares_line",
    "largest_fitting_micro_batch",
    "plan_micro_batch_size",
    "probe_sizes",
    "refine_micro_batch_size",
]


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
    batch_size = _validation.validate_non_negative_int(batch_size, "batch_size")
    micro_batch_size = _validation.validate_positive_int(micro_batch_size, "micro_batch_size")
    num_replicas = _validation.validate_positive_int(num_replicas, "num_replicas")
    return -(-batch_size // (num_replicas * micro_batch_size))


def micro_batch_sizes(batch_size: int, rows_per_step: int) -> list[int]:
    """Row counts of the micro-batches a batch is cut into, in order.

    Every micro-batch holds ``rows_per_step`` rows except the last, which holds
    the remainder. The shares ``size / batch_size`` sum to 1; they are the weights
    of the micro-batch losses.
    """
    batch_size = _validation.validate_non_negative_int(batch_size, "batch_size")
    rows_per_step = _validation.validate_positive_int(rows_per_step, "rows_per_step")
    full, rest = divmod(batch_size, rows_per_step)
    return [rows_per_step] * full + ([rest] if rest else [])


def least_squares_line(points: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line ``peak = a + b * m`` through measured ``(m, peak)`` points.

    With one distinct size the line goes through the origin (``a = 0``), the
    cautious choice: all memory is taken to grow with the batch. The intercept
    may come out negative; `fit_peak_line` is the line the planner uses.

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
    if any(not m > 0 for m, _ in points):
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


def fit_peak_line(points: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """The memory line the planner uses: ``peak = a + b * m``, with ``a >= 0``.

    The least-squares line (`least_squares_line`) through measured
    ``(m, peak)`` points. Its intercept can come out negative when the peaks
    grow faster than the sizes at the few sizes measured (a workspace that only
    larger batches need): a line that claims less than nothing for a small
    batch. The intercept is then taken as 0, which keeps the slope and only
    raises the line, so the plan stays on the cautious side.

    Returns:
        ``(a, b)``: intercept in bytes (>= 0) and bytes per row.

    Raises:
        ValueError: when there is no point, or a size is not positive.
    """
    intercept, slope = least_squares_line(points)
    return max(0.0, intercept), slope


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
    _validation.validate_fraction(margin, "margin")
    max_size = _validation.validate_positive_int(max_size, "max_size", allow_none=True)
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
    batch_size = _validation.validate_positive_int(batch_size, "batch_size")
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


def refine_micro_batch_size(peak, estimate: int, budget: float, max_size: int) -> int:
    """Corrects a size planned from the line with exact figures: the largest that fits.

    For a `peak` that costs nothing to ask (JAX: XLA's memory analysis of the
    compiled step, which runs nothing), a binary search around the line's
    `estimate` for the largest ``m`` in ``[1, max_size]`` with
    ``peak(m) <= budget``, taking peaks as growing with ``m`` (``log2(max_size)``
    calls at most).

    Returns:
        An int in ``[1, max_size]`` (1 also when even one row does not fit).
    """
    estimate = max(1, min(int(estimate), max_size))
    if peak(estimate) <= budget:
        low, high = estimate, max_size  # low fits; search above it
    else:
        low, high = 0, estimate - 1  # estimate does not fit; search below it
    while low < high:
        middle = (low + high + 1) // 2
        if peak(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return max(1, low)
