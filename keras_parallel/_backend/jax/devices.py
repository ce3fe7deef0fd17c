"""Device discovery and placement on JAX (through `keras.distribution` and `keras.device`)."""

from __future__ import annotations

from keras_parallel._backend.common import devices as _common
from keras_parallel._backend.common.devices import device_scope, list_devices

__all__ = ["device_scope", "list_devices", "split_cpu"]

_HINT = " On JAX, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts instead."


def split_cpu(num_devices: int) -> list[str]:
    """Refuses: splitting the CPU into logical devices needs TensorFlow."""
    return _common.split_cpu(num_devices, backend="jax", hint=_HINT)
