"""`plan()`: what a DataParallel / GradientAccumulation run will do, before it runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from keras_parallel import accumulation_plan
from keras_parallel._compat import backend_name
from keras_parallel.devices import resolve_devices
from keras_parallel.layers.batch_slice import slice_sizes
from keras_parallel.probes import DeviceProbe

__all__ = ["Plan", "plan", "auto_micro_batch_size"]

MIB = 2**20


@dataclass
class Plan:
    """A training plan a person can read (`print(plan)`) and code can use.

    Attributes:
        batch_size: int. Rows `fit` hands the model per step.
        devices: list of str. One per slice.
        ratios: list of float. Slice weights, one per device.
        micro_batch_size: int or None. Rows per device per accumulation step
            (`GradientAccumulation`), None without accumulation.
        accumulation_steps: int. Micro steps per batch (1 without accumulation):
            ``ceil(batch_size / (len(devices) * micro_batch_size))``.
        rows_per_step: int. Rows of one micro step over all devices.
        rows_per_device: list of int. Rows each device computes at once (of
            the first, largest micro step).
        peak_bytes: list of int or None. Expected peak per device,
            ``a + b * rows`` from the measured line, where it could be measured.
        limit_bytes: list of int or None. What each device may use.
        fits: bool or None. Whether every expected peak is within
            ``margin * limit``; None when figures are missing (a CPU).
        margin: float. Share of each limit the plan may use.
        notes: list of str. How the figures were obtained.
    """

    batch_size: int
    devices: list[str]
    ratios: list[float]
    micro_batch_size: int | None
    accumulation_steps: int
    rows_per_step: int
    rows_per_device: list[int]
    peak_bytes: list[int | None]
    limit_bytes: list[int | None]
    fits: bool | None
    margin: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        def mib(value):
            return "?" if value is None else f"{value / MIB:,.0f}"

        lines = [
            f"Plan for batch {self.batch_size} on {len(self.devices)} device(s): "
            + (
                f"micro-batch {self.micro_batch_size} per device, "
                f"{self.accumulation_steps} accumulation step(s) of {self.rows_per_step} rows"
                if self.micro_batch_size is not None
                else "no accumulation"
            ),
            f"{'device':<16}{'ratio':>7}{'rows':>7}{'peak MiB':>11}{'limit MiB':>11}{'use':>7}",
        ]
        for i, device in enumerate(self.devices):
            peak, limit = self.peak_bytes[i], self.limit_bytes[i]
            use = "?" if peak is None or not limit else f"{peak / limit:.0%}"
            lines.append(
                f"{device:<16}{self.ratios[i]:>7.3g}{self.rows_per_device[i]:>7}"
                f"{mib(peak):>11}{mib(limit):>11}{use:>7}"
            )
        verdict = {True: "fits", False: "DOES NOT FIT", None: "unknown (no memory figures)"}
        lines.append(f"fits within {self.margin:.0%} of each limit: {verdict[self.fits]}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            "Invalid value for argument `batch_size`. Expected a positive int. "
            f"Received: batch_size={batch_size!r}"
        )


def _default_peak_probe(template, device: str) -> Callable[[int], int | None] | None:
    if backend_name() != "tensorflow":
        return None
    from keras_parallel._tensorflow.probes import measure_peak_bytes

    return lambda rows: measure_peak_bytes(template, device, rows)


def plan(
    model,
    batch_size: int,
    devices=None,
    split=None,
    micro_batch_size: None | int | str = None,
    *,
    memory_budget: int | None = None,
    memory_margin: float = 0.8,
    memory_probe: Callable[[int], int | None] | None = None,
    probe: DeviceProbe | None = None,
) -> Plan:
    """Plans a run: rows per device, accumulation steps, expected peak memory, fit.

    The arithmetic is the one `DataParallel` (slice sizes) and
    `GradientAccumulation` (micro steps, `"auto"`) apply, so the plan is what
    then happens.

    Args:
        model: a template model, or a `DataParallel` model (then its devices and
            ratios are used and `devices`/`split` must be None).
        batch_size: int. The `batch_size` given to `fit`.
        devices: as for `DataParallel`. Defaults to `None`.
        split: as for `DataParallel`. Defaults to `None`.
        micro_batch_size: None (no accumulation), an int (rows per device per
            micro step), or `"auto"` (the largest that fits each device's
            budget). Defaults to `None`.
        memory_budget: int or None. Bytes each device may use when its limit is
            unknown (a CPU). Defaults to `None`.
        memory_margin: float in (0, 1]. Share of each limit a plan may fill.
            Defaults to `0.8`.
        memory_probe: callable or None. ``memory_probe(rows) -> peak bytes`` of
            one training step of `rows` rows on one device. Defaults to the
            TensorFlow allocator's peak for a generated batch, where available.
        probe: `keras_parallel.probes.DeviceProbe` or None, for limits and
            measured splits. Defaults to `DeviceProbe()`.

    Returns:
        A `Plan`.

    Raises:
        ValueError: for a `batch_size` that is not a positive int, a bad
            `micro_batch_size`, `memory_margin` outside (0, 1], or arguments
            `DataParallel` would refuse.
    """
    from keras_parallel.parallel import _resolve_split, replicas, unwrap

    _check_batch_size(batch_size)
    micro_batch_size = accumulation_plan.validate_micro_batch_size(
        micro_batch_size, allow_none=True
    )
    if not 0 < memory_margin <= 1:
        raise ValueError(
            "Invalid value for argument `memory_margin`. Expected a float in (0, 1]. "
            f"Received: memory_margin={memory_margin!r}"
        )
    probe = probe or DeviceProbe()
    notes = []
    template = unwrap(model)
    if template is not model:
        core = replicas(model)
        if devices is not None or split is not None:
            raise ValueError(
                "Invalid arguments for `plan`. A DataParallel model brings its own devices "
                f"and split. Received: devices={devices!r}, split={split!r}"
            )
        device_list, ratios = list(core.placement), list(core.ratios)
    else:
        device_list = resolve_devices(devices)
        ratios, _ = _resolve_split(split, device_list, template, probe)
    n = len(device_list)

    limits: list[int | None] = []
    for device in device_list:
        limit = probe.memory_limit(device)
        if limit is None and memory_budget is not None:
            limit = int(memory_budget)
        limits.append(limit)

    peak_line = None
    probe_fn = memory_probe or _default_peak_probe(template, device_list[0])
    if probe_fn is not None:
        per_device = max(1, math.ceil(batch_size / n))
        points = []
        for rows in accumulation_plan.probe_sizes(per_device):
            peak = probe_fn(rows)
            if peak is None:
                points = []
                break
            points.append((rows, peak))
        if points:
            peak_line = accumulation_plan.fit_peak_line(points)
            notes.append(
                f"peak memory measured at {[p[0] for p in points]} rows: "
                f"{peak_line[0] / MIB:,.1f} MiB + {peak_line[1] / MIB:,.2f} MiB per row"
            )
    if peak_line is None:
        notes.append("no allocator statistics here: expected peaks unknown")

    if micro_batch_size == "auto":
        micro = auto_micro_batch_size(batch_size, ratios, limits, peak_line, memory_margin)
        if micro is None:
            micro = math.ceil(batch_size / n)
            notes.append("'auto' keeps the batch whole: no memory limit or no measured peaks")
    else:
        micro = micro_batch_size

    if micro is None:
        steps, rows_per_step = 1, batch_size
    else:
        steps = accumulation_plan.accumulation_steps(batch_size, micro, n)
        rows_per_step = min(batch_size, n * micro)
    rows = slice_sizes(rows_per_step, ratios)
    peaks = [
        None if peak_line is None else int(peak_line[0] + peak_line[1] * r) for r in rows
    ]
    if any(p is None for p in peaks) or any(limit is None for limit in limits):
        fits = None
    else:
        fits = all(p <= memory_margin * lim for p, lim in zip(peaks, limits, strict=True))
    return Plan(
        batch_size=batch_size,
        devices=device_list,
        ratios=ratios,
        micro_batch_size=micro,
        accumulation_steps=steps,
        rows_per_step=rows_per_step,
        rows_per_device=rows,
        peak_bytes=peaks,
        limit_bytes=limits,
        fits=fits,
        margin=memory_margin,
        notes=notes,
    )


def auto_micro_batch_size(
    batch_size: int,
    ratios: Sequence[float],
    limits: Sequence[int | None],
    peak_line,
    margin: float,
) -> int | None:
    """Largest rows-per-device m whose micro step fits every device, or None.

    The one rule for `plan(micro_batch_size="auto")` and
    `GradientAccumulation("auto")`: a micro step of ``len(ratios) * m`` rows is
    cut by `BatchSlice`'s rule, and each device's rows must fit
    ``margin * limit`` on the line ``peak = a + b * rows``. None when a limit or
    the line is unknown.
    """
    if peak_line is None or any(limit is None for limit in limits):
        return None
    n = len(ratios)
    capacity = [
        accumulation_plan.largest_fitting_micro_batch(
            peak_line[0], peak_line[1], limit, margin, max_size=batch_size
        )
        for limit in limits
    ]
    m = max(1, math.ceil(batch_size / n))
    while m > 1:
        rows = slice_sizes(min(batch_size, n * m), ratios)
        if all(r <= c for r, c in zip(rows, capacity, strict=True)):
            break
        m -= 1
    return m
