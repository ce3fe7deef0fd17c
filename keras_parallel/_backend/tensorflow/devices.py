"""Device discovery, CPU splitting and placement on TensorFlow."""

from __future__ import annotations

import tensorflow as tf

from keras_parallel._backend.common.devices import EAGER_STEPS, computed_rows, move_to

__all__ = [
    "CAN_SPLIT_CPU",
    "EAGER_STEPS",
    "computed_rows",
    "cpu_devices",
    "device_scope",
    "list_devices",
    "move_to",
    "list_logical_devices",
    "split_cpu",
    "stand_in_cpus",
]

#: Whether the CPU can be made several devices: logical CPUs (`split_cpu`).
CAN_SPLIT_CPU = True


def list_logical_devices(device_type: str | None = None) -> list[str]:
    """Canonical names ("/device:GPU:0") of TensorFlow's logical devices."""
    kind = device_type.upper() if device_type else None
    names = []
    for device in tf.config.list_logical_devices(kind):
        spec = tf.DeviceSpec.from_string(device.name)
        names.append(f"/device:{spec.device_type}:{spec.device_index}")
    return names


#: The devices work can be placed on: TensorFlow's logical devices.
list_devices = list_logical_devices


def split_cpu(num_devices: int) -> list[str]:
    """Splits the CPU into `num_devices` logical devices (see `keras_parallel.split_cpu`)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
        )
    except RuntimeError:  # the devices have started: only the same split is possible
        started = len(tf.config.list_logical_devices("CPU"))
        if started != num_devices:
            raise RuntimeError(
                f"split_cpu({num_devices}) comes too late: TensorFlow has already started "
                f"its devices, with {started} CPU device(s). Call "
                f"keras_parallel.split_cpu({num_devices}) at the start of the program, "
                "before anything creates a tensor or a model or lists TensorFlow's devices."
            ) from None
    return [f"/device:CPU:{i}" for i in range(num_devices)]


def cpu_devices(num_devices: int) -> list[str]:
    """The CPU as `num_devices` logical devices (`--cpus N`): `split_cpu`."""
    return split_cpu(num_devices)


def stand_in_cpus(num_devices: int) -> bool:
    """Splits the CPU into `num_devices` logical devices where there is no GPU; True if so.

    When TensorFlow has started its devices already, uses what it has: True when
    that is several CPU devices.
    """
    if tf.config.list_physical_devices("GPU"):
        return False
    try:
        split_cpu(num_devices)
    except RuntimeError:  # started earlier in this process: use what it has
        return len(tf.config.list_logical_devices("CPU")) > 1
    return True


def device_scope(name: str):
    return tf.device(name)
