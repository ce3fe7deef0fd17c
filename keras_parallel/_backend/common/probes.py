"""Timing and memory probes: what every backend's probes share, and the generic refusals.

The shared pieces: `example_batch` (a generated batch of the model's input
shapes), `host_array` (its values, before a backend converts them) and
`samples_per_second` (the warm-up call and the median of timed calls). A backend
without probes of its own gets `measure_throughput` (it refuses) and
`peak_probe` (None: no statistics).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from keras_parallel._backend.common.models import input_structure
from keras_parallel._compat import backend_name

__all__ = [
    "PEAK_NOTE",
    "example_batch",
    "host_array",
    "measure_throughput",
    "peak_probe",
    "samples_per_second",
    "state_bytes",
    "steadied",
    "variable_bytes",
]

#: What a backend's `peak_probe` figures are, for `plan`'s notes when it is not
#: the allocator's peak; None: nothing to add.
PEAK_NOTE: str | None = None


def example_batch(model, rows: int, unknown_dim: int, make, map_structure):
    """A generated batch of `model`'s input structure, `rows` rows.

    Args:
        model: a built Keras model.
        rows: int. The batch's rows.
        unknown_dim: int. The size given to every unknown dimension but the batch's.
        make: callable ``make(shape, dtype) -> array``, `dtype` the input's own.
        map_structure: the backend's ``map_structure(fn, structure)``.
    """

    def one(tensor):
        shape = [rows] + [d if d is not None else unknown_dim for d in tensor.shape[1:]]
        return make(shape, tensor.dtype)

    return map_structure(one, input_structure(model))


def host_array(shape, dtype: str) -> np.ndarray:
    """Values for one generated input: uniform in [0, 1) as float32 for a float
    `dtype` (the backend casts), zeros of `dtype` otherwise (indices, masks)."""
    if "float" in dtype:
        return np.random.default_rng(0).uniform(size=shape).astype("float32")
    return np.zeros(shape, dtype=dtype)


def samples_per_second(run: Callable[[], object], rows: int, repeats: int) -> float:
    """`rows` divided by the median time of `repeats` calls of `run`, after a warm-up call.

    `run` must return only when its work is finished (the backend waits for the device).
    """
    run()  # trace, compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


def measure_throughput(
    model,
    device: str,
    batch_size: int,
    repeats: int = 3,
    unknown_dim: int = 8,
    *,
    backend: str | None = None,
) -> float:
    """Refuses: `split="speed"` has no measure on this backend."""
    backend = backend or backend_name()
    raise NotImplementedError(
        f"split='speed' is measured on the TensorFlow, JAX and torch backends; the "
        f"Keras backend here is {backend!r}. Pass explicit ratios instead."
    )


def peak_probe(model, device: str) -> Callable[[int], int | None] | None:
    """No allocator peak to measure here: None."""
    return None


_ITEMSIZE = {"bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def variable_bytes(variables) -> int:
    """Bytes the values of `variables` (variables or arrays, each counted once) take."""
    total, seen = 0, set()
    for v in variables:
        if id(v) in seen:
            continue
        seen.add(id(v))
        name = getattr(v.dtype, "name", None) or str(v.dtype)
        name = name.replace("_ref", "")
        itemsize = _ITEMSIZE.get(name) or np.dtype(name).itemsize
        total += int(np.prod(tuple(v.shape), dtype=np.int64)) * itemsize
    return total


def state_bytes(model) -> int:
    """Bytes of what a device holds for training `model` whatever the micro-batch.

    The model's variables (weights and non-trainable state) and its optimizer's
    (the slots, once built; for a compiled model whose optimizer is not built yet,
    those a copy of it builds for the model's weights; the user's optimizer is
    not touched). The one memory model: `plan()` and `GradientAccumulation("auto")`
    add this to the step's memory that a probe measures above what the device
    held before the step.
    """
    total = variable_bytes(getattr(model, "variables", None) or [])
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or isinstance(optimizer, str):
        return total
    variables = list(getattr(optimizer, "variables", None) or [])
    if callable(variables):  # tf-keras's legacy optimizers: a method
        variables = list(variables())
    if not _built(optimizer, variables):
        try:
            copy = type(optimizer).from_config(optimizer.get_config())
            copy.build(list(model.trainable_variables))
            variables = list(copy.variables() if callable(copy.variables) else copy.variables)
        except Exception:  # an optimizer that cannot be copied: its slots are unknown
            variables = []
    return total + variable_bytes(variables)


def _built(optimizer, variables) -> bool:
    built = getattr(optimizer, "built", None)  # Keras 3
    if built is not None:
        return bool(built)
    return len(variables) > 1  # tf-keras: `iterations` alone until built


def steadied(measure, repeats: int = 3):
    """`measure` (rows -> bytes or None), steadied for planning.

    Its first call runs the pass once unmeasured (what a first pass allocates
    once, kernels' constants or workspaces, is no step's memory), and each figure
    is the least of `repeats` passes (an input pipeline's threads that allocate on
    the same device meanwhile, as `fit`'s prefetching does, only ever add to a
    pass's peak).
    """
    calls = []

    def probe(rows):
        if not calls:
            calls.append(measure(rows))
        figures = [measure(rows) for _ in range(repeats)]
        if any(f is None for f in figures):
            return None
        return min(figures)

    return probe
