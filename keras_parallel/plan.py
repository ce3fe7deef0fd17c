"""`plan()`: what a DataParallel / GradientAccumulation run will do, before it runs."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from keras_parallel import _backend, _batch_norm, _graph, _validation, accumulation_plan
from keras_parallel._backend.common.probes import state_bytes
from keras_parallel.devices import resolve_devices
from keras_parallel.layers.batch_slice import slice_sizes
from keras_parallel.parallel import _resolve_split, replicas, unwrap
from keras_parallel.probes import DeviceProbe

__all__ = ["AutoPlan", "Plan", "plan", "plan_auto", "auto_micro_batch_size"]

MIB = 2**20


@dataclass
class Plan:
    """A training plan a person can read (`print(plan)`) and code can use.

    Attributes:
        batch_size: int. Rows `fit` hands the model per step.
        devices: list of str. One per slice.
        ratios: list of float. Slice weights, one per device.
        micro_batch_size: int or None. `GradientAccumulation`'s micro-batch
            size, None without accumulation: a micro step holds up to
            ``len(devices) * micro_batch_size`` rows, cut by the ratios, so it
            is the rows per device on average (exactly, on an even split).
        accumulation_steps: int. Micro steps per batch (1 without accumulation):
            ``ceil(batch_size / (len(devices) * micro_batch_size))``.
        rows_per_step: int. Rows of one full micro step over all devices (the
            last step holds the rest of the batch).
        rows_per_device: list of int. Each device's slice of a full micro
            step: `rows_per_step` cut by the ratios.
        rows_computed: list of int. Rows each device computes for its slice:
            `rows_per_device`, except on JAX, where every device computes as
            many rows as the largest slice (DataParallel pads the others).
        peak_bytes: list of int or None. Expected peak per device,
            ``a + b * rows`` for its `rows_computed`, from the line through the
            measured peaks (its intercept never below 0), where they could be
            measured.
        limit_bytes: list of int or None. What each device may use.
        fits: bool or None. Whether every expected peak is within
            ``margin * limit``; None when figures are missing (a CPU).
        margin: float. Share of each limit the plan may use.
        notes: list of str. How the figures were obtained.
        batch_norm: str or None. What the model's BatchNormalization layers
            normalise with: `"global"` (the rows of a whole step over all
            devices) or `"per_slice"` (each device's slice), as `DataParallel`'s
            `batch_norm`; None when the model has none.

    Example:

    ```python
    import json
    import keras_parallel

    plan = keras_parallel.plan(model, batch_size=32, micro_batch_size=8)
    plan.accumulation_steps, plan.rows_per_device  # (2, [8, 8]) on two GPUs
    plan.fits  # None where memory figures are missing (a CPU)
    json.dumps(plan.to_dict())  # the same figures, for a log
    ```
    """

    batch_size: int
    devices: list[str]
    ratios: list[float]
    micro_batch_size: int | None
    accumulation_steps: int
    rows_per_step: int
    rows_per_device: list[int]
    rows_computed: list[int]
    peak_bytes: list[int | None]
    limit_bytes: list[int | None]
    fits: bool | None
    margin: float
    notes: list[str] = field(default_factory=list)
    batch_norm: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        def mib(value):
            return "?" if value is None else f"{value / MIB:,.0f}"

        n = len(self.devices)
        lines = [f"Plan for batch {self.batch_size} on {n} device(s): {self._steps()}"]
        if self.micro_batch_size is not None:
            lines.append(
                f"micro_batch_size={self.micro_batch_size}: a step holds up to "
                f"{self.micro_batch_size} x {n} = {self.micro_batch_size * n} rows, "
                "cut by the ratios"
            )
        padded = self.rows_computed != self.rows_per_device
        computes = f"{'computes':>10}" if padded else ""
        lines.append(
            f"{'device':<16}{'ratio':>7}{'rows':>7}{computes}"
            f"{'peak MiB':>11}{'limit MiB':>11}{'use':>7}"
        )
        for i, device in enumerate(self.devices):
            peak, limit = self.peak_bytes[i], self.limit_bytes[i]
            use = "?" if peak is None or not limit else f"{peak / limit:.0%}"
            computes = f"{self.rows_computed[i]:>10}" if padded else ""
            lines.append(
                f"{device:<16}{self.ratios[i]:>7.3g}{self.rows_per_device[i]:>7}{computes}"
                f"{mib(peak):>11}{mib(limit):>11}{use:>7}"
            )
        if self.batch_norm is not None:
            lines.append(self._batch_norm_line())
        verdict = {True: "fits", False: "DOES NOT FIT", None: "unknown (no memory figures)"}
        lines.append(f"fits within {self.margin:.0%} of each limit: {verdict[self.fits]}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _batch_norm_line(self) -> str:
        """What the BatchNormalization layers' statistics are computed over."""
        setting = f"(batch_norm={self.batch_norm!r})"
        if self.batch_norm == "per_slice" and len(self.devices) > 1:
            rows = ", ".join(str(r) for r in self.rows_per_device)
            return f"BatchNormalization: statistics of each device's slice ({rows} rows) {setting}"
        what = "the whole batch" if self.accumulation_steps <= 1 else "each micro step"
        return (
            f"BatchNormalization: statistics of {what} ({self.rows_per_step} rows, "
            f"over all devices) {setting}"
        )

    def _steps(self) -> str:
        """The steps and each device's rows of a full step, as the table shows them."""
        split = " + ".join(str(r) for r in self.rows_per_device)
        if self.accumulation_steps <= 1:
            return f"1 step of {self.rows_per_step} rows, split {split} (no accumulation)"
        last = self.batch_size - (self.accumulation_steps - 1) * self.rows_per_step
        tail = "" if last == self.rows_per_step else f" (the last of {last})"
        return (
            f"{self.accumulation_steps} accumulation steps of {self.rows_per_step} rows"
            f"{tail}, each split {split}"
        )


def plan(
    model,
    batch_size: int,
    devices=None,
    split=None,
    micro_batch_size: None | int | str = None,
    *,
    batch_norm: str | None = None,
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
        batch_norm: None, `"global"` or `"per_slice"`, as for `DataParallel`
            (a `DataParallel` model brings its own). Defaults to `None`
            (`"global"`).
        memory_budget: int or None. Bytes each device may use when its limit is
            unknown (a CPU). Defaults to `None`.
        memory_margin: float in (0, 1]. Share of each limit a plan may fill.
            Defaults to `0.8`.
        memory_probe: callable or None. ``memory_probe(rows) -> peak bytes`` of
            one training step of `rows` rows on one device. Defaults to the
            backend's probe of a generated batch: the allocator's peak on
            TensorFlow and torch where it keeps statistics, XLA's compiled
            estimate on JAX.
        probe: `keras_parallel.probes.DeviceProbe` or None, for limits and
            measured splits. Defaults to `DeviceProbe()`.

    Returns:
        A `Plan`.

    Raises:
        ValueError: for a `batch_size` that is not a positive int, a bad
            `micro_batch_size`, `memory_budget` that is not a positive number,
            `memory_margin` outside (0, 1] (a bool included), a `memory_probe`
            that cannot be called, or arguments `DataParallel` would refuse.

    Example:

    ```python
    import keras_parallel

    parallel = keras_parallel.DataParallel(model)
    plan = keras_parallel.plan(parallel, batch_size=32, micro_batch_size="auto")
    print(plan)  # rows, expected peak and limit per device, and whether it fits
    accumulation = keras_parallel.callbacks.GradientAccumulation(plan.micro_batch_size)
    ```
    """
    batch_size = _validation.validate_positive_int(batch_size, "batch_size")
    micro_batch_size = _validation.validate_micro_batch_size(micro_batch_size, allow_none=True)
    memory_budget = _validation.validate_positive_number(
        memory_budget, "memory_budget", allow_none=True
    )
    memory_margin = _validation.validate_fraction(memory_margin, "memory_margin")
    memory_probe = _validation.validate_callable(
        memory_probe, "memory_probe", expected="a callable rows -> peak bytes", allow_none=True
    )
    probe = _validation.validate_device_probe(probe, "probe", allow_none=True) or DeviceProbe()
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
        if batch_norm is not None and batch_norm != core.batch_norm:
            raise ValueError(
                "Invalid arguments for `plan`. A DataParallel model brings its own "
                f"batch_norm ({core.batch_norm!r}). Received: batch_norm={batch_norm!r}"
            )
        batch_norm = core.batch_norm
    else:
        device_list = resolve_devices(devices)
        ratios, _ = _resolve_split(split, device_list, template, probe)
    n = len(device_list)
    batch_norm = _validation.validate_batch_norm(batch_norm or "global")
    if not any(_batch_norm.is_batch_norm(layer) for layer in _graph.all_sublayers(template)):
        batch_norm = None

    limits: list[int | None] = []
    for device in device_list:
        limit = probe.memory_limit(device)
        if limit is None and memory_budget is not None:
            limit = int(memory_budget)
        limits.append(limit)

    state = None
    probe_fn = memory_probe
    if probe_fn is None:
        state = state_bytes(model)
        probe_fn = with_state(remembered_probe(template, device_list[0]), state)
    auto = plan_auto(
        batch_size,
        ratios,
        limits,
        rows_measure(probe_fn),
        memory_margin,
        exact=memory_probe is None and _backend.accumulation.PROBE_RUNS_NOTHING,
    )
    peak_line = auto.peak_line
    if peak_line is not None:
        notes.append(_peak_line_note(auto.points, peak_line))
        if state is not None:
            notes.append(_state_note(state))
        if memory_probe is None and _backend.probes.PEAK_NOTE:
            notes.append(_backend.probes.PEAK_NOTE)
    else:
        notes.append("no allocator statistics here: expected peaks unknown")

    if micro_batch_size == "auto":
        micro = auto.micro_batch_size
        if micro is None:
            micro = math.ceil(batch_size / n)
            notes.append(_kept_whole_note(device_list, limits, peak_line))
    else:
        micro = micro_batch_size

    if micro is None:
        steps, rows_per_step = 1, batch_size
    else:
        steps = accumulation_plan.accumulation_steps(batch_size, micro, n)
        rows_per_step = min(batch_size, n * micro)
    rows = slice_sizes(rows_per_step, ratios)
    if n > 1 and 0 in rows and max(rows) >= 2:
        idle = [d for d, r in zip(device_list, rows, strict=True) if r == 0]
        notes.append(
            f"{', '.join(idle)} gets no rows in a micro step ({' + '.join(map(str, rows))}) "
            f"and waits in each: {fewest_rows_note(ratios, batch_size)}"
        )
    computed = _backend.devices.computed_rows(rows, ratios)
    if computed != rows:
        notes.append(_padding_note())
    peaks = [None if peak_line is None else int(peak_line[0] + peak_line[1] * r) for r in computed]
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
        rows_computed=computed,
        peak_bytes=peaks,
        limit_bytes=limits,
        fits=fits,
        margin=memory_margin,
        notes=notes,
        batch_norm=batch_norm,
    )


#: What `remembered_probe` measured, per template: {(device, rows): bytes or None}.
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remembered_probe(template, device: str):
    """The backend's probe of `template`'s step on `device`, each figure measured once
    per process: `GradientAccumulation("auto")` then reuses what `plan()` measured
    (the same figures give the same plan; an allocator's figures differ a little
    from one moment to the next). None where the backend has no probe."""
    base = _backend.probes.peak_probe(template, device)
    if base is None:
        return None
    try:
        memo = _MEASURED.setdefault(template, {})
    except TypeError:  # not weakly referable: measure every time
        return base

    def probe(rows):
        key = (device, int(rows), len(template.weights))
        if key not in memo:
            memo[key] = base(rows)
        return memo[key]

    return probe


def with_state(probe_fn, state: int):
    """A backend probe (the step's memory above rest) plus `state` bytes (`state_bytes`):
    the one memory model of `plan` and `GradientAccumulation("auto")`. None stays None,
    and so does a probe's 0 (an allocator without statistics)."""
    if probe_fn is None:
        return None

    def probe(rows):
        peak = probe_fn(rows)
        # No statistics (some CPUs report zeros): no figure, whatever the state.
        return None if peak is None or peak <= 0 else peak + state

    return probe


def _state_note(state: int) -> str:
    return (
        "each peak is the step's own memory (batch, activations, gradients, "
        "temporaries) plus the model's weights and optimizer state "
        f"({state / MIB:,.1f} MiB); data already on the device is not counted"
    )


def rows_measure(probe_fn):
    """`plan_auto`'s ``measure`` for a probe of `rows` rows on one device (None: no probe)."""
    if probe_fn is None:
        return None

    def measure(rows):
        peak = probe_fn(rows)
        if peak is None or peak <= 0:  # no statistics (some CPUs report zeros)
            return None
        return rows, peak

    return measure


def _peak_line_note(points, peak_line) -> str:
    sizes = ", ".join(str(rows) for rows, _ in points)
    peaks = ", ".join(f"{peak / MIB:,.1f}" for _, peak in points)
    note = (
        f"peak memory measured at {sizes} rows: {peaks} MiB; line: "
        f"{peak_line[0] / MIB:,.1f} MiB + {peak_line[1] / MIB:,.2f} MiB per row"
    )
    fitted, _ = accumulation_plan.least_squares_line(points)
    if fitted < 0:
        note += (
            f" (the fitted intercept, {fitted / MIB:,.1f} MiB, was below zero: it is "
            "taken as 0, which only raises the line)"
        )
    return note


def _padding_note() -> str:
    return (
        f"on the {_backend.BACKEND} backend an even split runs one program over the "
        "devices, every device computing as many rows as the largest slice (a batch "
        "that does not divide evenly pads the shorter slices by a row): 'computes' "
        "gives those rows, and the peaks and 'auto' count them"
    )


def _kept_whole_note(devices, limits, peak_line) -> str:
    reasons = []
    unknown = [d for d, limit in zip(devices, limits, strict=True) if limit is None]
    if unknown:
        reasons.append(f"no memory limit for {', '.join(unknown)} (`memory_budget` sets one)")
    if peak_line is None:
        reasons.append("no measured peaks")
    return "'auto' keeps the batch whole: " + " and ".join(reasons)


@dataclass(frozen=True)
class AutoPlan:
    """What the one "auto" planner found (`plan_auto`).

    Attributes:
        micro_batch_size: int or None. Rows per device of a micro step that fits
            every device; None when a limit or the memory line is unknown.
        peak_line: ``(a, b)`` or None. The line ``peak = a + b * rows`` through the
            measured points (`accumulation_plan.fit_peak_line`); None without points.
        points: list of ``(rows, peak bytes)``: what was measured.
    """

    micro_batch_size: int | None
    peak_line: tuple[float, float] | None
    points: list[tuple[int, int]]


def plan_auto(
    batch_size: int,
    ratios: Sequence[float],
    limits: Sequence[int | None],
    measure: Callable[[int], tuple[int, int] | None] | None,
    margin: float,
    *,
    out_of_memory: tuple[type[BaseException], ...] = (),
    exact: bool = False,
) -> AutoPlan:
    """The one "auto" planner: `plan(micro_batch_size="auto")` and `GradientAccumulation("auto")`.

    Measures at a few small micro-batch sizes (`accumulation_plan.probe_sizes` of
    the rows per device, ``ceil(batch_size / len(ratios))``), fits the line
    ``peak = a + b * rows`` through them and picks the micro-batch size with
    `auto_micro_batch_size`.

    Args:
        batch_size: int. Rows of the batch over all devices.
        ratios: the devices' slice weights.
        limits: bytes each device may use (None: unknown).
        measure: callable or None. ``measure(size) -> (rows, peak)``: the peak bytes
            of the measured device when a micro step has `size` rows per device,
            and the rows it computes of them; None when there are no figures (no
            line then). None: nothing to measure.
        margin: float in (0, 1]. Share of each limit a micro step may fill.
        out_of_memory: errors of `measure` that end the measuring (the points
            measured before are kept). Defaults to none.
        exact: bool. Whether asking `measure` costs nothing (JAX compiles, runs
            nothing): then the line's size is corrected with exact figures, the
            largest size whose every device's rows fit (`measure` then takes the
            rows on one device, as `plan`'s does). Defaults to False.

    Returns:
        An `AutoPlan`.
    """
    points: list[tuple[int, int]] = []
    if measure is not None:
        per_device = max(1, math.ceil(batch_size / len(ratios)))
        for size in accumulation_plan.probe_sizes(per_device):
            try:
                point = measure(size)
            except out_of_memory:
                break
            if point is None:
                points = []
                break
            points.append(point)
    peak_line = accumulation_plan.fit_peak_line(points) if points else None
    micro = auto_micro_batch_size(batch_size, ratios, limits, peak_line, margin)
    if exact and micro is not None and measure is not None:
        micro = _exact_size(batch_size, ratios, limits, measure, margin, micro)
    return AutoPlan(micro, peak_line, points)


def _exact_size(batch_size, ratios, limits, measure, margin, estimate: int) -> int:
    """The largest micro-batch size whose every device's rows fit, by exact figures.

    A binary search around the line's `estimate`
    (`accumulation_plan.refine_micro_batch_size`): a size fits when each device's
    computed rows measure at most ``margin * limit`` of that device.
    """
    n = len(ratios)
    known: dict[int, int] = {}

    def peak(rows: int) -> int:
        if rows not in known:
            known[rows] = measure(rows)[1]
        return known[rows]

    def use(m: int) -> float:
        sizes = slice_sizes(min(batch_size, n * m), ratios)
        rows = _backend.devices.computed_rows(sizes, ratios)
        return max(
            peak(r) / (margin * limit) for r, limit in zip(rows, limits, strict=True) if r > 0
        )

    return accumulation_plan.refine_micro_batch_size(
        use, estimate, 1.0, max(1, math.ceil(batch_size / n))
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
    cut by `BatchSlice`'s rule, and the rows each device computes (on JAX, the
    largest slice's: `Plan.rows_computed`) must fit ``margin * limit`` on the
    line ``peak = a + b * rows``. None when a limit or the line is unknown.
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
        rows = _backend.devices.computed_rows(slice_sizes(min(batch_size, n * m), ratios), ratios)
        if all(r <= c for r, c in zip(rows, capacity, strict=True)):
            break
        m -= 1
    return m


def fewest_rows_note(ratios, batch: int) -> str:
    """Which micro-batch size first gives every device rows, for the zero-rows warnings."""
    n = len(ratios)
    for m in range(1, max(1, -(-batch // n)) + 1):
        sizes = slice_sizes(min(batch, n * m), ratios)
        if 0 not in sizes:
            return (
                f"micro_batch_size={m} is the smallest that gives every device rows "
                f"({' + '.join(map(str, sizes))}); where the budget chose this size, it "
                "allows no larger one."
            )
    return "No micro-batch size of this batch gives every device rows."
