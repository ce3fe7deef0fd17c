"""Device discovery and placement on JAX."""

from __future__ import annotations

from keras_parallel._backend.common import devices as _common
from keras_parallel._backend.common.devices import list_devices
from keras_parallel._compat import keras

__all__ = ["backend_device_name", "device_scope", "list_devices", "split_cpu"]

_HINT = " On JAX, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts instead."


def backend_device_name(name: str) -> str:
    """JAX's name for a canonical device name: "/device:GPU:1" -> "gpu:1"."""
    _, kind, index = name.split(":")
    return f"{kind.lower()}:{index}"


def device_scope(name: str):
    """`keras.device` with JAX's name for the canonical device `name`.

    Outside a jitted function it places new arrays; inside one JAX ignores it
    (DataParallel shards instead: `_backend/jax/replicas.py`).
    """
    return keras.device(backend_device_name(name))


def split_cpu(num_devices: int) -> list[str]:
    """Refuses: splitting the CPU into logical devices needs TensorFlow."""
    return _common.split_cpu(num_devices, backend="jax", hint=_HINT)
