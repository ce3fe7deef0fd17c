"""`TemplateCheckpoint`: a ModelCheckpoint that writes the template of a DataParallel model."""

from __future__ import annotations

from keras_parallel._compat import keras
from keras_parallel.parallel import unwrap

__all__ = ["TemplateCheckpoint"]


class TemplateCheckpoint(keras.callbacks.ModelCheckpoint):
    """Saves the *template* of a `DataParallel` model while the parallel model trains.

    Keras 2's `multi_gpu_model` users' first complaint was that `ModelCheckpoint`
    saved the multi-GPU model instead of the one they built. This callback
    takes every argument of `keras.callbacks.ModelCheckpoint` and behaves the
    same (monitor, `save_best_only`, `save_weights_only`, `save_freq`, the
    filepath format), but what it writes is `keras_parallel.unwrap(model)`: the
    single-device template, which loads anywhere without keras_parallel and
    holds the trained weights. On a plain model it is `ModelCheckpoint`.

    Args:
        filepath: str or path. Where to save; see `keras.callbacks.ModelCheckpoint`.
        **kwargs: every other argument of `keras.callbacks.ModelCheckpoint`.

    Example:

    ```python
    parallel = keras_parallel.DataParallel(model)
    parallel.compile("adam", "mse")
    parallel.fit(x, y, callbacks=[
        keras_parallel.callbacks.TemplateCheckpoint("best.keras", save_best_only=True,
                                                    monitor="loss"),
    ])
    template = keras.models.load_model("best.keras")  # the single-device model
    ```
    """

    def set_model(self, model):
        super().set_model(unwrap(model))
