"""DataParallel's replicas: what a backend decides about running them.

The generic answers, for backends without a ``replicas`` module of their own
(torch, and any other Keras backend): the slices run through the generic path of
`ParallelReplicas` (each slice placed on its device in turn), and `compile` keeps
the `jit_compile` it is given. TensorFlow and JAX answer in their own modules.

`core` is the `ParallelReplicas` layer: backend modules never import it, they
use its attributes (`num_replicas`, `placement`, `ratios`) and the methods it
hands them.
"""

from __future__ import annotations

__all__ = ["MASKS_READABLE", "SUPPORTS_JIT", "call", "check_fit_supported", "compile_jit"]

#: Whether a Keras mask on a tensor can be read where the slices meet (the
#: whole-batch BatchNormalization walk needs it for masked inputs).
MASKS_READABLE = True

#: Whether a layer of slices placed on devices survives an XLA-compiled step.
SUPPORTS_JIT = True


def call(core, inputs, training):
    """This backend's own way to run the replicas: (outputs, loss), or None for the generic path."""
    return None


def compile_jit(core, jit):
    """The `jit_compile` a DataParallel model over `core` compiles with.

    Returns (jit_compile, why) where `why` names a change the user should be
    told of (the caller words it), or None.
    """
    return jit, None


def check_fit_supported(core) -> None:
    """Raises where this backend cannot `fit` a DataParallel model over `core` here."""
    return None
