"""Timing and memory probes for a backend that has none of its own."""

from __future__ import annotations

from collections.abc import Callable

from keras_parallel._compat import backend_name

__all__ = ["measure_throughput", "peak_probe"]


def measure_throughput(
    model,
    device: str,
    batch_size: int,
    repeats: int = 3,
    unknown_dim: int = 8,
    *,
    backend: str | None = None,
) -> float:
    """Refuses: `split="speed"` is measured on TensorFlow only for now."""
    backend = backend or backend_name()
    raise NotImplementedError(
        f"split='speed' is measured on the TensorFlow backend only; the Keras "
        f"backend here is {backend!r}. Pass explicit ratios instead."
    )


def peak_probe(model, device: str) -> Callable[[int], int | None] | None:
    """No allocator peak to measure here: None."""
    return None
