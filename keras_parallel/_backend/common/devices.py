"""Device names, and device listing through `keras.distribution` (any Keras 3 backend).

Device names are kept in one canonical form, ``"/device:GPU:0"``; every form a
user may write (``"/gpu:0"``, ``"GPU:1"``, ``"gpu"``, ``"/cpu:0"``, a full
``"/job:localhost/replica:0/task:0/device:GPU:0"``) is accepted and converted.
"""

from __future__ import annotations

import re

from keras_parallel._compat import backend_name, keras

__all__ = [
    "CAN_SPLIT_CPU",
    "EAGER_STEPS",
    "canonical_device_name",
    "computed_rows",
    "cpu_devices",
    "device_scope",
    "list_devices",
    "move_to",
    "split_cpu",
    "stand_in_cpus",
]

#: Whether the CPU can be made several devices (`cpu_devices`): not here.
CAN_SPLIT_CPU = False

#: Whether `fit` runs the model's Python on every step (no traced or compiled
#: step): then each layer call costs every step, and DataParallel over one device
#: skips its own layers (see `ParallelModel.call`).
EAGER_STEPS = False

_DEVICE_RE = re.compile(
    r"^(?:/job:[^/]+)?(?:/replica:\d+)?(?:/task:\d+)?/?(?:device:)?"
    r"(?P<type>[a-z_]+)(?::(?P<index>\d+))?$",
    re.IGNORECASE,
)


def canonical_device_name(name: str) -> str:
    """Returns `name` in the canonical form ``"/device:TYPE:INDEX"``.

    Args:
        name: str. A device name such as ``"/gpu:0"``, ``"GPU:1"``, ``"cpu"``
            or ``"/job:localhost/replica:0/task:0/device:GPU:0"``. A name
            without an index means index 0.

    Raises:
        ValueError: when `name` is not a device name.
    """
    if not isinstance(name, str):
        raise ValueError(
            f"Invalid device name. Expected a string such as '/gpu:0'. Received: {name!r}"
        )
    match = _DEVICE_RE.match(name.strip())
    if match is None:
        raise ValueError(
            "Invalid device name. Expected a string such as '/gpu:0', 'GPU:1' or "
            f"'/cpu:0'. Received: {name!r}"
        )
    kind = match.group("type").upper()
    index = int(match.group("index") or 0)
    return f"/device:{kind}:{index}"


def list_devices(device_type: str | None = None) -> list[str]:
    """Canonical names of the devices `keras.distribution.list_devices` gives."""
    names = [canonical_device_name(d) for d in keras.distribution.list_devices()]
    names += [canonical_device_name(d) for d in keras.distribution.list_devices("cpu")]
    names = list(dict.fromkeys(names))
    if device_type:
        names = [n for n in names if n.split(":")[1] == device_type.upper()]
    return names


def split_cpu(num_devices: int, backend: str | None = None, hint: str = "") -> list[str]:
    """Refuses: splitting the CPU into logical devices needs TensorFlow."""
    backend = backend or backend_name()
    raise NotImplementedError(
        "split_cpu() splits TensorFlow's CPU device, so it needs the TensorFlow "
        f"backend; the Keras backend here is {backend!r}.{hint}"
    )


def cpu_devices(num_devices: int, backend: str | None = None) -> list[str]:
    """The CPU as `num_devices` devices, as this backend allows (`--cpus N`): one, here.

    Raises:
        NotImplementedError: for more than one device.
    """
    backend = backend or backend_name()
    if num_devices > 1:
        raise NotImplementedError(
            f"{backend} has one CPU device, /device:CPU:0: --cpus cannot split it. Run "
            "without --cpus, or use the TensorFlow or JAX backend to try several devices."
        )
    return ["/device:CPU:0"]


def stand_in_cpus(num_devices: int) -> bool:
    """Makes the CPU `num_devices` devices where there is no GPU; True if it did.

    For a run that should show several devices on any machine (the demo). Here
    the CPU is one device: never.
    """
    return False


def device_scope(name: str):
    """A context manager that places the ops created in it on device `name`."""
    return keras.device(name)


def computed_rows(sizes: list[int], ratios=None) -> list[int]:
    """The rows each device computes for DataParallel slices of `sizes` rows (cut by
    `ratios`): its own."""
    return list(sizes)


def move_to(value, device):
    """`value` as it is: on this backend an operation reads its inputs from any device
    (only JAX's per-device path moves values explicitly)."""
    return value
