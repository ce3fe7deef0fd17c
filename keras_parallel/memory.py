"""Per-device memory probes, per backend.

A *memory source* answers three questions about the devices it knows: which
devices there are (`devices()`), how much memory one uses now and at most since
its peak was last reset (`read(device)`), and whether that peak can be reset
(`reset_peak(device)`). `GPUMemoryLogger` only talks to a source, so a test can
inject one with fixed figures, and each backend brings its own:

- `TensorFlowSource` (TensorFlow, Keras 3 or tf-keras): what the allocator hands
  out now and at peak; the limit is a logical device's configured limit, else
  the card's total (NVML); the peak resets (`reset_memory_stats`). A CPU has
  figures only when TensorFlow started with ``TF_CPU_ALLOCATOR_USE_BFC=true``,
  with oneDNN on or off (oneDNN's own CPU figures count large blocks only).
- `JaxSource` (Keras 3 on JAX): `bytes_in_use`, `peak_bytes_in_use`,
  `bytes_limit`; the peak cannot be reset, so it is the peak since start.
- `TorchSource` (Keras 3 on torch): `memory_allocated`,
  `max_memory_allocated`, the card's total; the peak resets.
- `NVMLSource` (any backend, with nvidia-ml-py): the whole card's used and
  total memory (every process, the frameworks' reserved pools); no peak.
- `HostSource` (any): the process's resident set size (psutil); no peak.

The sources live with their backend, under ``keras_parallel/_backend/``
(``common`` for the interface, host and NVML; ``tensorflow``, ``jax``, ``torch``
for the allocators); this module gathers them. JAX, torch and pynvml are imported
when a source first asks them, and `TensorFlowSource` when it is first named here,
so that importing this module under ``KERAS_BACKEND=jax`` or ``torch`` never
imports TensorFlow.

All figures are bytes; `MIB` (2**20) converts them to MiB.
"""

from __future__ import annotations

from keras_parallel import _backend
from keras_parallel._backend import JaxSource, TorchSource
from keras_parallel._backend.common.devices import canonical_device_name
from keras_parallel._backend.common.host import HostSource
from keras_parallel._backend.common.memory import MIB, MemoryReading, MemorySource
from keras_parallel._backend.common.nvml import (
    NVMLSource,
    map_visible_to_physical,
    nvml_total_bytes,
    parse_cuda_visible_devices,
)

__all__ = [
    "MIB",
    "MemoryReading",
    "MemorySource",
    "HostSource",
    "NVMLSource",
    "JaxSource",
    "TorchSource",
    "default_source",
    "device_memory_limit",
    "map_visible_to_physical",
    "nvml_total_bytes",
    "parse_cuda_visible_devices",
]


def __getattr__(name: str):
    # `keras_parallel.memory.TensorFlowSource` imports TensorFlow, so only when it is
    # asked for (and it is not in __all__: a star import must not need TensorFlow).
    if name == "TensorFlowSource":
        return _backend.tensorflow_source_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_source() -> MemorySource:
    """The allocator source of the backend in use (TensorFlow, JAX or torch)."""
    return _backend.memory.default_source()


def device_memory_limit(device: str) -> int | None:
    """What `device` may use at most, in bytes; None where it is not known.

    On TensorFlow this is the memory limit of the logical device when one was
    configured (`tf.config.set_logical_device_configuration`), else the card's
    total memory (from NVML). On JAX it is the pool JAX may use, on torch the
    card's total memory. A CPU has no limit: None.

    Args:
        device: str. A device name such as ``"/gpu:1"`` or ``"GPU:0"``.

    Returns:
        The limit in bytes, or None.
    """
    name = canonical_device_name(device)
    if ":GPU:" not in name:
        return None
    try:
        return _backend.memory.memory_limit(name)
    except Exception:
        return None
