"""Device discovery and placement on torch.

Keras 3's `keras.distribution` does not exist on the torch backend, so devices
are listed from torch itself: every CUDA device (`"/device:GPU:i"`, torch's
`cuda:i`) and the CPU (`"/device:CPU:0"`, torch's `cpu`; torch has one).
"""

from __future__ import annotations

import torch

from keras_parallel._backend.common import devices as _common
from keras_parallel._backend.common.devices import (
    computed_rows,
    cpu_devices,
    move_to,
    stand_in_cpus,
)
from keras_parallel._compat import keras

__all__ = [
    "CAN_SPLIT_CPU",
    "EAGER_STEPS",
    "backend_device_name",
    "computed_rows",
    "cpu_devices",
    "device_scope",
    "list_devices",
    "move_to",
    "split_cpu",
    "stand_in_cpus",
]

#: Whether the CPU can be made several devices: torch has one CPU device.
CAN_SPLIT_CPU = False

#: torch runs `fit`'s steps eagerly: the model's Python runs on every step.
EAGER_STEPS = True


def list_devices(device_type: str | None = None) -> list[str]:
    """Canonical names of torch's devices: the CUDA GPUs, then the CPU."""
    names = [f"/device:GPU:{i}" for i in range(torch.cuda.device_count())]
    names.append("/device:CPU:0")
    if device_type:
        names = [n for n in names if n.split(":")[1] == device_type.upper()]
    return names


def backend_device_name(name: str) -> str:
    """torch's name for a canonical device name: "/device:GPU:1" -> "cuda:1"."""
    _, kind, index = name.split(":")
    if kind == "GPU":
        return f"cuda:{index}"
    if kind == "CPU":
        return "cpu"
    return f"{kind.lower()}:{index}"


def device_scope(name: str):
    """`keras.device` with torch's name: tensors made in it, and the inputs Keras
    converts in it, are on that device (a copy that carries the gradient back)."""
    return keras.device(backend_device_name(name))


def split_cpu(num_devices: int) -> list[str]:
    """Refuses: splitting the CPU into logical devices needs TensorFlow."""
    return _common.split_cpu(num_devices, backend="torch")
