"""Device discovery, naming and placement, per backend.

Device names are kept in one canonical form, ``"/device:GPU:0"``; every form a
user may write (``"/gpu:0"``, ``"GPU:1"``, ``"gpu"``, ``"/cpu:0"``, a full
``"/job:localhost/replica:0/task:0/device:GPU:0"``) is accepted and converted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from keras_parallel._compat import IS_KERAS_3, backend_name, keras

__all__ = [
    "list_devices",
    "canonical_device_name",
    "resolve_devices",
    "device_scope",
]

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
    """Lists the devices this process can place work on, canonical names.

    Logical devices count: a CPU split into two logical CPUs lists two CPUs,
    and a GPU split into logical GPUs lists each of them.

    Args:
        device_type: str or None. ``"GPU"``, ``"CPU"`` (any case), or None for
            every device. Defaults to None.

    Returns:
        A list such as ``["/device:CPU:0", "/device:GPU:0", "/device:GPU:1"]``.
    """
    backend = backend_name()
    if backend == "tensorflow":
        from keras_parallel._tensorflow.devices import list_logical_devices

        return list_logical_devices(device_type)
    names = [canonical_device_name(d) for d in keras.distribution.list_devices()]
    names += [canonical_device_name(d) for d in keras.distribution.list_devices("cpu")]
    names = list(dict.fromkeys(names))
    if device_type:
        names = [n for n in names if n.split(":")[1] == device_type.upper()]
    return names


def resolve_devices(devices: None | int | str | Sequence[str] = None) -> list[str]:
    """Resolves the `devices` argument of `DataParallel` to canonical names.

    Args:
        devices: None for every visible GPU (logical GPUs count), an int n for
            the first n GPUs, or a list of device names. With no GPU at all,
            None gives ``["/device:CPU:0"]``.

    Returns:
        A non-empty list of distinct canonical device names.

    Raises:
        ValueError: for an unknown device (the message lists the available
            ones), a repeated device, an empty list, or an int below 1 or above
            the number of GPUs.
    """
    available = list_devices()
    gpus = [d for d in available if ":GPU:" in d]
    if devices is None:
        return gpus or ["/device:CPU:0"]
    if isinstance(devices, bool) or not isinstance(devices, int | str | Sequence):
        raise ValueError(
            "Invalid value for argument `devices`. Expected None, a positive int or a "
            f"list of device names. Received: devices={devices!r}"
        )
    if isinstance(devices, int):
        if devices < 1 or devices > max(len(gpus), 1):
            raise ValueError(
                "Invalid value for argument `devices`. Expected an int from 1 to the "
                f"number of visible GPUs ({len(gpus)}). Received: devices={devices}. "
                f"Available devices: {available}"
            )
        return gpus[:devices] if gpus else ["/device:CPU:0"]
    if isinstance(devices, str):
        devices = [devices]
    if len(devices) == 0:
        raise ValueError(
            "Invalid value for argument `devices`. Expected at least one device. "
            "Received: devices=[]"
        )
    names = []
    for device in devices:
        try:
            name = canonical_device_name(device)
        except ValueError as error:
            raise ValueError(
                f"Invalid value for argument `devices`. {error}. Available devices: {available}"
            ) from None
        if name not in available:
            raise ValueError(
                f"Invalid value for argument `devices`. Unknown device {device!r}. "
                f"Available devices: {available}"
            )
        if name in names:
            raise ValueError(
                "Invalid value for argument `devices`. Each device may appear once. "
                f"Received: devices={list(devices)!r}"
            )
        names.append(name)
    return names


def remap_missing_devices(devices: Sequence[str]) -> tuple[list[str], list[str]]:
    """Maps devices this machine lacks onto ones it has, for a reloaded model.

    A missing device is replaced by an available device of the same type,
    round-robin, or by the CPU when there is none of that type. The number of
    slices (and so the arithmetic) is unchanged.

    Returns:
        ``(devices, missing)``: the devices to use and the names that were missing.
    """
    available = list_devices()
    missing = [d for d in devices if d not in available]
    if not missing:
        return list(devices), []
    result = []
    turn = 0
    for device in devices:
        if device in available:
            result.append(device)
            continue
        kind = device.split(":")[1]
        same_kind = [d for d in available if d.split(":")[1] == kind]
        if same_kind:
            result.append(same_kind[turn % len(same_kind)])
            turn += 1
        else:
            result.append("/device:CPU:0")
    return result, missing


def device_scope(name: str):
    """A context manager that places the ops created in it on device `name`."""
    if IS_KERAS_3:
        return keras.device(name)
    from keras_parallel._tensorflow.devices import device_scope as tf_device_scope

    return tf_device_scope(name)
