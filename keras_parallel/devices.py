"""Device discovery, naming and placement, on whichever backend is in use.

Device names are kept in one canonical form, ``"/device:GPU:0"``; every form a
user may write (``"/gpu:0"``, ``"GPU:1"``, ``"gpu"``, ``"/cpu:0"``, a full
``"/job:localhost/replica:0/task:0/device:GPU:0"``) is accepted and converted.
"""

from __future__ import annotations

from collections.abc import Sequence

from keras_parallel import _backend, _validation
from keras_parallel._backend.common.devices import canonical_device_name

__all__ = [
    "list_devices",
    "canonical_device_name",
    "resolve_devices",
    "device_scope",
    "split_cpu",
]


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
    return _backend.devices.list_devices(device_type)


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
    try:
        names = _validation.validate_devices(devices, "devices")
    except ValueError as error:
        raise ValueError(f"{error} Available devices: {available}") from None
    given = [devices] if isinstance(devices, str) else devices
    for device, name in zip(given, names, strict=True):
        if name not in available:
            hint = ""
            if ":CPU:" in name:
                hint = (
                    " To place work on several CPU devices, split the CPU first, at the "
                    "start of the program: keras_parallel.split_cpu(n) (on the command "
                    "line: --cpus n)."
                )
            raise ValueError(
                f"Invalid value for argument `devices`. Unknown device {device!r}. "
                f"Available devices: {available}.{hint}"
            )
    return names


def split_cpu(num_devices: int) -> list[str]:
    """Splits the CPU into logical devices, to run multi-device code without a GPU.

    TensorFlow can present the CPU as several logical devices. `DataParallel`,
    `plan`, `GPUMemoryLogger` and the `keras-parallel` command then see several
    devices, so a machine without GPUs (a laptop, CI) runs the same code as a
    machine with several GPUs: slicing, unequal splits, merging the outputs,
    gradient accumulation, saving and loading.

    Limits: the logical devices share the same cores and the same memory, so
    they add no compute: a run on them shows the mechanics and that the results
    are right, not speed. They have no memory limit, so `split="memory"` and
    `micro_batch_size="auto"` have no figures there: give ratios
    (`split=[2, 1]`) and `memory_budget`. TensorFlow backend only (Keras 3 on
    TensorFlow, or tf-keras).

    Call it at the start of the program, before anything starts TensorFlow's
    devices (creating a tensor or a model, listing logical devices): TensorFlow
    fixes its devices when it starts them. Calling it again with the same
    number, even later, does nothing.

    Args:
        num_devices: int. How many logical CPU devices to make, at least 1.

    Returns:
        The names of the logical CPU devices,
        ``["/device:CPU:0", ..., f"/device:CPU:{num_devices - 1}"]``.

    Raises:
        ValueError: if `num_devices` is not a positive int.
        RuntimeError: if TensorFlow's devices have already started with another
            number of CPU devices.
        NotImplementedError: on a Keras backend other than TensorFlow.

    Example:

    ```python
    import keras_parallel

    devices = keras_parallel.split_cpu(2)  # first thing in the program
    parallel = keras_parallel.DataParallel(model, devices=devices, split=[2, 1])
    ```
    """
    num_devices = _validation.validate_positive_int(num_devices, "num_devices")
    return _backend.devices.split_cpu(num_devices)


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
    """A context manager that places the ops created in it on device `name`.

    `name` is canonical ("/device:GPU:0"); each backend translates it to its own
    (TensorFlow's `tf.device`, `keras.device("gpu:0")` on JAX, `"cuda:0"` on torch).
    """
    return _backend.devices.device_scope(name)
