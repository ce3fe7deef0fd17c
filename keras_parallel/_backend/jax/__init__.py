"""Keras 3 on the JAX backend: the same modules as every backend (devices, memory, probes,
accumulation). Where a feature does not exist yet for JAX, the module has the same names
and refuses with a message naming the backend.

The modules the dispatcher imports (devices, memory, probes, accumulation) import no
jax at module level (a source asks it when it is used), so they load on any install.
"""
