"""DataParallel's replicas on TensorFlow: the generic path, and no XLA.

XLA compiles the whole training step for one device and ignores where each
slice is placed, so every slice would run on one device (the out-of-memory
DataParallel exists to avoid): a DataParallel model compiles without XLA, and
its replicas layer says it does not support it (Keras 3's `jit_compile="auto"`
then resolves to no XLA where a GPU exists).
"""

from __future__ import annotations

from keras_parallel._backend.common.replicas import MASKS_READABLE, call, check_fit_supported

__all__ = ["MASKS_READABLE", "SUPPORTS_JIT", "call", "check_fit_supported", "compile_jit"]

#: XLA drops the slices' placement.
SUPPORTS_JIT = False


def compile_jit(core, jit):
    """No XLA: an explicit `jit_compile=True` is turned off (why: "xla_drops_placement")."""
    if jit is True:
        return False, "xla_drops_placement"
    if jit == "auto":
        return False, None
    return jit, None
