"""Device discovery and placement on TensorFlow."""

from __future__ import annotations

import tensorflow as tf


def list_logical_devices(device_type: str | None = None) -> list[str]:
    """Canonical names ("/device:GPU:0") of TensorFlow's logical devices."""
    kind = device_type.upper() if device_type else None
    names = []
    for device in tf.config.list_logical_devices(kind):
        spec = tf.DeviceSpec.from_string(device.name)
        names.append(f"/device:{spec.device_type}:{spec.device_index}")
    return names


def device_scope(name: str):
    return tf.device(name)
