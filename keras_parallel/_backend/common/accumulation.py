"""`GradientAccumulation`'s mechanisms, for a backend that has none of its own (yet).

`check_supported` refuses with the message `GradientAccumulation` has always given;
the other names exist so that every backend has the same ones, and refuse too.
"""

from __future__ import annotations

from keras_parallel._compat import backend_name

__all__ = [
    "AccumulatingTrainFunction",
    "OUT_OF_MEMORY_ERRORS",
    "check_supported",
    "own_train_function",
]

#: Errors a step raises when the device runs out of memory: none known here.
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = ()


def check_supported(backend: str | None = None) -> None:
    """Raises ValueError: gradient accumulation needs the TensorFlow backend for now."""
    backend = backend or backend_name()
    raise ValueError(
        "GradientAccumulation needs the TensorFlow backend. Expected "
        f'KERAS_BACKEND="tensorflow". Received: backend={backend!r}'
    )


def _not_implemented(backend: str | None) -> NotImplementedError:
    backend = backend or backend_name()
    return NotImplementedError(
        "GradientAccumulation needs the TensorFlow backend for now; the Keras backend "
        f"here is {backend!r}."
    )


class AccumulatingTrainFunction:
    """Refuses: no accumulating train function on this backend."""

    backend: str | None = None

    def __init__(self, model, run_batch, num_replicas=1):
        raise _not_implemented(self.backend)


def own_train_function(model, backend: str | None = None):
    """Refuses: no accumulating train function on this backend."""
    raise _not_implemented(backend)
