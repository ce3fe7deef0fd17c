"""Probes that size `DataParallel` slices from the devices: memory and speed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from keras_parallel import _backend, _validation
from keras_parallel.memory import device_memory_limit

__all__ = ["DeviceProbe", "split_ratios"]


@dataclass
class DeviceProbe:
    """Measures what `split="memory"` and `split="speed"` weigh devices by.

    Replace it (or subclass it) to inject figures, e.g. in tests or to reuse
    figures measured elsewhere.

    `split="speed"` times a forward and backward pass of a generated batch on
    each device, starting at `speed_batch_size` rows and doubling the rows while
    that still raises the device's samples/s by a quarter or more (a GPU at a
    few rows waits on its kernel launches, not on its arithmetic, and would look
    as slow as a CPU) or while a pass takes under 10 ms (too short to judge), up
    to `speed_max_batch_size`. Each device is weighed by
    its best rate. A size that runs out of memory ends the growth (the largest
    size that fitted counts); when even the first size does not fit, the rows
    are halved down to 1.

    Args:
        speed_batch_size: int. Rows of the first batch timed per device for
            `split="speed"`. Defaults to `4`.
        speed_repeats: int. Timed passes per size (the median counts).
            Defaults to `3`.
        speed_max_batch_size: int. The most rows timed per device. Defaults to `64`.

    Raises:
        ValueError: if `speed_batch_size`, `speed_repeats` or
            `speed_max_batch_size` is not a positive int.

    Example:

    ```python
    import keras_parallel
    from keras_parallel.probes import DeviceProbe

    class KnownMemory(DeviceProbe):  # usable bytes per device, measured elsewhere
        def memory_limit(self, device):
            return {"/device:GPU:0": 12 * 2**30, "/device:GPU:1": 6 * 2**30}.get(device)

    parallel = keras_parallel.DataParallel(model, split="memory", probe=KnownMemory())
    keras_parallel.replicas(parallel).ratios  # [2.0, 1.0] on those two GPUs
    ```
    """

    speed_batch_size: int = 4
    speed_repeats: int = 3
    speed_max_batch_size: int = 64

    def __post_init__(self):
        self.speed_batch_size = _validation.validate_positive_int(
            self.speed_batch_size, "speed_batch_size"
        )
        self.speed_repeats = _validation.validate_positive_int(self.speed_repeats, "speed_repeats")
        self.speed_max_batch_size = _validation.validate_positive_int(
            self.speed_max_batch_size, "speed_max_batch_size"
        )

    def memory_limit(self, device: str) -> int | None:
        """Usable bytes on `device`, or None when unknown (a CPU)."""
        return device_memory_limit(device)

    def throughput(self, model, device: str) -> float:
        """Samples/s of a forward and backward pass of `model` on `device`.

        The best rate over the sizes tried (see the class docstring). Measured
        on the TensorFlow, JAX and torch backends (the model is left unchanged);
        on another backend NotImplementedError.
        """
        out_of_memory = _backend.accumulation.OUT_OF_MEMORY_ERRORS
        rows, ceiling, rate = self.speed_batch_size, self.speed_max_batch_size, None
        while True:
            try:
                measured = _backend.probes.measure_throughput(
                    model, device, batch_size=rows, repeats=self.speed_repeats
                )
            except out_of_memory:
                if rate is not None:
                    return rate  # the largest size that fitted
                if rows == 1:
                    raise
                rows = ceiling = rows // 2
                continue
            busy = rows / measured >= _BUSY_SECONDS  # long enough to judge, not noise
            if rate is not None and measured < _BUSY_GAIN * rate and busy:
                return max(rate, measured)  # more rows no longer pay: the device is busy
            rate = measured
            if rows * 2 > ceiling:
                return rate
            rows *= 2


#: Doubling the rows must raise samples/s by this factor for the probe to go on:
#: below it the device's time grows with the rows (it is computing, not waiting).
_BUSY_GAIN = 1.25
#: ... once a pass takes this long (seconds): shorter passes are dominated by
#: overheads and timer noise, so the probe grows past them whatever their gain.
_BUSY_SECONDS = 0.01


def _normalise(values: Sequence[float]) -> list[float]:
    smallest = min(values)
    return [round(v / smallest, 4) for v in values]


def split_ratios(
    split: str, devices: Sequence[str], model=None, probe: DeviceProbe | None = None
) -> tuple[list[float] | None, dict]:
    """Measures the ratios for `split="memory"` or `split="speed"`.

    Returns:
        ``(ratios, figures)``: ratios normalised so the smallest is 1 (or None
        when a figure is missing: a device without a known memory limit), and
        the raw figures per device (bytes or samples/s).
    """
    split = _validation.validate_choice(split, "split", ("memory", "speed"))
    probe = _validation.validate_device_probe(probe, "probe", allow_none=True) or DeviceProbe()
    if split == "memory":
        figures = {d: probe.memory_limit(d) for d in devices}
    else:
        figures = {d: probe.throughput(model, d) for d in devices}
    values = list(figures.values())
    if any(v is None or v <= 0 for v in values):
        return None, figures
    return _normalise(values), figures
