"""TensorFlow's allocator statistics (`tf.config.experimental.get_memory_info`).

On a GPU TensorFlow's allocator is its BFC allocator, which counts every
allocation. On a CPU it depends on how TensorFlow started:

- ``TF_CPU_ALLOCATOR_USE_BFC=true`` (or ``1``, any case): the BFC allocator,
  exact figures; the peak resets.
- else with oneDNN on (``TF_ENABLE_ONEDNN_OPTS=1``, TensorFlow's default on
  CPUs with AVX-512): oneDNN's allocator answers, but counts only large
  blocks (a hundred 40-byte tensors read 0 bytes) and reads 0 until the first
  large one.
- else (oneDNN off): ``get_memory_info`` raises ValueError.

`memory_info` and `reset_memory_stats` give every caller the same answer in
both oneDNN worlds: figures on a CPU only from the BFC allocator, else
ValueError. A reading of exactly 0 from them is a real 0 (nothing allocated).
"""

from __future__ import annotations

import os

import tensorflow as tf

from keras_parallel._backend.common.devices import canonical_device_name
from keras_parallel._backend.common.memory import MIB, MemoryReading, MemorySource
from keras_parallel._backend.common.nvml import nvml_total_bytes
from keras_parallel._backend.tensorflow.devices import list_logical_devices

__all__ = [
    "CPU_FIGURES",
    "TensorFlowSource",
    "cpu_allocator_is_bfc",
    "default_source",
    "logical_gpu_layout",
    "logical_gpu_memory_limit",
    "memory_info",
    "memory_limit",
    "reset_memory_stats",
]

#: Whether the allocator keeps figures for a CPU device: with the BFC allocator
#: (`TF_CPU_ALLOCATOR_USE_BFC=true`, which the demo sets).
CPU_FIGURES = True


def _short(name: str) -> str:
    """ "/device:GPU:0" -> "GPU:0", the form `get_memory_info` takes."""
    return canonical_device_name(name).replace("/device:", "")


def cpu_allocator_is_bfc() -> bool:
    """Whether TensorFlow's CPU allocator is its BFC allocator.

    TensorFlow reads ``TF_CPU_ALLOCATOR_USE_BFC`` once, when it creates the CPU
    allocator (set it before TensorFlow starts); it takes ``1`` or ``true`` in
    any case as on. This reads the variable the same way.
    """
    return os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true")


def _check_stats(name: str, what: str) -> None:
    if ":CPU:" in name and not cpu_allocator_is_bfc():
        raise ValueError(
            f"Cannot {what} {name}: TensorFlow counts every allocation on a CPU only "
            "with its BFC allocator, which it uses when it starts with "
            "TF_CPU_ALLOCATOR_USE_BFC=true (without it there are no CPU figures, or "
            "with oneDNN only figures for large blocks, which keras_parallel does not use)."
        )


def memory_info(device: str) -> dict[str, int]:
    """``{"current": bytes, "peak": bytes}`` of `device`'s allocator.

    Raises:
        ValueError: for a CPU unless TensorFlow's CPU allocator is its BFC
            allocator (see the module docstring), and wherever TensorFlow has
            no statistics for the device.
    """
    name = canonical_device_name(device)
    _check_stats(name, "read the memory figures of")
    return tf.config.experimental.get_memory_info(_short(name))


def reset_memory_stats(device: str) -> None:
    """Resets `device`'s peak; raises ValueError where `memory_info` would."""
    name = canonical_device_name(device)
    _check_stats(name, "reset the memory peak of")
    tf.config.experimental.reset_memory_stats(_short(name))


def logical_gpu_layout() -> list[tuple[int, int | None]]:
    """For each logical GPU, in order: (physical GPU index, memory limit in bytes or None).

    A physical GPU without a logical configuration is one logical GPU with no
    configured limit; one split into k logical GPUs gives k entries.
    """
    layout: list[tuple[int, int | None]] = []
    for physical_index, gpu in enumerate(tf.config.list_physical_devices("GPU")):
        configs = tf.config.get_logical_device_configuration(gpu)
        if not configs:
            layout.append((physical_index, None))
            continue
        for config in configs:
            limit = getattr(config, "memory_limit", None)
            # TensorFlow reads `memory_limit` as MiB (it multiplies by 2**20).
            layout.append((physical_index, int(limit) * MIB if limit else None))
    return layout


def _logical_entry(name: str) -> tuple[int, int | None] | None:
    index = int(name.rsplit(":", 1)[1])
    layout = logical_gpu_layout()
    return layout[index] if index < len(layout) else None


def logical_gpu_memory_limit(device: str) -> int | None:
    """The configured limit of a logical GPU, else its card's NVML total, in bytes."""
    name = canonical_device_name(device)
    if ":GPU:" not in name:
        return None
    entry = _logical_entry(name)
    if entry is None:
        return None
    physical_index, limit = entry
    if limit is not None:
        return limit
    return nvml_total_bytes(physical_index)


class TensorFlowSource(MemorySource):
    """TensorFlow's allocator: in use now and peak, per (logical) device.

    The figures are what TensorFlow's allocator hands out, not the pool it
    reserved. The peak resets with `tf.config.experimental.reset_memory_stats`.
    On a CPU `read` raises ValueError (and `reset_peak` returns False) unless
    TensorFlow started with ``TF_CPU_ALLOCATOR_USE_BFC=true``, whether oneDNN
    is on or off (see `memory_info`). TensorFlow's logical CPU devices share
    the CPU's one allocator: `allocator` names ``/device:CPU:0`` for each. The
    limit is the logical device's configured memory limit, else the card's
    total from NVML, else unknown; it is looked up once per device.
    """

    def __init__(self):
        self._limits: dict[str, int | None] = {}

    def devices(self) -> list[str]:
        return list_logical_devices("GPU")

    def read(self, device: str) -> MemoryReading:
        name = canonical_device_name(device)
        info = memory_info(name)
        if name not in self._limits:
            self._limits[name] = logical_gpu_memory_limit(name)
        return MemoryReading(int(info["current"]), int(info["peak"]), self._limits[name])

    def reset_peak(self, device: str) -> bool:
        try:
            reset_memory_stats(device)
        except Exception:
            return False
        return True

    def allocator(self, device: str) -> str:
        name = canonical_device_name(device)
        # Every logical CPU device uses the one CPU allocator (their figures
        # are the same); each logical GPU has its own.
        return "/device:CPU:0" if ":CPU:" in name else name

    def physical_device(self, device: str) -> str:
        name = canonical_device_name(device)
        if ":GPU:" not in name:
            return name
        entry = _logical_entry(name)
        return f"/device:GPU:{entry[0]}" if entry else name


def default_source() -> MemorySource:
    """TensorFlow's allocator source."""
    return TensorFlowSource()


def memory_limit(device: str) -> int | None:
    """What GPU `device` may use at most: `logical_gpu_memory_limit`."""
    return logical_gpu_memory_limit(device)
