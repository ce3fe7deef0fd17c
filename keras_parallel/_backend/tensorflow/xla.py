"""Whether TensorFlow is tracing code for XLA (`jit_compile=True`).

XLA compiles a whole function for one device and drops the device placement
inside it, which would put every slice of a `DataParallel` model on one device.
TensorFlow has no public query for "am I inside an XLA-compiled function", so
this module reads it from the graph being traced: the one place keras_parallel
touches private attributes of public TensorFlow objects (`Graph` returned by
`tf.compat.v1.get_default_graph()`). `tests/test_xla.py` fails if TensorFlow
changes them.
"""

from __future__ import annotations

import tensorflow as tf


def inside_xla_compilation() -> bool:
    """True while tracing a function that XLA will compile (or a branch inside one)."""
    if tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        context = graph._get_control_flow_context()
        while context is not None:
            if context.IsXLAContext():
                return True
            context = context.outer_context
        graph = getattr(graph, "outer_graph", None)
    return False
