"""Whole-card figures from NVML (`nvidia-ml-py`), on any backend.

pynvml is imported lazily, when a source first asks NVML.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from keras_parallel._backend.common.devices import canonical_device_name
from keras_parallel._backend.common.memory import MemoryReading, MemorySource

__all__ = [
    "NVMLSource",
    "map_visible_to_physical",
    "nvml_total_bytes",
    "parse_cuda_visible_devices",
]


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


def nvml_total_bytes(physical_index: int, nvml: NVMLSource | None = None) -> int | None:
    """The card's total memory from NVML for the framework's GPU index, or None."""
    nvml = nvml or NVMLSource()
    try:
        return nvml.read(f"/device:GPU:{physical_index}").limit_bytes
    except Exception:
        return None
