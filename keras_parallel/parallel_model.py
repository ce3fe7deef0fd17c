"""`ParallelModel`: the functional model that `DataParallel` returns."""

from __future__ import annotations

import contextlib
import inspect
import warnings

from keras_parallel import _backend
from keras_parallel._compat import IS_KERAS_3, keras, register
from keras_parallel._warnings import warn
from keras_parallel.layers.parallel_replicas import ParallelReplicas
from keras_parallel.multi_worker import check_fit_supported

__all__ = ["ParallelModel"]


#: The key of the loading hint in a saved `ParallelModel`'s config.
LOAD_HINT_KEY = "keras_parallel"

#: What a user who loads a saved DataParallel model without keras_parallel reads in
#: Keras's "Could not locate class 'ParallelModel'" (or, on tf-keras, "cannot be
#: imported") message, whose config begins with it.
LOAD_HINT = (
    "saved by keras_parallel: run `import keras_parallel` before loading it, or pass "
    "custom_objects=keras_parallel.custom_objects() to load_model"
)


@register
class ParallelModel(keras.Model):
    """The functional model returned by `keras_parallel.DataParallel`.

    A plain functional `keras.Model` (inputs, a `ParallelReplicas` layer, the
    template's output names) with three differences a user notices:

    - `compile()` never lets XLA drop the placement of the slices. XLA compiles
      the whole training step for one device, so every slice would run on one
      device. On the TensorFlow backend, `jit_compile="auto"` (Keras 3's
      default, which means XLA on any machine with a GPU) resolves to no XLA,
      and an explicit `jit_compile=True` is turned off with a warning that says
      why. Each device still runs its slice with TensorFlow's own kernels.
    - `save_weights()` writes the template's weights in the template's own
      layout, so `keras_parallel.unwrap(parallel)` or a fresh copy of the
      template (on a one-GPU machine, without keras_parallel) loads them with
      `load_weights`, and `load_weights()` reads a file written by the template
      or by this model (also one written by keras_parallel 0.1, with the
      parallel layout).
    - It is registered (package `keras_parallel`), so a saved model loads with
      `keras.models.load_model` without `custom_objects` once keras_parallel is
      imported.

    Don't build it directly: call `keras_parallel.DataParallel(model)`.

    Args:
        inputs: the functional model's inputs.
        outputs: the functional model's outputs.
        name: str or None. The model's name. Defaults to `None`.
        **kwargs: base model keyword arguments.
    """

    # Keras revives a functional subclass as functional only when its constructor
    # has the functional signature. Keras 3 takes (inputs, outputs, name, **kwargs)
    # in 3.15 and, before it, `*args, **kwargs` (its Functional constructor is
    # wrapped): the `*args, **kwargs` form passes both checks. tf-keras has its own.
    if IS_KERAS_3:

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    else:

        def __init__(self, inputs, outputs, name=None, trainable=True, **kwargs):
            super().__init__(inputs, outputs, name=name, trainable=trainable, **kwargs)

    def call(self, inputs, training=None, mask=None, **kwargs):
        """The functional graph; over one device on an eager backend, the template directly.

        Where `fit` runs the model's Python on every step (torch), the graph's own
        layers (this model's graph, the `ParallelReplicas` layer, the renaming
        `Identity` layers) cost time every step with nothing to cut or merge; over
        one device this calls the replicas layer's `call` straight away, which
        calls the template on its device. The outputs are the same tensors.
        """
        core = self._one_device_core()
        if core is None or mask is not None or kwargs:
            return super().call(inputs, training=training, mask=mask, **kwargs)
        return core.call(inputs, training=training)

    def _one_device_core(self) -> ParallelReplicas | None:
        if not _backend.devices.EAGER_STEPS:
            return None
        core = self._replicas_layer()
        return core if core is not None and core.num_replicas == 1 else None

    def _replicas_layer(self) -> ParallelReplicas | None:
        for layer in self.layers:
            if isinstance(layer, ParallelReplicas):
                return layer
        return None

    def compile(self, *args, **kwargs):
        bound = inspect.signature(super().compile).bind_partial(*args, **kwargs)
        jit = bound.arguments.get("jit_compile", "auto" if IS_KERAS_3 else None)
        core = self._replicas_layer()
        resolved, why = _backend.replicas.compile_jit(core, jit)
        if why == "xla_drops_placement":
            warn(
                "DataParallel model: `jit_compile=True` is turned off. XLA compiles "
                "the whole training step for one device and ignores where each "
                "slice is placed, so every slice would run on one device (the "
                "out-of-memory DataParallel exists to avoid). Training runs "
                "without XLA, each slice on its own device.",
            )
        elif why == "platforms_differ":
            warn(
                "DataParallel model: `jit_compile=True` is turned off. The devices "
                f"{core.placement} are of different kinds, which one jitted (SPMD) "
                "program cannot span; each device runs its own program instead.",
            )
        if resolved != jit:
            bound.arguments["jit_compile"] = resolved
        return super().compile(*bound.args, **bound.kwargs)

    def fit(self, *args, **kwargs):
        # Keras 3 fails inside its own fit on several workers: say so first, before
        # any data is read.
        check_fit_supported(self)
        return super().fit(*args, **kwargs)

    def get_config(self):
        # The hint comes first: Keras prints a model's config when it cannot find
        # its class (keras_parallel not imported), and the hint then leads it.
        return {LOAD_HINT_KEY: LOAD_HINT, **super().get_config()}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = {k: v for k, v in config.items() if k != LOAD_HINT_KEY}
        return super().from_config(config, custom_objects=custom_objects)

    def compile_from_config(self, config):
        # Keras skips compiling a loaded model whose `compile` is overridden unless
        # this is overridden too; ours only adjusts `jit_compile`, so compile as usual.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def save_weights(self, filepath, *args, **kwargs):
        """Saves the template's weights, in the template's layout, and this model's
        optimizer state (see the class doc)."""
        core = self._replicas_layer()
        if core is None:  # pragma: no cover - only for a hand-built instance
            return super().save_weights(filepath, *args, **kwargs)
        with _optimizer_lent(core.layer, getattr(self, "optimizer", None)):
            return core.layer.save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        """Loads weights saved by the template or by a `DataParallel` model."""
        core = self._replicas_layer()
        if core is None:  # pragma: no cover - only for a hand-built instance
            return super().load_weights(filepath, *args, **kwargs)
        try:
            # Keras warns about the parts it skips before it fails on a file in the
            # parallel layout: held back here, and shown only if the load succeeds.
            with (
                warnings.catch_warnings(record=True) as held,
                _optimizer_lent(core.layer, getattr(self, "optimizer", None)),
            ):
                warnings.simplefilter("always")
                status = core.layer.load_weights(filepath, *args, **kwargs)
                # tf-keras's TensorFlow-checkpoint format matches lazily: check
                # that every template variable found its value.
                if hasattr(status, "assert_existing_objects_matched"):
                    status.assert_existing_objects_matched()
            for caught in held:
                warnings.warn_explicit(
                    caught.message, caught.category, caught.filename, caught.lineno
                )
            return status
        except Exception as template_error:
            try:
                return super().load_weights(filepath, *args, **kwargs)
            except Exception:
                raise template_error from None


@contextlib.contextmanager
def _optimizer_lent(template, optimizer):
    """On Keras 3, `template.optimizer` is `optimizer` inside the block.

    Keras 3 writes a model's optimizer state into its weights file (and reads
    it back) when the model has an optimizer: lent to the template, the
    parallel model's optimizer state (iterations, slots, loss scale) travels
    with the template's weights, in the template's layout, so resuming
    (`BackupAndRestore`) continues the same optimizer. A template without an
    optimizer ignores that part when it loads the file. tf-keras's formats
    keep the optimizer separately: nothing is lent there.
    """
    if not IS_KERAS_3 or optimizer is None or template is None:
        yield
        return
    missing = object()
    own = template.__dict__.get("optimizer", missing)
    template.optimizer = optimizer
    try:
        yield
    finally:
        if own is missing:
            del template.optimizer
        else:
            template.optimizer = own


if not IS_KERAS_3:
    # tf-keras's legacy H5 format names the saved model by its bare class name
    # ("ParallelModel"), not by its registered name: make that name known too.
    keras.saving.get_custom_objects().setdefault("ParallelModel", ParallelModel)
