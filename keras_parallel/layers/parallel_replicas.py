"""The `ParallelReplicas` layer: one model, run on a slice of the batch per device."""

from __future__ import annotations

import copy
import types

from keras_parallel import _backend, _batch_norm, _graph, _ops
from keras_parallel._compat import keras, register
from keras_parallel._validation import validate_batch_norm, validate_ratios
from keras_parallel._warnings import warn
from keras_parallel.devices import canonical_device_name, device_scope, remap_missing_devices
from keras_parallel.layers.batch_slice import BatchSlice, slice_sizes

__all__ = ["ParallelReplicas"]


def _output_specs(model):
    """(output structure, [(shape without batch, dtype)]) of `model`'s symbolic outputs.

    A shape may hold None for a dimension only known at run time. None when the
    model has no symbolic outputs.
    """
    outputs = list(getattr(model, "outputs", None) or [])
    if not outputs:
        return None
    try:
        structure = model.output
    except (AttributeError, ValueError):  # Keras 3 Sequential: `outputs` only
        structure = outputs[0] if len(outputs) == 1 else outputs
    specs = [(tuple(t.shape)[1:], _dtype_name(t.dtype)) for t in outputs]
    return structure, specs


def _plain(value):
    """`value` with every list, tuple or mapping made a plain list or dict."""
    if isinstance(value, str | bytes) or value is None:
        return value
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ListWrapper":
        return [_plain(v) for v in value]
    return value


def _dtype_name(dtype) -> str:
    return getattr(dtype, "name", None) or str(dtype)


def _batch_norm_reach(model):
    """What the graph walk reaches: (BatchNormalization layers, graph models holding them,
    [(layer, why not)] for the BatchNormalization layers it cannot reach).

    The walk reaches a BatchNormalization layer that is a node of the template's
    graph, or of a functional or Sequential model nested in it (recursively).
    One inside any other layer's own `call` (a subclassed layer, a wrapper such
    as `TimeDistributed`) computes its moments where keras_parallel cannot see.
    """
    reached, holders, missed = [], [], []

    def visit(layer) -> bool:
        if _batch_norm.is_batch_norm(layer):
            reason = _batch_norm.unsupported_reason(layer)
            masks_unreadable = not _backend.replicas.MASKS_READABLE
            if reason is None and masks_unreadable and _graph.masked_input(layer):
                # JAX arrays carry no Keras mask where keras_parallel could read it.
                reason = "a Keras mask reaches it, which keras_parallel cannot read on JAX"
            if reason is None:
                reached.append(layer)
                return True
            missed.append((layer, reason))
            return False
        if _graph.is_graph_model(layer):
            found = [visit(child) for child in layer.layers]
            if any(found):
                holders.append(layer)
            return any(found)
        for inner in _graph.all_sublayers(layer):
            if _batch_norm.is_batch_norm(inner):
                missed.append((inner, f"it runs inside {layer.name!r}'s own call()"))
        return False

    visit(model)
    return reached, holders, missed


