"""Device discovery and placement on torch (through `keras.distribution` and `keras.device`)."""

from __future__ import annotations

from keras_parallel._backend.common import devices as _common
from keras_parallel._backend.common.devices import device_scope, list_devices

__all__ = ["device_scope", "list_devices", "split_cpu"]


def split_cpu(num_devices: int) -> list[str]:
    """Refuses: splitting the CPU into logical devices needs TensorFlow."""
    return _common.split_cpu(num_devices, backend="torch")
