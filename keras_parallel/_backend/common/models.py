"""Facts about a Keras model that every backend reads the same way."""

from __future__ import annotations

__all__ = ["input_structure"]


def input_structure(model):
    """The model's symbolic inputs with their structure (tensor, list or dict).

    Keras 3 Sequential models built from `keras.Input` have `inputs` but no
    `input` until they are called; their single input is used then.
    """
    try:
        return model.input
    except (AttributeError, ValueError):
        inputs = list(model.inputs)
        return inputs[0] if len(inputs) == 1 else inputs
