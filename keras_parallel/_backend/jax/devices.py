"""Device discovery and placement on JAX."""

from __future__ import annotations

from keras_parallel._backend.common import devices as _common
from keras_parallel._backend.common.devices import EAGER_STEPS, list_devices
from keras_parallel._compat import keras

__all__ = [
    "CAN_SPLIT_CPU",
    "EAGER_STEPS",
    "backend_device_name",
    "collective_timeout_flag",
    "computed_rows",
    "cpu_devices",
    "device_scope",
    "jax_device",
    "list_devices",
    "move_to",
    "set_cpu_device_count",
    "split_cpu",
    "stand_in_cpus",
]

#: Whether the CPU can be made several devices: host devices, before JAX starts.
CAN_SPLIT_CPU = True

_HINT = " On JAX, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts instead."


def collective_timeout_flag(seconds: int = 600) -> str:
    """The XLA flag that gives the host devices' collectives `seconds` to meet, or "".

    A CPU all-reduce aborts the process when one device's thread is 40 s late
    (XLA's default), as on a busy laptop or a 2-core CI machine it can be. jaxlib
    0.8.0 and later take the flag; earlier ones abort on any flag they do not know,
    so there it is "" (and the 40 s stay).
    """
    from importlib import metadata

    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) < (0, 8):
        return ""
    return f"--xla_cpu_collective_call_terminate_timeout_seconds={seconds}"


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


def jax_device(canonical: str):
    """The JAX device for a canonical name ("/device:GPU:1" -> jax.devices("gpu")[1])."""
    import jax

    _, kind, index = canonical.split(":")
    platform = {"GPU": "gpu", "CPU": "cpu", "TPU": "tpu"}.get(kind, kind.lower())
    # This process's devices: with several JAX processes, jax.devices() lists them all.
    return jax.local_devices(backend=platform)[int(index)]


def move_to(value, device):
    """`value`'s arrays on `device` (canonical; None: unchanged): DataParallel's
    per-device path moves values between devices explicitly (JAX runs an
    operation where its committed inputs are, and refuses inputs on several);
    `jax.device_put` carries gradients back to where the values were."""
    if device is None:
        return value
    import jax
    import numpy as np

    target = jax_device(device)

    def move(x):
        if isinstance(x, jax.Array | np.ndarray | jax.core.Tracer):
            return jax.device_put(x, target)
        return x

    return jax.tree_util.tree_map(move, value)


def split_cpu(num_devices: int) -> list[str]:
    """Refuses: splitting the CPU into logical devices needs TensorFlow."""
    return _common.split_cpu(num_devices, backend="jax", hint=_HINT)


def computed_rows(sizes: list[int], ratios=None) -> list[int]:
    """The rows each device computes for DataParallel slices of `sizes` rows, cut by `ratios`.

    Unequal ratios run one program per device on its own rows: its own. Equal
    ratios (or None) run one SPMD program over a mesh, every slice padded to the
    largest (a batch that does not divide evenly pads the shorter slices by one row).
    """
    if ratios is not None and len(set(ratios)) > 1:
        return list(sizes)
    return [max(sizes, default=0)] * len(sizes)


def set_cpu_device_count(num_devices: int) -> list[str]:
    """Makes JAX's CPU `num_devices` devices, before JAX starts; their canonical names.

    JAX fixes its CPU devices when it starts (the first array, device list or
    compiled function): this sets ``jax_num_cpu_devices`` before that, like
    ``XLA_FLAGS=--xla_force_host_platform_device_count=N``. Once JAX has
    started, only the number it started with is accepted.

    Raises:
        RuntimeError: when JAX has started with another number of CPU devices.
    """
    import os
    import re

    import jax

    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except (AttributeError, RuntimeError, ValueError):  # started, or no such option
        # A JAX without jax_num_cpu_devices (0.4.30 has none): the XLA flag, read when JAX
        # starts. If it has started already, the count below tells.
        flags = re.sub(
            r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
        )
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
        )
        started = len(jax.devices("cpu"))
        if started != num_devices:
            raise RuntimeError(
                f"JAX's CPU cannot be made {num_devices} devices now: JAX has started, "
                f"with {started} CPU device(s). Set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={num_devices} in the environment "
                "before the program starts."
            ) from None
    return [f"/device:CPU:{i}" for i in range(num_devices)]


def cpu_devices(num_devices: int) -> list[str]:
    """JAX's CPU as `num_devices` host devices (`--cpus N`), before JAX starts.

    Also gives their collectives time to meet (`collective_timeout_flag`), when
    JAX has not started yet.

    Raises:
        RuntimeError: when JAX has started with another number of CPU devices.
    """
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    timeout = collective_timeout_flag()
    if timeout and "collective_call_terminate_timeout" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {timeout}".strip()
    return set_cpu_device_count(num_devices)


def stand_in_cpus(num_devices: int) -> bool:
    """Makes JAX's CPU `num_devices` host devices where there is no GPU; True if so.

    When JAX has started already, uses what it has: True when that is several
    CPU devices and no GPU.
    """
    try:
        cpu_devices(num_devices)
    except RuntimeError:  # started earlier: use what it has
        pass
    return not list_devices("GPU") and len(list_devices("CPU")) > 1
