"""Callbacks that write keys into the logs run before every callback that reads them.

`GPUMemoryLogger` and `GradientAccumulation` add keys to the epoch logs
(`gpu0_peak_mib`, `micro_batch_size`, ...). Keras calls a `fit`'s callbacks in
list order and hands each the same `logs` dict, so a `CSVLogger`, `TensorBoard`
or `EarlyStopping` listed *before* them would never see those keys (CSVLogger
fixes its columns at the first epoch). Users list callbacks in any order, so at
the start of training these callbacks move themselves to the front of the
`keras.callbacks.CallbackList` that `fit` built.

No public route gives a callback its `CallbackList`: this module finds the one
calling `on_train_begin` among the caller's frames, and reads and reorders its
public `callbacks` list. It is the only place that does; the test
tests/test_accumulation_backends.py::test_log_keys_reach_a_csv_logger_listed_in_any_order
(a CSVLogger listed first gets the columns, on every flavour) fails when Keras
changes how it calls the callbacks.

Reordering while `CallbackList.on_train_begin` iterates the list is safe: the
callback moves from position k to 0, so positions after k are unchanged and
the loop goes on with the callback after it; the ones it moved past have
already had their `on_train_begin`.
"""

from __future__ import annotations

import inspect

from keras_parallel._compat import keras

#: How many frames up to look for the calling CallbackList (Keras calls the hook
#: from `CallbackList.on_train_begin` directly: one frame up).
_FRAMES = 4


def calling_callback_list(callback):
    """The `keras.callbacks.CallbackList` whose `on_train_begin` is calling `callback`, or None."""
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        for _ in range(_FRAMES):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList) and any(
                c is callback for c in getattr(owner, "callbacks", ())
            ):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def move_to_front(callback) -> bool:
    """Moves `callback` to the front of the `fit` callback list calling it.

    Call it from `on_train_begin`. Returns True when the callback was found (moved,
    or already first), False when no calling `CallbackList` was found (the hook was
    called by hand): then nothing changes.
    """
    callback_list = calling_callback_list(callback)
    if callback_list is None:
        return False
    callbacks = callback_list.callbacks
    index = next(i for i, c in enumerate(callbacks) if c is callback)
    if index > 0:
        callbacks.insert(0, callbacks.pop(index))
    return True
