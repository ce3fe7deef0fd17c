"""Timing and memory of a model's forward/backward pass on one device (torch).

The pass is eager: `model.stateless_call` on the variables' values (the model's
own parameters where they are already on the device, copies elsewhere) and a
generated batch, then `torch.autograd.grad` of the summed outputs, which returns
the gradients without writing any `.grad`: the model is unchanged. torch is
imported when a probe runs.

Memory: torch's CUDA allocator peak (`max_memory_allocated` after
`reset_peak_memory_stats`); the CPU keeps no statistics, so there is no probe.
"""

from __future__ import annotations

from collections.abc import Callable

from keras_parallel._backend.common.probes import (
    PEAK_NOTE,
    example_batch,
    host_array,
    samples_per_second,
    steadied,
)
from keras_parallel._backend.torch.devices import backend_device_name, device_scope
from keras_parallel._compat import keras

__all__ = ["PEAK_NOTE", "measure_peak_bytes", "measure_throughput", "peak_probe"]


def _pass(model, device: str, rows: int, unknown_dim: int) -> Callable[[], None]:
    """One forward/backward pass of `rows` generated rows on `device`, waited for."""
    import torch

    target = torch.device(backend_device_name(device))

    def on_device(variable, grad):
        value = variable.value
        if value.device == target:
            return value
        return value.detach().to(target).requires_grad_(grad)

    trainable = [on_device(v, True) for v in model.trainable_variables]
    non_trainable = [on_device(v, False) for v in model.non_trainable_variables]

    def make(shape, dtype):
        dtype = keras.backend.standardize_dtype(dtype)
        return torch.as_tensor(host_array(shape, dtype), device=target).to(getattr(torch, dtype))

    inputs = example_batch(model, rows, unknown_dim, make, keras.tree.map_structure)
    wanted = [t for t in trainable if t.requires_grad]

    def run():
        with device_scope(device):
            outputs, _ = model.stateless_call(trainable, non_trainable, inputs, training=True)
            total = sum(o.float().sum() for o in keras.tree.flatten(outputs))
            if wanted and total.requires_grad:
                torch.autograd.grad(total, wanted, allow_unused=True)
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    return run


def measure_throughput(
    model, device: str, batch_size: int, repeats: int = 3, unknown_dim: int = 8
) -> float:
    """Samples per second of one forward and backward pass of `model` on `device`.

    A generated batch of the model's input shapes is used; the gradients are
    computed and dropped, and the model is unchanged.
    """
    return samples_per_second(_pass(model, device, batch_size, unknown_dim), batch_size, repeats)


def measure_peak_bytes(model, device: str, rows: int, unknown_dim: int = 8) -> int:
    """Bytes one forward/backward pass of `rows` rows allocates on `device` at its peak.

    torch's allocator peak during the pass less what it held just before (the
    step's own memory, not the weights or other tensors already there). `device`
    is a GPU (torch keeps statistics for CUDA only).
    """
    import torch

    target = torch.device(backend_device_name(device))
    run = _pass(model, device, rows, unknown_dim)
    torch.cuda.synchronize(target)
    torch.cuda.reset_peak_memory_stats(target)
    before = int(torch.cuda.memory_allocated(target))
    run()
    torch.cuda.synchronize(target)
    return int(torch.cuda.max_memory_allocated(target)) - before


def peak_probe(model, device: str) -> Callable[[int], int] | None:
    """``rows -> measure_peak_bytes(model, device, rows)`` on a GPU; None on the CPU."""
    if ":GPU:" not in device:
        return None
    return steadied(lambda rows: measure_peak_bytes(model, device, rows))
