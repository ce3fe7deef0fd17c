"""Memory readings: the `MemorySource` interface every backend's source implements.

All figures are bytes; `MIB` (2**20) converts them to MiB. `default_source` and
`memory_limit` here are the answers for a backend with no allocator statistics
of its own.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "CPU_FIGURES",
    "MIB",
    "MemoryReading",
    "MemorySource",
    "default_source",
    "memory_limit",
]

#: Whether the allocator keeps figures for a CPU device: not here.
CPU_FIGURES = False

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class MemoryReading:
    """What one device uses, in bytes.

    Attributes:
        current_bytes: int. Memory in use now.
        peak_bytes: int. The most in use since the peak was last reset (or
            since the process started, where the source cannot reset it).
        limit_bytes: int or None. What the device may use at most, where known.
    """

    current_bytes: int
    peak_bytes: int
    limit_bytes: int | None = None


class MemorySource:
    """Base class of the memory probes: subclass it to feed `GPUMemoryLogger`.

    Device names are canonical (``"/device:GPU:0"``). `read` may raise any
    exception for a device it cannot measure (a CPU without allocator
    statistics, a device that disappeared): callers treat that as "no figures".
    A source that cannot measure a device raises rather than returning zeros:
    a reading of 0 bytes means nothing is allocated.

    Example:

    ```python
    class FixedSource(keras_parallel.memory.MemorySource):
        def devices(self):
            return ["/device:GPU:0"]

        def read(self, device):
            return keras_parallel.memory.MemoryReading(2**30, 3 * 2**30, 8 * 2**30)
    ```
    """

    def devices(self) -> list[str]:
        """The accelerators this source measures (may be empty)."""
        return []

    def read(self, device: str) -> MemoryReading:
        """Returns the figures of `device`; raises when it has none."""
        raise NotImplementedError(f"{type(self).__name__} cannot read {device!r}.")

    def reset_peak(self, device: str) -> bool:
        """Resets the peak of `device`. Returns False where it cannot."""
        return False

    def allocator(self, device: str) -> str:
        """The device whose allocator `read(device)` reports.

        Devices that give the same answer share one allocator, so one set of
        figures (TensorFlow's logical CPU devices all share the CPU's). By
        default each device has its own.
        """
        return device

    def physical_device(self, device: str) -> str:
        """The framework's physical GPU that holds `device` (for NVML).

        A logical device carved out of a GPU maps to that GPU; by default a
        device is its own physical device.
        """
        return device


def default_source() -> MemorySource:
    """A source that measures nothing (a backend without allocator statistics)."""
    return MemorySource()


def memory_limit(device: str) -> int | None:
    """What GPU `device` may use at most, in bytes: unknown here."""
    return None
