"""Timing and memory probes on torch: none yet (`split="speed"` refuses, no measured peaks)."""

from __future__ import annotations

from keras_parallel._backend.common import probes as _common
from keras_parallel._backend.common.probes import peak_probe

__all__ = ["measure_throughput", "peak_probe"]


def measure_throughput(model, device, batch_size, repeats=3, unknown_dim=8):
    """Refuses: `split="speed"` is measured on TensorFlow only for now."""
    return _common.measure_throughput(
        model, device, batch_size, repeats, unknown_dim, backend="torch"
    )