@register
class ParallelReplicas(keras.layers.Wrapper):
    """Runs a model on one slice of the batch per device and concatenates the outputs.

    The core of `keras_parallel.DataParallel`: every call cuts each input
    along the batch axis with `BatchSlice` (one slice per device, sizes
    proportional to `ratios`), calls the *same* wrapped model on each slice
    with its ops placed on that slice's device, and concatenates the outputs
    back, in order, on `merge_device`. The wrapped model's own variables are
    used (one set: on Keras 3 each replica reads them once per call as values
    on its own device, and the gradient flows back to them), so training this
    layer trains the wrapped model, and the loss on the concatenated outputs
    has the single-device gradient.

    Placement happens inside `call()`, so it holds every time Keras re-runs
    the layer (predict, a traced `fit` step, a reloaded model). On the
    TensorFlow backend the layer does not support XLA (`supports_jit` is
    False): XLA would put every slice on one device. On JAX an unequal split
    runs each slice as programs on its device, outside a jitted step (a
    `DataParallel` model compiles it so); inside a jitted step the slices are
    padded to one shape and sharded over a mesh of the devices (the
    documentation's "Backends" page).

    Empty slices (a batch with fewer rows than devices) are fine: the wrapped
    model is never called on one; its place in the output is a 0-row tensor
    of the model's output shape and dtype. With one device the model is called
    on the whole batch and its outputs are returned as they are.

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
        batch_norm: str. `"global"`: in training, every BatchNormalization
            layer of the template normalises every slice with the moments of
            the whole batch and moves its moving statistics once per step, as
            the template on one device does. `"per_slice"`: each slice is
            normalised with its own moments and moves the moving statistics
            once per slice (the template called on each slice, as Keras 2's
            `multi_gpu_model` did). Defaults to `"global"`.
        **kwargs: base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: the wrapped model's inputs (tensor, list or dict).
        training: bool or None, passed on to the wrapped model.

    Example:

    ```python
    import keras
    import keras_parallel

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    core = keras_parallel.ParallelReplicas(model, devices=["/gpu:0", "/gpu:1"], ratios=[3, 1])
    core.slice_sizes(8)  # [6, 2]
    core(keras.ops.ones((8, 8))).shape  # (8, 2): rows 0-5 computed on /gpu:0, 6-7 on /gpu:1
    ```
    """

    def __init__(
        self,
        layer,
        devices,
        ratios=None,
        merge_device="cpu",
        split=None,
        split_figures=None,
        batch_norm="global",
        **kwargs,
    ):
        super().__init__(layer, **kwargs)
        self.batch_norm = validate_batch_norm(batch_norm)
        if isinstance(devices, str) or not devices:
            raise ValueError(
                "Invalid value for argument `devices`. Expected a non-empty list of device "
                f"names. Received: devices={devices!r}"
            )
        saved = [canonical_device_name(d) for d in devices]
        resolved, missing = remap_missing_devices(saved)
        if missing:
            warn(
                f"This model was built for devices {saved}, but {missing} "
                f"{'is' if len(missing) == 1 else 'are'} not available here: running "
                f"those slices on {resolved} instead. Results are unchanged.",
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
        # Kept in a plain namespace: tf-keras would wrap lists and dicts assigned to
        # a layer in its tracking types (`ListWrapper`); the properties below
        # return plain Python values.
        self._settings = types.SimpleNamespace(
            devices=tuple(saved),
            ratios=tuple(ratios),
            split=_plain(split),
            split_figures=None if split_figures is None else _plain(dict(split_figures)),
            placement=tuple(resolved),
        )
        self.merge_device = merge_device
        if merge_device.lower() == "cpu":
            self._merge_on = "/device:CPU:0"
        elif merge_device.lower() == "first":
            self._merge_on = resolved[0]
        else:
            self._merge_on = remap_missing_devices([canonical_device_name(merge_device)])[0][0]
        self._slicers = [
            BatchSlice(index=i, ratios=ratios, name=f"slice_{i}") for i in range(len(ratios))
        ]
        # JAX's per-device path: the jitted programs of each layer it calls, by layer.
        self._device_programs = types.SimpleNamespace(by_layer={})
        # A replica whose slice is empty is not called: its place in the output is
        # a 0-row stand-in (see `_replica_output`).
        self._output_specs = _output_specs(layer)
        # Keras 3 on TensorFlow compiles the whole step with XLA by default where a
        # GPU exists (`jit_compile="auto"`), and XLA drops the placement of the
        # slices: this layer does not support it, so "auto" resolves to no XLA.
        if not _backend.replicas.SUPPORTS_JIT:
            self.supports_jit = False
        self._global_batch_norms, self._walked_models, missed = _batch_norm_reach(layer)
        if batch_norm == "global" and missed and len(resolved) > 1:
            names = ", ".join(f"{bn.name!r} ({why})" for bn, why in missed)
            warn(
                "DataParallel(batch_norm='global') cannot give these BatchNormalization "
                f"layers the whole batch's moments: {names}. They normalise each slice "
                "with the slice's own moments. Build them as layers of a functional or "
                "Sequential model (nested models are fine), or pass "
                "batch_norm='per_slice' to accept per-slice statistics everywhere "
                "(see the troubleshooting page, 'BatchNormalization layers keep "
                "per-slice statistics').",
            )

    @property
    def devices(self) -> list[str]:
        """The devices the model was built for, one per slice (canonical names)."""
        return list(self._settings.devices)

    @property
    def placement(self) -> list[str]:
        """The devices the slices run on here (`devices`, with missing ones remapped)."""
        return list(self._settings.placement)

    @property
    def ratios(self) -> list[float]:
        """The ratios the batch is cut by, one per device."""
        return list(self._settings.ratios)

    @property
    def split(self):
        """The `split` given to `DataParallel` (`"memory"`, ratios, ...), or None."""
        return copy.deepcopy(self._settings.split)

    @property
    def split_figures(self) -> dict | None:
        """The figures a measured split was computed from, per device, or None."""
        return copy.deepcopy(self._settings.split_figures)

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
    def global_batch_norms(self) -> list:
        """The template's BatchNormalization layers that `"global"` gives whole-batch moments."""
        return list(self._global_batch_norms)

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

    @property
    def _collects_losses(self) -> bool:
        # On Keras 3, replicas read the variables as values on their own device
        # (`_ops.call_on_local_values`); losses the template adds in `call` are
        # then collected and returned with the outputs.
        return self.num_replicas > 1 and _ops.HAS_STATELESS_SCOPE

    def _call_replica(self, piece, training, batch):
        """The template on one slice: (outputs, its share of the losses or None).

        Losses added in the template's `call` (activity regularizers) are means
        over the rows of the call in Keras, or constants: weighing the slice's
        losses by its share of the batch (rows / batch) gives what one call on
        the whole batch adds.
        """
        kwargs = {} if training is None else {"training": training}
        if not self._collects_losses:
            return self.layer(piece, **kwargs), None
        outputs, loss = _ops.call_on_local_values(self.layer, (piece,), kwargs)
        rows = _ops.batch_size(_ops.flatten(piece)[0])
        return outputs, _ops.scale_by_ratio(loss, rows, batch)

    def _replica_output(self, index, piece, training, batch, first_output):
        """The template's output for replica `index`, or a 0-row stand-in.

        Returns (outputs, summed losses or None). The template is never called
        on an empty slice: some kernels (oneDNN's convolutions) return wrong
        shapes for 0 rows, and statistics such as BatchNormalization's must not
        see an empty batch. The stand-in has the template's output shapes and
        dtypes; a non-batch dimension known only at run time is read from the
        first replica's output (the first slice is empty only for an empty batch).
        """
        structure, specs = self._output_specs
        dynamic = any(d is None for shape, _ in specs for d in shape)
        if index == 0 and dynamic:
            return self._call_replica(piece, training, batch)  # nothing to read shapes from

        def empty():
            parts = []
            flat_first = _ops.flatten(first_output[0]) if dynamic else None
            for i, (shape, dtype) in enumerate(specs):
                if any(d is None for d in shape):
                    parts.append(_ops.slice_rows(flat_first[i], 0, 0))
                else:
                    parts.append(_ops.empty_rows(shape, dtype))
            outputs = _ops.pack_sequence_as(structure, parts)
            return outputs, (_ops.zero_loss() if self._collects_losses else None)

        rows = _ops.batch_size(_ops.flatten(piece)[0])
        if isinstance(rows, int):
            return self._call_replica(piece, training, batch) if rows > 0 else empty()
        if self._collects_losses:
            return _ops.cond(
                _ops.greater(rows, 0), lambda: self._call_replica(piece, training, batch), empty
            )
        outputs = _ops.cond(
            _ops.greater(rows, 0),
            lambda: self._call_replica(piece, training, batch)[0],
            lambda: empty()[0],
        )
        return outputs, None

    def _trains_batch_norm(self, training) -> bool:
        """True when this call computes batch moments in a layer keras_parallel reaches."""
        return training is True and any(bn.trainable for bn in self._global_batch_norms)

    def _walks(self, training) -> bool:
        """True when this call must run the template layer by layer (global moments)."""
        return self.batch_norm == "global" and self._trains_batch_norm(training)

    def _call_layer(self, layer, args, kwargs, rows, batch, collect=True):
        """One layer of the walk on one slice: (outputs, its share of the losses or None)."""
        if not (collect and self._collects_losses):
            return layer(*args, **kwargs), None
        outputs, loss = _ops.call_on_local_values(layer, args, kwargs)
        return outputs, _ops.scale_by_ratio(loss, rows, batch)

    def _walk(self, pieces, devices, training, batch, normalize=None, calls=None):
        """The template on `pieces` (one per device), layer by layer: [(outputs, loss)].

        Every layer runs on every piece, each on its device, before the next
        layer; a reachable BatchNormalization layer in training normalises all
        pieces with the whole batch's moments (`normalize(layer, inputs,
        devices)`, by default `_normalize`). A device of None places nothing
        (JAX's one sharded piece, whose layers add their losses themselves).
        `calls`: JAX's per-device path (`SliceCalls`): each other layer's call on a
        piece runs as a program on the piece's device.
        """
        normalize = normalize or _normalize
        collect = devices[0] is not None
        rows = [_ops.batch_size(_ops.flatten(p)[0]) for p in pieces]
        losses = [[] for _ in pieces]
        global_ids = {id(bn) for bn in self._global_batch_norms}
        walked_ids = {id(model) for model in self._walked_models}

        def call(layer, arguments):
            explicit = arguments[0][1].get("training", None)
            if (
                id(layer) in global_ids
                and layer.trainable
                and explicit is not False
                and all(len(args) == 1 for args, _ in arguments)
            ):
                return normalize(layer, [args[0] for args, _ in arguments], devices)
            if id(layer) in walked_ids and all(
                len(args) == 1
                and kwargs.get("training") is not False
                and all(v is None for k, v in kwargs.items() if k != "training")
                for args, kwargs in arguments
            ):
                return _graph.run_parts(layer, [args[0] for args, _ in arguments], call)
            results = []
            for k, (args, kwargs) in enumerate(arguments):
                if calls is not None:
                    outputs, loss = calls.call(layer, args, kwargs, devices[k], k)
                    loss = _ops.scale_by_ratio(loss, rows[k], batch)
                    losses[k].append(loss)
                    results.append(outputs)
                    continue
                with _batch_norm.device_scope(devices[k]):
                    outputs, loss = self._call_layer(
                        layer, args, kwargs, rows[k], batch, collect=collect
                    )
                if loss is not None:
                    losses[k].append(loss)
                results.append(outputs)
            return results

        outputs = _graph.run_parts(self.layer, pieces, call)
        if calls is None and not (collect and self._collects_losses):
            return [(out, None) for out in outputs]
        return [
            (out, _ops.add_n(loss) if loss else _ops.zero_loss())
            for out, loss in zip(outputs, losses, strict=True)
        ]

    def _merge(self, results):
        """(outputs concatenated on the merge device, summed losses or None)."""
        move = _backend.devices.move_to  # explicit only where a backend needs it (JAX)
        losses = [move(loss, self._merge_on) for _, loss in results if loss is not None]
        with device_scope(self._merge_on):
            outputs = _ops.map_structure(
                lambda *parts: _ops.concatenate([move(p, self._merge_on) for p in parts]),
                *[outputs for outputs, _ in results],
            )
        return outputs, (_ops.add_n(losses) if losses else None)

    def _walked_call(self, inputs, training):
        """Training with whole-batch BatchNormalization moments: (outputs, loss or None).

        Empty slices are left out of the walk. Where the rows are only known at
        run time (a traced TensorFlow step), a batch that leaves a slice empty is
        a batch of fewer rows than devices (or than the smallest share needs):
        it runs unsliced on the first device, which gives the same moments
        (under a tf.distribute strategy of several replicas, whose moments are
        all-reduced, every slice runs, an empty one included).
        """
        self._refuse_xla()
        batch = _ops.batch_size(_ops.flatten(inputs)[0])
        pieces = []
        for slicer, device in zip(self._slicers, self.placement, strict=True):
            with device_scope(device):
                pieces.append(slicer(inputs))
        rows = [_ops.batch_size(_ops.flatten(p)[0]) for p in pieces]
        if all(isinstance(r, int) for r in rows):
            live = [k for k, r in enumerate(rows) if r > 0] or [0]
            walked = self._walk(
                [pieces[k] for k in live], [self.placement[k] for k in live], training, batch
            )
            return self._merge(walked)

        def whole():
            with device_scope(self.placement[0]):
                outputs, loss = self._call_replica(inputs, training, batch)
            return self._merge([(outputs, loss)])

        def walked():
            return self._merge(self._walk(pieces, self.placement, training, batch))

        if _backend.in_replicas_that_sync():
            # Several replicas of a tf.distribute strategy all-reduce the moments; a
            # collective cannot sit in a branch (every replica must reach it): the
            # layers run on every slice, an empty one included.
            return walked()
        every = _ops.greater(_ops.min_of(rows), 0)
        if self._collects_losses:
            return _ops.cond(every, walked, whole)
        return _ops.cond(every, lambda: walked()[0], lambda: whole()[0]), None

    def replica_outputs(self, inputs, training=None):
        """Per-device outputs, before concatenation (one structure per device)."""
        return [outputs for outputs, _ in self._replicas(inputs, training)]

    def _refuse_xla(self):
        if _ops.inside_xla_compilation():
            raise RuntimeError(
                "DataParallel cannot run inside an XLA-compiled function "
                "(`jit_compile=True`): XLA compiles the whole step for one device and "
                "ignores the placement of the slices, so every slice would run on one "
                "device. Compile the model with `jit_compile=False` (DataParallel "
                "models turn `jit_compile=True` off at `compile()`, with a warning), "
                "and do not call it inside your own `tf.function(jit_compile=True)`."
            )

    def _replicas(self, inputs, training):
        self._refuse_xla()
        results = []
        first = None
        batch = _ops.batch_size(_ops.flatten(inputs)[0])
        for index, (slicer, device) in enumerate(zip(self._slicers, self.placement, strict=True)):
            with device_scope(device):
                piece = slicer(inputs)
                result = self._replica_output(index, piece, training, batch, first)
            if first is None:
                first = result
            results.append(result)
        return results

    def call(self, inputs, training=None):
        own = _backend.replicas.call(self, inputs, training)  # the backend's own way
        if own is not None:
            outputs, loss = own
            if loss is not None:
                self.add_loss(loss)
            return outputs
        if self.num_replicas == 1:
            # One device: nothing to cut or merge. The outputs stay where they are
            # made (moving them to the merge device would cost a copy every step,
            # and on torch a wait for the GPU).
            self._refuse_xla()
            kwargs = {} if training is None else {"training": training}
            with device_scope(self.placement[0]):
                return self.layer(inputs, **kwargs)
        if self._walks(training):
            outputs, loss = self._walked_call(inputs, training)
        else:
            outputs, loss = self._merge(self._replicas(inputs, training))
        if loss is not None:
            self.add_loss(loss)
        return outputs

    def _per_device_call(self, inputs, training, slice_calls):
        """JAX, outside a jitted step: each device's slice as programs on that device.

        Each device computes and holds only its own rows (no padding); empty
        slices are left out. With reachable BatchNormalization layers in
        training the template runs layer by layer (one program per layer and
        device), the moments summed across the devices; else the template is
        one program per device. `slice_calls` is the backend's `SliceCalls`.
        Returns (outputs on the merge device, summed losses).
        """
        batch = _ops.batch_size(_ops.flatten(inputs)[0])
        sizes = self.slice_sizes(batch)
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        live = [k for k, size in enumerate(sizes) if size > 0] or [0]
        pieces = [
            _ops.map_structure(lambda x, k=k: x[starts[k] : starts[k] + sizes[k]], inputs)
            for k in live
        ]
        devices = [self.placement[k] for k in live]
        calls = slice_calls(self._device_programs.by_layer)
        if self._walks(training):
            results = self._walk(pieces, devices, training, batch, calls=calls)
        else:
            kwargs = {} if training is None else {"training": training}
            results = []
            for index, (piece, device) in enumerate(zip(pieces, devices, strict=True)):
                outputs, loss = calls.call(self.layer, (piece,), kwargs, device, index)
                rows = _ops.batch_size(_ops.flatten(piece)[0])
                results.append((outputs, _ops.scale_by_ratio(loss, rows, batch)))
        calls.finish()
        return self._merge(results)

    def _sharded_call(self, inputs, training, sharded_call, batch_layout):
        """JAX: one call of the template, each device's slice sharded onto it.

        Each device's slice is a block of the largest slice's rows (padded). With
        BatchNormalization in training, where padding rows would enter the
        moments (an unequal split) or where each slice must keep its own
        (`batch_norm="per_slice"`), the template runs layer by layer and its
        BatchNormalization layers weigh the padding rows 0. `sharded_call` and
        `batch_layout` are the backend's.
        """
        kwargs = {} if training is None else {"training": training}
        batch = _ops.batch_size(_ops.flatten(inputs)[0])
        if not isinstance(batch, int) or batch == 0:
            return self.layer(inputs, **kwargs)  # symbolic, or nothing to cut
        sizes = self.slice_sizes(batch)
        in_training = self._trains_batch_norm(training)
        per_slice = self.batch_norm == "per_slice"
        if in_training and (per_slice or len(set(sizes)) > 1) and batch_layout() is None:

            def call(blocks):
                normalize = _block_normalizer(sizes, per_slice)
                ((outputs, _),) = self._walk([blocks], [None], training, batch, normalize)
                return outputs

        else:

            def call(blocks):
                return self.layer(blocks, **kwargs)

        return sharded_call(call, inputs, self.slice_sizes, self.placement, _ops.map_structure)

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
            "batch_norm": self.batch_norm,
        }


