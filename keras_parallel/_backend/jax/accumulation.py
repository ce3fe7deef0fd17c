"""`GradientAccumulation` on jax: not yet. The generic refusing mechanisms of
`_backend/common/accumulation.py` (they name the backend in use); this module
exists so that every backend has the same modules, and is where jax's own
accumulation goes.
"""

from keras_parallel._backend.common.accumulation import (
    OUT_OF_MEMORY_ERRORS,
    AccumulatingTrainFunction,
    check_supported,
    own_train_function,
)

__all__ = [
    "AccumulatingTrainFunction",
    "OUT_OF_MEMORY_ERRORS",
    "check_supported",
    "own_train_function",
]
