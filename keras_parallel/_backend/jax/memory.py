"""JAX's allocator figures (Keras 3 on JAX). JAX is imported when a source first asks it."""

from __future__ import annotations

from keras_parallel._backend.common.devices import canonical_device_name
from keras_parallel._backend.common.memory import MemoryReading, MemorySource

__all__ = ["CPU_FIGURES", "JaxSource", "default_source", "memory_limit"]

#: Whether the allocator keeps figures for a CPU device: JAX keeps none.
CPU_FIGURES = False


class JaxSource(MemorySource):
    """JAX's allocator figures, ``device.memory_stats()`` (Keras 3 on JAX).

    JAX cannot reset its peak: `peak_bytes` is the high-water mark since the
    process started. ``bytes_limit`` is the pool JAX may use (75% of the card
    by default; see ``XLA_PYTHON_CLIENT_MEM_FRACTION``).
    """

    def _gpus(self):
        import jax

        return [d for d in jax.local_devices() if d.platform in ("gpu", "cuda", "rocm")]

    def devices(self) -> list[str]:
        try:
            return [f"/device:GPU:{i}" for i in range(len(self._gpus()))]
        except Exception:
            return []

    def read(self, device: str) -> MemoryReading:
        name = canonical_device_name(device)
        index = int(name.rsplit(":", 1)[1])
        if ":GPU:" not in name:
            raise ValueError(f"JAX reports no memory statistics for {device!r}.")
        stats = self._gpus()[index].memory_stats()
        if not stats:
            raise ValueError(f"JAX reports no memory statistics for {device!r}.")
        limit = stats.get("bytes_limit")
        return MemoryReading(
            int(stats.get("bytes_in_use", 0)),
            int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))),
            int(limit) if limit else None,
        )


def default_source() -> MemorySource:
    """JAX's allocator source."""
    return JaxSource()


def memory_limit(device: str) -> int | None:
    """The pool JAX may use on GPU `device` (``bytes_limit``); raises where it has no figures."""
    return JaxSource().read(device).limit_bytes
