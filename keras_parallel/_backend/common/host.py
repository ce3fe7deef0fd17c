"""The process's memory on the host (psutil), on any backend."""

from __future__ import annotations

from keras_parallel._backend.common.memory import MemoryReading, MemorySource

__all__ = ["HostSource"]


class HostSource(MemorySource):
    """The process's resident set size (RSS) via psutil, as device ``"host"``.

    RSS has no peak to reset: the peak reported is the current figure.
    """

    def __init__(self):
        import psutil

        self._process = psutil.Process()

    def devices(self) -> list[str]:
        return ["host"]

    def read(self, device: str = "host") -> MemoryReading:
        rss = int(self._process.memory_info().rss)
        return MemoryReading(rss, rss, None)
