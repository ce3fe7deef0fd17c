"""Per-device memory probes, per backend.

A *memory source* answers three questions about the devices it knows: which
devices there are (`devices()`), how much memory one uses now and at most since
its peak was last reset (`read(device)`), and whether that peak can be reset
(`reset_peak(device)`). `GPUMemoryLogger` only talks to a source, so a test can
inject one with fixed figures, and each backend brings its own:

- `TensorFlowSource` (TensorFlow, Keras 3 or tf-keras): what the allocator hands
  out now and at peak; the limit is a logical device's configured limit, else
  the card's total (NVML); the peak resets (`reset_memory_stats`). A CPU has
  figures only when TensorFlow started with ``TF_CPU_ALLOCATOR_USE_BFC=true``,
  with oneDNN on or off (oneDNN's own CPU figures count large blocks only).
- `JaxSource` (Keras 3 on JAX): `bytes_in_use`, `peak_bytes_in_use`,
  `bytes_limit`; the peak cannot be reset, so it is the peak since start.
- `TorchSource` (Keras 3 on torch): `memory_allocated`,
  `max_memory_allocated`, the card's total; the peak resets.
- `NVMLSource` (any backend, with nvidia-ml-py): the whole card's used and
  total memory (every process, the frameworks' reserved pools); no peak.
- `HostSource` (any): the process's resident set size (psutil); no peak.

Only this module and ``keras_parallel/_tensorflow/memory.py`` know about the
backends; TensorFlow, JAX, torch and pynvml are imported lazily, so that
importing this module under ``KERAS_BACKEND=jax`` or ``torch`` never imports
TensorFlow.

All figures are bytes; `MIB` (2**20) converts them to MiB.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from keras_parallel._compat import backend_name
from keras_parallel.devices import canonical_device_name

__all__ = [
    "MIB",
    "MemoryReading",
    "MemorySource",
    "HostSource",
    "NVMLSource",
    "JaxSource",
    "TorchSource",
    "default_source",
    "device_memory_limit",
    "parse_cuda_visible_devices",
]

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class MemoryReading:
    """What one device uses, in bytes.

    Attributes:
        current_bytes: int. Memory in use now.
        peak_bytes: int. The most in use since the peak was last reset (or
            since the process started, where the source cannot reset it).
        limit_bytes: int or None. What the device may use at most, where known.
    """

    current_bytes: int
    peak_bytes: int
    limit_bytes: int | None = None


class MemorySource:
    """Base class of the memory probes: subclass it to feed `GPUMemoryLogger`.

    Device names are canonical (``"/device:GPU:0"``). `read` may raise any
    exception for a device it cannot measure (a CPU without allocator
    statistics, a device that disappeared): callers treat that as "no figures".
    A source that cannot measure a device raises rather than returning zeros:
    a reading of 0 bytes means nothing is allocated.

    Example:

    ```python
    class FixedSource(keras_parallel.memory.MemorySource):
        def devices(self):
            return ["/device:GPU:0"]

        def read(self, device):
            return keras_parallel.memory.MemoryReading(2**30, 3 * 2**30, 8 * 2**30)
    ```
    """

    def devices(self) -> list[str]:
        """The accelerators this source measures (may be empty)."""
        return []

    def read(self, device: str) -> MemoryReading:
        """Returns the figures of `device`; raises when it has none."""
        raise NotImplementedError(f"{type(self).__name__} cannot read {device!r}.")

    def reset_peak(self, device: str) -> bool:
        """Resets the peak of `device`. Returns False where it cannot."""
        return False

    def allocator(self, device: str) -> str:
        """The device whose allocator `read(device)` reports.

        Devices that give the same answer share one allocator, so one set of
        figures (TensorFlow's logical CPU devices all share the CPU's). By
        default each device has its own.
        """
        return device

    def physical_device(self, device: str) -> str:
        """The framework's physical GPU that holds `device` (for NVML).

        A logical device carved out of a GPU maps to that GPU; by default a
        device is its own physical device.
        """
        return device


class HostSource(MemorySource):
    """The process's resident set size (RSS) via psutil, as device ``"host"``.

    RSS has no peak to reset: the peak reported is the current figure.
    """

    def __init__(self):
        import psutil

        self._process = psutil.Process()

    def devices(self) -> list[str]:
        return ["host"]

    def read(self, device: str = "host") -> MemoryReading:
        rss = int(self._process.memory_info().rss)
        return MemoryReading(rss, rss, None)


def parse_cuda_visible_devices(value: str | None) -> list[int | str] | None:
    """Splits a ``CUDA_VISIBLE_DEVICES`` value into its entries.

    Args:
        value: str or None. The variable's value; None when it is unset.

    Returns:
        None when unset (every GPU is visible, in NVML's order), else the list
        of entries: an int for an index, a str for a UUID (``"GPU-..."``,
        ``"MIG-..."``, possibly shortened). CUDA stops at the first entry it
        cannot use (a negative index, an empty entry, a repeat), and so does
        this function: ``"1,-1,0"`` gives ``[1]`` and ``"-1"`` or ``""`` give
        ``[]``.
    """
    if value is None:
        return None
    entries: list[int | str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            break
        if entry.lstrip("+-").isdigit():
            index = int(entry)
            if index < 0 or index in entries:
                break
            entries.append(index)
        else:
            if entry in entries:
                break
            entries.append(entry)
    return entries


def map_visible_to_physical(
    entries: list[int | str] | None, uuids: Sequence[str]
) -> list[int | None]:
    """Maps the framework's GPU index to NVML's physical index.

    Args:
        entries: the result of `parse_cuda_visible_devices`.
        uuids: the UUID of each NVML device, in NVML's order.

    Returns:
        A list whose item i is the NVML index of the framework's GPU i, or
        None where the entry names something NVML cannot read as a whole card
        (a MIG instance). Enumeration stops at the first entry that matches
        no card, as CUDA does.
    """
    if entries is None:
        return list(range(len(uuids)))
    result: list[int | None] = []
    for entry in entries:
        if isinstance(entry, int):
            if entry >= len(uuids):
                break
            result.append(entry)
            continue
        if entry.upper().startswith("MIG-"):
            result.append(None)
            continue
        wanted = entry.lower()
        if not wanted.startswith("gpu-"):
            wanted = "gpu-" + wanted
        matches = [i for i, uuid in enumerate(uuids) if uuid.lower().startswith(wanted)]
        if len(matches) != 1:
            break
        result.append(matches[0])
    return result


class NVMLSource(MemorySource):
    """Whole-card figures from NVML (`nvidia-ml-py`, ``import pynvml``).

    NVML counts everything on the card: other processes and the framework's
    reserved pools. Its device order is the bus order of every card; the
    framework's GPU i is mapped through ``CUDA_VISIBLE_DEVICES`` (indices or
    UUIDs). An entry that is a MIG instance has no whole-card figures and
    `read` raises for it. Without nvidia-ml-py or a driver, `devices()` is
    empty. NVML keeps no peak: the peak reported is the current figure.

    Args:
        cuda_visible_devices: str or None. Overrides the environment's
            ``CUDA_VISIBLE_DEVICES`` (for tests). Defaults to reading the
            environment.
    """

    def __init__(self, cuda_visible_devices: str | None = "__environ__"):
        self._visible = cuda_visible_devices
        self._pynvml = None
        self._map: list[int | None] | None = None
        self.error: str | None = None

    def _ensure(self) -> bool:
        if self._map is not None:
            return self._pynvml is not None
        self._map = []
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            uuids = []
            for i in range(count):
                uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
                uuids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
        except Exception as error:  # ImportError, NVMLError (no driver), ...
            self.error = f"{type(error).__name__}: {error}"
            return False
        visible = self._visible
        if visible == "__environ__":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._pynvml = pynvml
        self._map = map_visible_to_physical(parse_cuda_visible_devices(visible), uuids)
        return True

    def devices(self) -> list[str]:
        if not self._ensure():
            return []
        return [f"/device:GPU:{i}" for i in range(len(self._map))]

    def physical_index(self, device: str) -> int | None:
        """NVML's index for the framework's GPU `device`, None if unknown."""
        if not self._ensure():
            return None
        name = canonical_device_name(device)
        index = int(name.rsplit(":", 1)[1])
        if ":GPU:" not in name or index >= len(self._map):
            return None
        return self._map[index]

    def read(self, device: str) -> MemoryReading:
        index = self.physical_index(device)
        if index is None:
            raise ValueError(f"NVML has no whole-card figures for {device!r}.")
        pynvml = self._pynvml
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return MemoryReading(int(info.used), int(info.used), int(info.total))


class JaxSource(MemorySource):
    """JAX's allocator figures, ``device.memory_stats()`` (Keras 3 on JAX).

    JAX cannot reset its peak: `peak_bytes` is the high-water mark since the
    process started. ``bytes_limit`` is the pool JAX may use (75% of the card
    by default; see ``XLA_PYTHON_CLIENT_MEM_FRACTION``).
    """

    def _gpus(self):
        import jax

        return [d for d in jax.local_devices() if d.platform in ("gpu", "cuda", "rocm")]

    def devices(self) -> list[str]:
        try:
            return [f"/device:GPU:{i}" for i in range(len(self._gpus()))]
        except Exception:
            return []

    def read(self, device: str) -> MemoryReading:
        name = canonical_device_name(device)
        index = int(name.rsplit(":", 1)[1])
        if ":GPU:" not in name:
            raise ValueError(f"JAX reports no memory statistics for {device!r}.")
        stats = self._gpus()[index].memory_stats()
        if not stats:
            raise ValueError(f"JAX reports no memory statistics for {device!r}.")
        limit = stats.get("bytes_limit")
        return MemoryReading(
            int(stats.get("bytes_in_use", 0)),
            int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))),
            int(limit) if limit else None,
        )


class TorchSource(MemorySource):
    """torch's CUDA caching-allocator figures (Keras 3 on torch).

    Current and peak are what tensors hold (`memory_allocated`,
    `max_memory_allocated`), not the cache torch reserved; the peak resets
    with `reset_peak_memory_stats`. The limit is the card's total memory.
    """

    @staticmethod
    def _index(device: str) -> int:
        name = canonical_device_name(device)
        if ":GPU:" not in name:
            raise ValueError(f"torch reports no memory statistics for {device!r}.")
        return int(name.rsplit(":", 1)[1])

    def devices(self) -> list[str]:
        try:
            import torch

            if not torch.cuda.is_available():
                return []
            return [f"/device:GPU:{i}" for i in range(torch.cuda.device_count())]
        except Exception:
            return []

    def read(self, device: str) -> MemoryReading:
        import torch

        index = self._index(device)
        return MemoryReading(
            int(torch.cuda.memory_allocated(index)),
            int(torch.cuda.max_memory_allocated(index)),
            int(torch.cuda.get_device_properties(index).total_memory),
        )

    def reset_peak(self, device: str) -> bool:
        import torch

        try:
            torch.cuda.reset_peak_memory_stats(self._index(device))
        except Exception:
            return False
        return True


def default_source() -> MemorySource:
    """The allocator source of the backend in use (TensorFlow, JAX or torch)."""
    backend = backend_name()
    if backend == "tensorflow":
        from keras_parallel._tensorflow.memory import TensorFlowSource

        return TensorFlowSource()
    if backend == "jax":
        return JaxSource()
    if backend == "torch":
        return TorchSource()
    return MemorySource()


def nvml_total_bytes(physical_index: int, nvml: NVMLSource | None = None) -> int | None:
    """The card's total memory from NVML for the framework's GPU index, or None."""
    nvml = nvml or NVMLSource()
    try:
        return nvml.read(f"/device:GPU:{physical_index}").limit_bytes
    except Exception:
        return None


def device_memory_limit(device: str) -> int | None:
    """What `device` may use at most, in bytes; None where it is not known.

    On TensorFlow this is the memory limit of the logical device when one was
    configured (`tf.config.set_logical_device_configuration`), else the card's
    total memory (from NVML). On JAX it is the pool JAX may use, on torch the
    card's total memory. A CPU has no limit: None.

    Args:
        device: str. A device name such as ``"/gpu:1"`` or ``"GPU:0"``.

    Returns:
        The limit in bytes, or None.
    """
    name = canonical_device_name(device)
    if ":GPU:" not in name:
        return None
    backend = backend_name()
    try:
        if backend == "tensorflow":
            from keras_parallel._tensorflow.memory import logical_gpu_memory_limit

            return logical_gpu_memory_limit(name)
        if backend == "jax":
            return JaxSource().read(name).limit_bytes
        if backend == "torch":
            return TorchSource().read(name).limit_bytes
    except Exception:
        return None
    return None
