"""The one dispatcher: the backend's modules, chosen once (as Keras's ``backend/__init__.py``).

Each backend has the same modules, under ``_backend/<name>/``:

- ``devices``: `list_devices`, `split_cpu`, `device_scope`, `computed_rows` (the
  rows each device computes: padded to the largest slice on JAX);
- ``memory``: the allocator's `MemorySource` (`default_source`) and `memory_limit`;
- ``probes``: `measure_throughput` (``split="speed"``), `peak_probe` (``plan``) and
  `PEAK_NOTE` (what the peaks are, where not an allocator's);
- ``replicas``: what DataParallel's replicas need of the backend: `call` (its own
  way to run them, or None for the generic path), `compile_jit`,
  `check_fit_supported`, `MASKS_READABLE`, `SUPPORTS_JIT`;
- ``ops`` (TensorFlow only): the tensor helpers tf-keras uses where Keras 3 has
  `keras.ops`;
- ``accumulation``: `check_supported`, `AccumulatingTrainFunction`,
  `own_train_function`, `OUT_OF_MEMORY_ERRORS`, `PROBE_RUNS_NOTHING`,
  `NO_PROBE_REASON` (`GradientAccumulation`).

The backend is `keras_parallel._compat.backend_name()`: Keras 3's backend, and
"tensorflow" for tf-keras (the tf-keras *flavour* is Keras 2 on the TensorFlow
*backend*: it uses the TensorFlow modules). A backend without modules of its own
gets the generic ones of ``_backend/common``. Only the chosen backend's modules are
imported: under ``KERAS_BACKEND=jax`` or ``torch`` TensorFlow is never imported.

Public modules call through this module's attributes (``_backend.devices.split_cpu``),
never import a backend's modules by name; backend modules import only each other,
``_backend.common`` and ``keras_parallel._compat``.
"""

from __future__ import annotations

from keras_parallel._backend.jax.memory import JaxSource
from keras_parallel._backend.torch.memory import TorchSource
from keras_parallel._compat import backend_name

__all__ = [
    "BACKEND",
    "JaxSource",
    "TorchSource",
    "tensorflow_source_class",
    "accumulation",
    "cross_replica_sum",
    "in_replicas_that_sync",
    "devices",
    "inside_xla_compilation",
    "memory",
    "ops",
    "probes",
    "replicas",
]

#: The backend whose modules this dispatcher gives: "tensorflow", "jax", "torch", or
#: another Keras backend (which gets the generic modules).
BACKEND = backend_name()

if BACKEND == "tensorflow":
    from keras_parallel._backend.tensorflow import (
        accumulation,
        devices,
        memory,
        ops,
        probes,
        replicas,
    )
    from keras_parallel._backend.tensorflow.ops import cross_replica_sum, in_replicas_that_sync
    from keras_parallel._backend.tensorflow.xla import inside_xla_compilation
else:
    #: TensorFlow's tensor helpers, for tf-keras: none on this backend (Keras 3's
    #: `keras.ops` serves).
    ops = None

    if BACKEND == "jax":
        from keras_parallel._backend.jax import accumulation, devices, memory, probes, replicas
    elif BACKEND == "torch":
        from keras_parallel._backend.common import replicas
        from keras_parallel._backend.torch import accumulation, devices, memory, probes
    else:
        from keras_parallel._backend.common import (
            accumulation,
            devices,
            memory,
            probes,
            replicas,
        )

    def inside_xla_compilation() -> bool:
        """True while TensorFlow traces a function for XLA: never on this backend."""
        return False

    def in_replicas_that_sync() -> bool:
        """Inside a `tf.distribute` strategy's replicas: never on this backend."""
        return False

    def cross_replica_sum(values: list) -> list:
        """`values` summed over a `tf.distribute` strategy's replicas: none on this backend
        (JAX's `keras.distribution` arrays are global already)."""
        return list(values)


def tensorflow_source_class():
    """`TensorFlowSource`, imported when asked for (it imports TensorFlow).

    `JaxSource` and `TorchSource` (above) import their framework only when used,
    so every backend's public memory sources can be named on any backend.
    """
    from keras_parallel._backend.tensorflow.memory import TensorFlowSource

    return TensorFlowSource
