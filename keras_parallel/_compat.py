"""The one place that picks the Keras flavour.

keras_parallel runs on Keras 3 (``keras``) and on tf-keras (``tf_keras``, Keras 2).
The flavour follows TensorFlow's own switch, ``TF_USE_LEGACY_KERAS``: when it is
``1`` or ``true`` (any case) before keras_parallel is imported, tf-keras is used,
else Keras 3. This module only *reads* that variable; it never writes it.

Every other module imports ``keras`` from here.
"""

from __future__ import annotations

import os

__all__ = ["keras", "IS_KERAS_3", "FLAVOUR", "backend_name", "register"]


def _wants_legacy_keras() -> bool:
    return os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true")


if _wants_legacy_keras():
    try:
        import tf_keras as keras
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "TF_USE_LEGACY_KERAS is set, so keras_parallel uses tf-keras, but the "
            "`tf_keras` package is not installed. Install it with "
            "`pip install 'keras-parallel[tf-keras]'` or unset TF_USE_LEGACY_KERAS."
        ) from error
    IS_KERAS_3 = False
else:
    import keras

    IS_KERAS_3 = hasattr(keras, "ops")

FLAVOUR = "keras3" if IS_KERAS_3 else "tf_keras"


def backend_name() -> str:
    """Returns the Keras backend in use: "tensorflow", "jax" or "torch"."""
    if IS_KERAS_3:
        return keras.backend.backend()
    return "tensorflow"


def register(cls):
    """Registers a class for deserialization under the `keras_parallel` package."""
    return keras.saving.register_keras_serializable(package="keras_parallel")(cls)
