"""torch's CUDA allocator figures (Keras 3 on torch). torch is imported when a source asks it."""

from __future__ import annotations

from keras_parallel._backend.common.devices import canonical_device_name
from keras_parallel._backend.common.memory import MemoryReading, MemorySource

__all__ = ["CPU_FIGURES", "TorchSource", "default_source", "memory_limit"]

#: Whether the allocator keeps figures for a CPU device: torch keeps none.
CPU_FIGURES = False


class TorchSource(MemorySource):
    """torch's CUDA caching-allocator figures (Keras 3 on torch).

    Current and peak are what tensors hold (`memory_allocated`,
    `max_memory_allocated`), not the cache torch reserved; the peak resets
    with `reset_peak_memory_stats`. The limit is the card's total memory.
    """

    @staticmethod
    def _index(device: str) -> int:
        name = canonical_device_name(device)
        if ":GPU:" not in name:
            raise ValueError(f"torch reports no memory statistics for {device!r}.")
        return int(name.rsplit(":", 1)[1])

    def devices(self) -> list[str]:
        try:
            import torch

            if not torch.cuda.is_available():
                return []
            return [f"/device:GPU:{i}" for i in range(torch.cuda.device_count())]
        except Exception:
            return []

    def read(self, device: str) -> MemoryReading:
        import torch

        index = self._index(device)
        return MemoryReading(
            int(torch.cuda.memory_allocated(index)),
            int(torch.cuda.max_memory_allocated(index)),
            int(torch.cuda.get_device_properties(index).total_memory),
        )

    def reset_peak(self, device: str) -> bool:
        import torch

        try:
            torch.cuda.reset_peak_memory_stats(self._index(device))
        except Exception:
            return False
        return True


def default_source() -> MemorySource:
    """torch's CUDA allocator source."""
    return TorchSource()


def memory_limit(device: str) -> int | None:
    """The total memory of GPU `device`; raises where torch has no figures."""
    return TorchSource().read(device).limit_bytes
