"""Runs a template's layer graph over several parts of a batch, in lockstep.

Whole-batch BatchNormalization needs every part's rows at each
BatchNormalization layer before any part can go past it, so the template cannot
be called part after part. Instead its graph is run layer by layer: each layer
is called on every part before the next layer runs, and the caller decides
what a call is (a layer on one part, on its device; a BatchNormalization layer
over all parts at once).

Keras lists no functional model's nodes in order through a public API: this is
the one module that reads them, from the model's own `_nodes_by_depth` (Keras 3
and tf-keras both keep it; tf-keras's `node.map_arguments` pops one value per
use, so it is fed a dict that gives one per lookup), and the Keras mask a tensor
carries (`_keras_mask`). `tests/test_batch_norm.py::
test_the_graph_contracts_keras_keeps` fails by name when Keras changes them.
Sequential models are run from their public `layers`.
"""

from __future__ import annotations

from keras_parallel import _ops
from keras_parallel._compat import IS_KERAS_3, keras

__all__ = [
    "STEP_METHODS",
    "all_sublayers",
    "own_steps",
    "is_graph_model",
    "mask_of",
    "masked_input",
    "run_parts",
    "set_mask",
    "sublayers",
]


def _defines_call(model) -> str | None:
    """The name of the class in `model`'s MRO that defines `call`."""
    for cls in type(model).__mro__:
        if "call" in vars(cls):
            return cls.__name__
    return None


def is_graph_model(layer) -> bool:
    """True for a functional or Sequential model whose `call` is Keras's own graph run."""
    if not isinstance(layer, keras.Model):
        return False
    if isinstance(layer, keras.Sequential):
        return _defines_call(layer) == "Sequential"
    return getattr(layer, "_nodes_by_depth", None) is not None and _defines_call(layer) in (
        "Functional",
        "Model",  # tf-keras: a functional Model runs its graph from Model.call
    )


def sublayers(layer) -> list:
    """The layers a layer holds as attributes (public values only), one level down.

    Finds what a subclassed layer builds in `__init__` (`self.bn = ...`, lists of
    layers), which Keras keeps track of without listing it publicly.
    """
    found = []
    for value in vars(layer).values():
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if isinstance(item, keras.layers.Layer) and item is not layer:
                found.append(item)
    return found


def all_sublayers(layer) -> list:
    """Every layer below `layer`, once each: its `layers`, wrapped `layer`, recurrent
    cells and the layers it holds as attributes, recursively."""
    seen = {id(layer)}
    found = []
    stack = [layer]
    while stack:
        parent = stack.pop()
        children = list(getattr(parent, "layers", None) or [])
        for attr in ("layer", "forward_layer", "backward_layer", "cell"):
            child = getattr(parent, attr, None)
            if isinstance(child, keras.layers.Layer):
                children.append(child)
        children.extend(sublayers(parent))
        for child in children:
            if id(child) not in seen:
                seen.add(id(child))
                found.append(child)
                stack.append(child)
    return found


def mask_of(x):
    """The Keras mask a layer's output carries (Embedding(mask_zero=True), Masking), or None.

    Keras keeps it on the tensor itself (`_keras_mask`, both flavours).
    """
    return getattr(x, "_keras_mask", None)


def masked_input(layer) -> bool:
    """True when a Keras mask reaches `layer` in the graph it was built in."""
    try:
        inputs = layer.input
    except (AttributeError, ValueError, RuntimeError):  # shared, or never called
        return False
    return any(mask_of(x) is not None for x in _ops.flatten(inputs))


def set_mask(x, mask) -> None:
    """Carries `mask` on `x` as a Keras layer's output would (where the tensor type allows)."""
    try:
        x._keras_mask = mask
    except AttributeError:  # an array type without attributes (JAX)
        pass


class _OneEach(dict):
    """tf-keras's `node.map_arguments` pops one value per use: give one per lookup."""

    def __getitem__(self, key):
        return [dict.__getitem__(self, key)]


def _output_structure(model):
    if IS_KERAS_3:
        try:
            return model.output
        except (AttributeError, ValueError):
            return model.outputs[0] if len(model.outputs) == 1 else model.outputs
    return model._nested_outputs


def run_parts(model, parts_inputs: list, call):
    """Runs `model`'s graph on each part, one layer at a time across all parts.

    Args:
        model: a model for which `is_graph_model` is True.
        parts_inputs: one input structure per part (what `model(...)` takes).
        call: a function `(layer, [(args, kwargs) per part]) -> [outputs per part]`,
            called once per layer call of the graph, in graph order.

    Returns:
        One output structure per part.
    """
    if isinstance(model, keras.Sequential):
        values = list(parts_inputs)
        for layer in model.layers:
            values = call(layer, [((x,), {}) for x in values])
        return values
    parts = len(parts_inputs)
    known = [dict() if IS_KERAS_3 else _OneEach() for _ in range(parts)]
    for k, inputs in enumerate(parts_inputs):
        for ref, value in zip(model.inputs, _ops.flatten(inputs), strict=True):
            known[k][id(ref) if IS_KERAS_3 else str(id(ref))] = value
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if IS_KERAS_3:
                layer = node.operation
                if not layer or node.is_input:
                    continue
                if any(id(x) not in known[0] for x in node.input_tensors):
                    continue
                arguments = [node.arguments.fill_in(known[k]) for k in range(parts)]
                out_ids = [id(x) for x in node.outputs]
            else:
                layer = node.layer
                if node.is_input:
                    continue
                if any(i not in known[0] for i in node.flat_input_ids):
                    continue
                arguments = [node.map_arguments(known[k]) for k in range(parts)]
                out_ids = list(node.flat_output_ids)
            results = call(layer, arguments)
            for k, outputs in enumerate(results):
                flat = _ops.flatten(outputs)
                for key, value in zip(out_ids, flat, strict=False):
                    known[k][key] = value
    structure = _output_structure(model)
    results = []
    for k in range(parts):
        keys = [id(x) if IS_KERAS_3 else str(id(x)) for x in model.outputs]
        flat = [dict.__getitem__(known[k], key) for key in keys]
        results.append(_ops.pack_sequence_as(structure, flat))
    return results


#: The methods of `keras.Model` that `fit`, `evaluate` and `predict` call to make
#: a step: a model class that defines one of them trains, evaluates or predicts
#: in its own way.
STEP_METHODS = ("train_step", "test_step", "predict_step", "compute_loss", "compute_metrics")


def own_steps(model, names=STEP_METHODS) -> list[str]:
    """Which of `names` the class of `model` defines itself (not Keras's own)."""
    return [
        name
        for name in names
        if getattr(type(model), name, None) is not getattr(keras.Model, name, None)
    ]