def _normalize(layer, xs, devices):
    """A BatchNormalization layer on every piece with the whole batch's moments."""
    masks = [_graph.mask_of(x) for x in xs]
    weights = None
    if any(m is not None for m in masks):
        weights = [None if m is None else _ops.expand_last(m) for m in masks]
    outputs = _batch_norm.normalize_parts(layer, xs, devices, weights=weights)
    for out, mask in zip(outputs, masks, strict=True):
        if mask is not None:
            _graph.set_mask(out, mask)
    return outputs


def _block_normalizer(sizes, per_slice):
    """JAX: BatchNormalization over the blocks of `sizes` rows, each padded to the largest.

    The padding rows weigh 0. `per_slice`: each block with its own moments
    (moving statistics moved once per block, in order); else one set of moments
    for the whole batch.
    """
    rows = max(sizes)
    valid = [[1.0] * size + [0.0] * (rows - size) for size in sizes]
    padded = any(size < rows for size in sizes)

    def weight(flags, rank):
        return _ops.reshape(_ops.constant(flags), (len(flags),) + (1,) * (rank - 1))

    def normalize(layer, xs, devices):
        (x,) = xs
        rank = len(_ops.static_shape(x))
        if not per_slice:
            weights = [weight(sum(valid, []), rank)] if padded else None
            return _batch_norm.normalize_parts(layer, [x], [None], weights=weights)
        blocks = [_ops.slice_rows(x, k * rows, (k + 1) * rows) for k in range(len(sizes))]
        weights = [weight(flags, rank) if padded else None for flags in valid]
        outputs = _batch_norm.normalize_parts(
            layer,
            blocks,
            [None] * len(blocks),
            weights=weights if padded else None,
            groups=[[k] for k in range(len(blocks))],
        )
        return [_ops.concatenate(outputs)]

    return normalize
