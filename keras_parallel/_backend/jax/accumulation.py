"""`GradientAccumulation` on JAX: not yet; every name refuses, naming the backend."""

from __future__ import annotations

from keras_parallel._backend.common import accumulation as _common

__all__ = [
    "AccumulatingTrainFunction",
    "OUT_OF_MEMORY_ERRORS",
    "check_supported",
    "own_train_function",
]

OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = ()


def check_supported() -> None:
    """Raises ValueError: gradient accumulation needs the TensorFlow backend for now."""
    _common.check_supported(backend="jax")


class AccumulatingTrainFunction(_common.AccumulatingTrainFunction):
    """Refuses: no accumulating train function on JAX yet."""

    backend = "jax"


def own_train_function(model):
    """Refuses: no accumulating train function on JAX yet."""
    return _common.own_train_function(model, backend="jax")
