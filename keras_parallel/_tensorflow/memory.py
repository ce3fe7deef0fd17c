"""TensorFlow's allocator statistics (`tf.config.experimental.get_memory_info`)."""

from __future__ import annotations

import tensorflow as tf

from keras_parallel.devices import canonical_device_name
from keras_parallel.memory import MemoryReading, MemorySource, nvml_total_bytes

MIB = 2**20


def _short(name: str) -> str:
    """ "/device:GPU:0" -> "GPU:0", the form `get_memory_info` takes."""
    return canonical_device_name(name).replace("/device:", "")


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
    On a CPU both raise (no allocator statistics) unless TensorFlow started
    with ``TF_CPU_ALLOCATOR_USE_BFC=true``. The limit is the logical device's
    configured memory limit, else the card's total from NVML, else unknown;
    it is looked up once per device.
    """

    def __init__(self):
        self._limits: dict[str, int | None] = {}

    def devices(self) -> list[str]:
        from keras_parallel._tensorflow.devices import list_logical_devices

        return list_logical_devices("GPU")

    def read(self, device: str) -> MemoryReading:
        name = canonical_device_name(device)
        info = tf.config.experimental.get_memory_info(_short(name))
        if name not in self._limits:
            self._limits[name] = logical_gpu_memory_limit(name)
        return MemoryReading(int(info["current"]), int(info["peak"]), self._limits[name])

    def reset_peak(self, device: str) -> bool:
        try:
            tf.config.experimental.reset_memory_stats(_short(device))
        except Exception:
            return False
        return True

    def physical_device(self, device: str) -> str:
        name = canonical_device_name(device)
        if ":GPU:" not in name:
            return name
        entry = _logical_entry(name)
        return f"/device:GPU:{entry[0]}" if entry else name
