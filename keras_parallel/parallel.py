"""`DataParallel`: a model that runs a template model on a slice of every batch per device."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from keras_parallel import _graph, _ops
from keras_parallel._backend.common.models import input_structure
from keras_parallel._compat import IS_KERAS_3, keras
from keras_parallel._validation import validate_batch_norm, validate_ratios
from keras_parallel._warnings import warn
from keras_parallel.devices import resolve_devices
from keras_parallel.layers.batch_slice import BatchSlice
from keras_parallel.layers.parallel_replicas import ParallelReplicas
from keras_parallel.parallel_model import ParallelModel
from keras_parallel.probes import DeviceProbe, split_ratios

__all__ = ["DataParallel", "unwrap", "replicas", "custom_objects"]

logger = logging.getLogger("keras_parallel")

_warned_single_device = False


def _keras_package_of(obj) -> str | None:
    """ "keras" or "tf_keras" when `obj` is a model of that package, else None."""
    for cls in type(obj).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root in ("keras", "tf_keras") and cls.__name__ in ("Model", "Layer"):
            return root
    return None


def _check_template(model):
    if not isinstance(model, keras.Model):
        package = _keras_package_of(model)
        using = "Keras 3 (`keras`)" if IS_KERAS_3 else "tf-keras (`tf_keras`)"
        if package is not None and (package == "tf_keras") == IS_KERAS_3:
            other = "tf-keras (`tf_keras`)" if package == "tf_keras" else "Keras 3 (`keras`)"
            raise ValueError(
                f"Invalid value for argument `model`. The model comes from {other}, but "
                f"keras_parallel is using {using}. Both must use the same Keras: "
                "keras_parallel follows TensorFlow's switch `TF_USE_LEGACY_KERAS`, read "
                "once when keras_parallel is first imported (set it to 1 for tf-keras, "
                "leave it unset for Keras 3), so set it before importing keras_parallel "
                "and build the model with the matching package. Received: model "
                f"{getattr(model, 'name', model)!r} of type {type(model).__module__}."
                f"{type(model).__name__}"
            )
        hint = (
            " (a path: load the model first, with `keras.models.load_model(path)`)"
            if isinstance(model, str | bytes) or hasattr(model, "__fspath__")
            else ""
        )
        raise ValueError(
            f"Invalid value for argument `model`. Expected a Keras model{hint}. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    own = _graph.own_steps(model)
    if own:
        raise ValueError(
            f"Invalid value for argument `model`. Model {model.name!r} (class "
            f"{type(model).__name__}) defines its own {', '.join(own)}. The parallel "
            "model is a functional model of its own, which would train, evaluate and "
            "predict with Keras's default steps instead, so DataParallel refuses it. "
            "Expected a model that uses Keras's own steps. To keep your steps, put the "
            "parallel model inside your class: `YourModel(keras_parallel.DataParallel"
            '(inner))`, whose `call` calls it (see "Models with their own train_step" '
            f"in the DataParallel docs). Received: model of type {type(model).__name__} "
            f"with its own {', '.join(own)}"
        )
    if not getattr(model, "inputs", None):
        raise ValueError(
            "Invalid value for argument `model`. Expected a model with known inputs (a "
            "functional or Sequential model built from `keras.Input`). Received: model "
            f"{model.name!r} has no inputs yet; build it with an Input layer first."
        )
    for layer in _graph.all_sublayers(model):
        if getattr(layer, "stateful", False) is True:
            raise ValueError(
                f"Invalid value for argument `model`. Layer {layer.name!r} is stateful: its "
                "state carries from one batch to the next row by row, which slicing every "
                "batch across devices would break. Use stateful=False, or train it on one "
                "device."
            )
    for tensor in model.inputs:
        batch = tuple(tensor.shape)[0] if len(tensor.shape) else None
        if batch is not None:
            raise ValueError(
                f"Invalid value for argument `model`. Input {_tensor_name(tensor)!r} has a "
                "fixed batch "
                f"size ({batch}); DataParallel cuts every batch into slices of other sizes, so "
                "the batch dimension must be None. Rebuild the model with "
                "`keras.Input(shape=...)` instead of `batch_shape`/`batch_size`."
            )


_MEASURED = ("memory", "speed")


def _resolve_split(split, devices: list[str], model, probe) -> tuple[list[float], dict | None]:
    """Ratios for `split`, and the measured figures behind them (None when given)."""
    n = len(devices)
    if split is None or (isinstance(split, str) and split.lower() == "even"):
        if n > 1:
            _warn_if_unequal(devices, probe)
        return [1.0] * n, None
    if isinstance(split, str):
        if split.lower() not in _MEASURED:
            raise ValueError(
                "Invalid value for argument `split`. Expected None, 'even', 'memory', "
                "'speed', or a sequence of positive ratios, one per device. "
                f"Received: split={split!r}"
            )
        ratios, figures = split_ratios(split.lower(), devices, model=model, probe=probe)
        if ratios is None:
            warn(
                f"split={split!r}: no usable figure for {[d for d, v in figures.items() if not v]}"
                f" (figures: {figures}); using an even split. On a CPU, give ratios "
                "(split=[2, 1]) instead.",
            )
            return [1.0] * n, figures
        if split.lower() == "speed":
            _warn_if_much_slower(figures)
        return ratios, figures
    ratios = validate_ratios(split, argument="split")
    if len(ratios) != n:
        raise ValueError(
            "Invalid value for argument `split`. Expected one ratio per device "
            f"({n} devices: {devices}). Received: split={list(split)!r}"
        )
    return ratios, None


#: split="speed": a device this many times slower than the fastest is named in a
#: warning (on an H100 with its host's CPU, 17x, the CPU's one row of 32 halved the
#: step rate of the GPU alone).
_MUCH_SLOWER = 8.0


def _warn_if_much_slower(figures: dict) -> None:
    fastest = max(figures, key=figures.get)
    slow = {d: v for d, v in figures.items() if figures[fastest] >= _MUCH_SLOWER * v}
    if slow:
        times = ", ".join(f"{d} {figures[fastest] / v:.0f}x" for d, v in slow.items())
        warn(
            f"split='speed': {times} slower than {fastest} (samples/s measured: "
            f"{ {d: round(v, 1) for d, v in figures.items()} }). Every step waits for the "
            "slowest slice and for the merge, so such a device can cost more than it adds: "
            f"compare with devices={[d for d in figures if d not in slow]}.",
        )


def _warn_if_unequal(devices: list[str], probe) -> None:
    limits = [probe.memory_limit(d) for d in devices]
    if any(v is None for v in limits) or min(limits) <= 0:
        return
    if max(limits) > 1.25 * min(limits):
        mib = {d: round(v / 2**20) for d, v in zip(devices, limits, strict=True)}
        warn(
            f"The devices differ in memory by more than 25% ({mib} MiB) and the split is "
            "even, so the larger ones sit partly idle. Use DataParallel(model, "
            "split='memory') (or split='speed', or explicit ratios).",
        )


def _unique_output_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    taken = set(names)
    for name in names:
        if name not in seen:
            seen[name] = 0
            result.append(name)
            continue
        count = seen[name]
        while True:
            count += 1
            candidate = f"{name}_{count}"
            if candidate not in taken:
                break
        seen[name] = count
        taken.add(candidate)
        result.append(candidate)
    return result


def DataParallel(
    model,
    devices: None | int | str | Sequence[str] = None,
    split: None | str | Sequence[float] = None,
    merge_device: str = "cpu",
    name: str | None = None,
    *,
    batch_norm: str = "global",
    probe: DeviceProbe | None = None,
):
    """Returns a model that computes `model` on several devices, a slice of the batch each.

    Every batch is cut along its first axis into one slice per device
    (`BatchSlice`), the template `model` runs on each slice with its ops placed
    on that device, and the outputs are concatenated back in order. All slices
    share the template's variables (no copies), so training the returned model
    trains `model`, and since the loss is computed on the concatenated outputs,
    loss and gradient are the single-device ones. BatchNormalization layers
    normalise every slice with the whole batch's moments by default, as on one
    device (`batch_norm`); dropout draws its masks per slice.

    The returned object is a plain functional `keras.Model`: compile, fit,
    evaluate, predict and save it as usual. Its inputs and outputs carry the
    template's names, so `compile(loss={name: ...})` and metrics written for the
    template work unchanged. When the template has the same output name twice
    (a Siamese model: one sub-model called twice), the repeats get the suffixes
    `_1`, `_2`, ... (`["encoder", "encoder"]` becomes `["encoder", "encoder_1"]`).

    Args:
        model: a built Keras model with known inputs (functional or Sequential)
            whose inputs have an unknown (None) batch size and no stateful layer.
        devices: None, int, str or list of str. None: every visible GPU
            (logical GPUs count); with none, the CPU. An int n: the first n
            GPUs. A list: those devices (`"/gpu:0"`, `"GPU:1"`, `"/cpu:0"`).
            Defaults to `None`.
        split: None, `"even"`, `"memory"`, `"speed"`, or a sequence of
            positive ratios, one per device (`[2, 1]` gives the first device
            two thirds of each batch). `"memory"` weighs devices by their usable
            memory (a configured logical-device limit, else the card's total);
            `"speed"` times a few forward/backward passes of `model` on each
            device and weighs by samples/s. Measured splits are resolved once,
            here, logged, stored in the model's config (a reloaded model reuses
            them) and readable as `keras_parallel.replicas(parallel).ratios`.
            A device without a memory figure (a CPU) falls back to even, with a
            warning. Defaults to `None` (even; with a warning when GPUs differ
            in memory by more than 25%).
        merge_device: str. Where outputs are concatenated: `"cpu"`, `"first"`
            (the first device) or a device name. Defaults to `"cpu"`.
        name: str or None. The returned model's name. Defaults to
            `"<template name>_data_parallel"`.
        batch_norm: str. `"global"`: in training, every BatchNormalization
            layer of the template (nested functional and Sequential models
            included) normalises every slice with the mean and variance of the
            whole batch, and moves its moving statistics once per step with
            them: the single-device computation, gradients included. The
            template's graph then runs layer by layer across the devices.
            `"per_slice"`: each slice is normalised with its own moments and the
            moving statistics move once per slice (Keras 2's `multi_gpu_model`).
            A BatchNormalization layer inside a subclassed layer's own `call`
            cannot be reached and stays per slice, with a warning. Saved with
            the model. Defaults to `"global"`.
        probe: `keras_parallel.probes.DeviceProbe` or None. What measures
            memory and speed for `split="memory"`/`"speed"`; inject one to use
            known figures. Defaults to `DeviceProbe()`.

    Returns:
        A functional `keras.Model`. `keras_parallel.unwrap(parallel)` gives the
        template back; `keras_parallel.replicas(parallel)` the layer that holds
        the devices, ratios and `slice_sizes(batch_size)`.

    Raises:
        ValueError: for a model that is not a built Keras model with known
            inputs, a fixed batch size or a stateful layer; an unknown device
            (the message lists the available ones); a `split` that does not give
            one positive ratio per device; a `batch_norm` other than `"global"`
            or `"per_slice"`.

    Example:

    ```python
    import keras
    import keras_parallel

    inputs = keras.Input((16, 64, 64, 3))
    x = keras.layers.Conv3D(8, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling3D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))

    parallel = keras_parallel.DataParallel(model, split=[2, 1])
    parallel.compile("adam", "sparse_categorical_crossentropy")
    # parallel.fit(clips, labels, batch_size=32)
    # model.save("template.keras")  # the template holds the trained weights
    ```
    """
    global _warned_single_device
    validate_batch_norm(batch_norm)
    _check_template(model)
    resolved = resolve_devices(devices)
    probe = probe or DeviceProbe()
    ratios, figures = _resolve_split(split, resolved, model, probe)
    if len(resolved) == 1 and not _warned_single_device:
        _warned_single_device = True
        warn(
            f"DataParallel found one device ({resolved[0]}): the model runs unsliced on it. "
            "The same script uses every GPU where there are several.",
        )
    split_value = None if split is None else (split if isinstance(split, str) else ratios)

    inputs = _ops.map_structure(
        lambda t: keras.Input(
            shape=tuple(t.shape)[1:], dtype=t.dtype, name=_tensor_name(t), sparse=_sparse(t)
        ),
        input_structure(model),
    )
    taken = {n for n in (_tensor_name(t) for t in model.inputs)}
    output_names = _unique_output_names(_output_names(model))
    taken |= set(output_names)
    core_name = "data_parallel"
    while core_name in taken:
        core_name += "_"
    core = ParallelReplicas(
        model,
        devices=resolved,
        ratios=ratios,
        merge_device=merge_device,
        split=split_value,
        split_figures=figures,
        batch_norm=batch_norm,
        name=core_name,
    )
    merged = core(inputs)
    flat = _ops.flatten(merged)
    renamed = [
        keras.layers.Identity(name=out_name)(tensor)
        for out_name, tensor in zip(output_names, flat, strict=True)
    ]
    outputs = _ops.pack_sequence_as(merged, renamed)
    parallel = ParallelModel(inputs, outputs, name=name or f"{model.name}_data_parallel")
    logger.info(
        "DataParallel(%s): devices %s, split %r, ratios %s%s",
        model.name,
        list(core.placement),
        split_value,
        list(core.ratios),
        f" (measured: {figures})" if figures else "",
    )
    return parallel


def _output_names(model) -> list[str]:
    names = getattr(model, "output_names", None)
    if names:
        return list(names)
    return [_tensor_name(t) for t in model.outputs]  # Keras 3 Sequential


def _tensor_name(tensor) -> str:
    history = getattr(tensor, "_keras_history", None)
    if history is not None:
        layer = history[0]
        return layer.name
    return tensor.name.split(":")[0]


def _sparse(tensor) -> bool:
    return bool(getattr(tensor, "sparse", False))


def replicas(model) -> ParallelReplicas:
    """Returns the `ParallelReplicas` layer of a `DataParallel` model.

    It holds `devices`, `ratios`, `placement` (the devices used on this
    machine), `num_replicas` and `slice_sizes(batch_size)`.

    Raises:
        ValueError: if `model` was not made by `DataParallel`.

    Example:

    ```python
    import keras_parallel

    parallel = keras_parallel.DataParallel(model)
    core = keras_parallel.replicas(parallel)
    core.placement, core.ratios  # (['/device:GPU:0', '/device:GPU:1'], [1.0, 1.0]) on two GPUs
    core.slice_sizes(32)  # [16, 16] on two GPUs
    ```
    """
    for layer in getattr(model, "layers", []):
        if isinstance(layer, ParallelReplicas):
            return layer
    raise ValueError(
        "Invalid value for argument `model`. Expected a model made by "
        f"`keras_parallel.DataParallel`. Received: {getattr(model, 'name', model)!r}"
    )


def unwrap(model):
    """Returns the template of a `DataParallel` model; any other model unchanged.

    The template holds the trained weights (they are the same variables), so
    `unwrap(parallel).save("model.keras")` saves a single-device model that
    loads anywhere without keras_parallel.

    Example:

    ```python
    import keras_parallel

    parallel = keras_parallel.DataParallel(model)
    keras_parallel.unwrap(parallel) is model  # True: the same layers and variables
    keras_parallel.unwrap(model) is model  # True: any other model comes back as it is
    keras_parallel.unwrap(parallel).save("model.keras")  # a single-device model
    ```
    """
    for layer in getattr(model, "layers", []):
        if isinstance(layer, ParallelReplicas):
            return layer.layer
    return model


def num_replicas(model) -> int:
    """The number of devices a model's batches are cut across (1 for a plain model)."""
    try:
        return replicas(model).num_replicas
    except ValueError:
        return 1


def custom_objects() -> dict:
    """The classes a saved keras_parallel model may need, for `custom_objects=`.

    They are also registered (package "keras_parallel"), so loading works
    without it; pass it where registration is not enough (an older file, a
    custom loader).

    Example:

    ```python
    import keras
    import keras_parallel

    parallel = keras_parallel.DataParallel(model)
    parallel.save("parallel.keras")
    restored = keras.models.load_model(
        "parallel.keras", custom_objects=keras_parallel.custom_objects()
    )
    ```
    """
    objects = {
        "BatchSlice": BatchSlice,
        "ParallelReplicas": ParallelReplicas,
        "ParallelModel": ParallelModel,
    }
    objects.update({f"keras_parallel>{k}": v for k, v in list(objects.items())})
    return objects
