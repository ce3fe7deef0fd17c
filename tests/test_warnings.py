"""`keras_parallel._warnings.warn`: warnings point at the user's line, not at Keras."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

from keras_parallel._compat import keras
from keras_parallel._warnings import warn
from keras_parallel.callbacks import GPUMemoryLogger


def _library_function(module_name: str):
    """A function whose frames belong to module `module_name` (as a library's would)."""
    namespace = {"__name__": module_name, "warn": warn}
    code = "def deep(message, category):\n    warn(message, category)\n"
    code += "def call(message, category):\n    deep(message, category)\n"
    exec(compile(code, f"<{module_name}>", "exec"), namespace)
    return namespace["call"]


@pytest.mark.parametrize(
    "module_name", ["keras_parallel.fake", "keras.src.fake", "tf_keras.src.fake", "tensorflow"]
)
def test_frames_of_the_libraries_are_skipped(module_name):
    call = _library_function(module_name)
    with pytest.warns(DeprecationWarning, match="from deep inside") as caught:
        line = inspect.currentframe().f_lineno + 1
        call("from deep inside", DeprecationWarning)
    assert caught[0].filename == __file__
    assert caught[0].lineno == line


def test_other_packages_are_the_users_code():
    """A module whose name only starts like a library's is not skipped."""
    call = _library_function("kerasx_user_code")
    with pytest.warns(UserWarning) as caught:
        call("here", UserWarning)
    assert caught[0].filename == "<kerasx_user_code>"


def test_called_from_user_code_points_at_the_call():
    with pytest.warns(UserWarning, match="plain") as caught:
        line = inspect.currentframe().f_lineno + 1
        warn("plain")
    assert caught[0].filename == __file__
    assert caught[0].lineno == line


def test_a_callback_warning_during_fit_points_at_the_fit_line(monkeypatch):
    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)  # no CPU figures
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.zeros((4, 2), "float32")
    # A CPU has no GPU memory figures: GPUMemoryLogger warns from on_train_begin,
    # which Keras calls from its callback list, deep inside `fit`.
    logger = GPUMemoryLogger(devices=["/cpu:0"], nvml=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        model.fit(x, x[:, :1], epochs=1, verbose=0, callbacks=[logger])
    ours = [w for w in caught if "GPUMemoryLogger" in str(w.message)]
    assert ours, [str(w.message) for w in caught]
    for caught_warning in ours:
        assert (caught_warning.filename, caught_warning.lineno) == (__file__, line)
