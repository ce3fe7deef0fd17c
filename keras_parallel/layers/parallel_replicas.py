"""The `ParallelReplicas` layer: one model, run on a slice of the batch per device."""

from __future__ import annotations

import warnings

from keras_parallel import _ops
from keras_parallel._compat import keras, register
from keras_parallel.devices import canonical_device_name, device_scope, remap_missing_devices
from keras_parallel.layers.batch_slice import BatchSlice, slice_sizes, validate_ratios

__all__ = ["ParallelReplicas"]


def _has_non_trainable_state(model) -> bool:
    return bool(model.non_trainable_weights)


def _empty_output_specs(model):
    """(output structure, [(shape without batch, dtype)]) of `model`, or None.

    None when the model has no symbolic outputs or a non-batch dimension is unknown.
    """
    outputs = list(getattr(model, "outputs", None) or [])
    if not outputs:
        return None
    try:
        structure = model.output
    except (AttributeError, ValueError):  # Keras 3 Sequential: `outputs` only
        structure = outputs[0] if len(outputs) == 1 else outputs
    specs = [(tuple(t.shape)[1:], t.dtype) for t in outputs]
    if any(d is None for shape, _ in specs for d in shape):
        return None
    return structure, specs


@register
class ParallelReplicas(keras.layers.Wrapper):
    """Runs a model on one slice of the batch per device and concatenates the outputs.

    The core of `keras_parallel.DataParallel`: every call cuts each input
    along the batch axis with `BatchSlice` (one slice per device, sizes
    proportional to `ratios`), calls the *same* wrapped model on each slice
    with its ops placed on that slice's device, and concatenates the outputs
    back, in order, on `merge_device`. The wrapped model's own variables are
    used (no copies), so training this layer trains the wrapped model, and the
    loss on the concatenated outputs has the single-device gradient.

    Placement happens inside `call()`, so it holds every time Keras re-runs
    the layer (predict, a traced `fit` step, a reloaded model).

    Empty slices (a batch with fewer rows than devices) are fine. In training
    mode, a model with non-trainable state (BatchNormalization's moving
    statistics) skips the call on an empty slice, so the statistics never see
    an empty batch.

    Args:
        layer: a built Keras model (or layer) to replicate.
        devices: list of device names, one per slice (`"/gpu:0"`, `"/cpu:1"`).
            A device this machine lacks (a model saved on a bigger machine) is
            replaced by one of the same type, round-robin, or by the CPU, with
            a warning; the slices stay the same.
        ratios: list of positive numbers, one per device, or None for equal
            slices. Defaults to `None`.
        merge_device: str. Where outputs are concatenated: `"cpu"` (the host
            CPU), `"first"` (the first device), or a device name.
            Defaults to `"cpu"`.
        split: str, list or None. The `split` the user asked `DataParallel`
            for (`"even"`, `"memory"`, `"speed"` or ratios), kept for
            reference; `ratios` is what is applied. Defaults to `None`.
        split_figures: dict or None. The figures a measured split was
            computed from (bytes or samples/s per device), kept for reference.
            Defaults to `None`.
        **kwargs: base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: the wrapped model's inputs (tensor, list or dict).
        training: bool or None, passed on to the wrapped model.
    """

    def __init__(
        self,
        layer,
        devices,
        ratios=None,
        merge_device="cpu",
        split=None,
        split_figures=None,
        **kwargs,
    ):
        super().__init__(layer, **kwargs)
        if isinstance(devices, str) or not devices:
            raise ValueError(
                "Invalid value for argument `devices`. Expected a non-empty list of device "
                f"names. Received: devices={devices!r}"
            )
        saved = [canonical_device_name(d) for d in devices]
        resolved, missing = remap_missing_devices(saved)
        if missing:
            warnings.warn(
                f"This model was built for devices {saved}, but {missing} "
                f"{'is' if len(missing) == 1 else 'are'} not available here: running "
                f"those slices on {resolved} instead. Results are unchanged.",
                stacklevel=2,
            )
        if ratios is None:
            ratios = [1.0] * len(resolved)
        ratios = validate_ratios(ratios)
        if len(ratios) != len(resolved):
            raise ValueError(
                "Invalid value for argument `ratios`. Expected one ratio per device "
                f"({len(resolved)}). Received: ratios={ratios!r}"
            )
        if not isinstance(merge_device, str):
            raise ValueError(
                "Invalid value for argument `merge_device`. Expected 'cpu', 'first' or a "
                f"device name. Received: merge_device={merge_device!r}"
            )
        self.devices = saved
        self.ratios = ratios
        self.merge_device = merge_device
        self.split = split
        self.split_figures = None if split_figures is None else dict(split_figures)
        self.placement = resolved
        if merge_device.lower() == "cpu":
            self._merge_on = "/device:CPU:0"
        elif merge_device.lower() == "first":
            self._merge_on = resolved[0]
        else:
            self._merge_on = remap_missing_devices([canonical_device_name(merge_device)])[0][0]
        self._slicers = [
            BatchSlice(index=i, ratios=ratios, name=f"slice_{i}") for i in range(len(ratios))
        ]
        # In training, a replica whose slice is empty is skipped (so BN statistics
        # never see an empty batch) when the model has such state and a 0-row
        # stand-in for its outputs can be built (non-batch output dims known).
        self._empty_specs = _empty_output_specs(layer) if _has_non_trainable_state(layer) else None

    @property
    def metrics(self):
        # A compiled template's loss tracker and metrics belong to the template's own
        # `fit`; listing them here would shadow the parallel model's keys in the logs.
        found = []
        for layer in getattr(self.layer, "layers", []):
            if not isinstance(layer, keras.Model):
                found.extend(layer.metrics)
        return found

    @property
    def num_replicas(self) -> int:
        """The number of slices (devices)."""
        return len(self.ratios)

    def slice_sizes(self, batch_size: int) -> list[int]:
        """The rows each device gets from a batch of `batch_size` rows."""
        return slice_sizes(batch_size, self.ratios)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.built = True

    def _call_replica(self, piece, training):
        if training is None:
            return self.layer(piece)
        return self.layer(piece, training=training)

    def replica_outputs(self, inputs, training=None):
        """Per-device outputs, before concatenation (one structure per device)."""
        outputs = []
        for slicer, device in zip(self._slicers, self.placement, strict=True):
            with device_scope(device):
                piece = slicer(inputs)
                outputs.append(self._guarded_call(piece, training))
        return outputs

    def _guarded_call(self, piece, training):
        if not (training and self._empty_specs is not None):
            return self._call_replica(piece, training)
        rows = _ops.batch_size(_ops.flatten(piece)[0])
        if isinstance(rows, int):
            return self._call_replica(piece, training) if rows > 0 else self._empty_outputs()
        return _ops.cond(
            _ops.greater(rows, 0),
            lambda: self._call_replica(piece, training),
            self._empty_outputs,
        )

    def _empty_outputs(self):
        structure, specs = self._empty_specs
        return _ops.pack_sequence_as(
            structure, [_ops.empty_rows(shape, dtype) for shape, dtype in specs]
        )

    def call(self, inputs, training=None):
        outputs = self.replica_outputs(inputs, training=training)
        with device_scope(self._merge_on):
            return _ops.map_structure(lambda *parts: _ops.concatenate(parts), *outputs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "devices": list(self.devices),
            "ratios": list(self.ratios),
            "merge_device": self.merge_device,
            "split": self.split,
            "split_figures": self.split_figures,
        }
