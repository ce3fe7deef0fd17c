"""Resuming a DataParallel model: BackupAndRestore and weights files carry the optimizer state.

Backend-neutral: Keras 3 on TensorFlow, JAX and torch, and tf-keras.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_backends import _numpy, _parallel

from keras_parallel._compat import IS_KERAS_3, keras
from keras_parallel.parallel_model import ParallelModel


def _template(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(6, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="resumed")


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(24, 5)).astype("float32"), rng.normal(size=(24, 3)).astype("float32")


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


def _compiled(template, count):
    model = template if count == 1 else _parallel(template, count, [2, 1])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    return model


@pytest.mark.parametrize("count", [1, 2], ids=["plain", "DataParallel 2:1"])
def test_backup_and_restore_resumes_the_same_optimizer(count, tmp_path):
    x, y = _data()
    template = _template()
    model = _compiled(template, count)
    model.fit(x, y, batch_size=12, epochs=4, shuffle=False, verbose=0)
    expected = template.get_weights()

    template = _template()
    model = _compiled(template, count)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            x,
            y,
            batch_size=12,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[backup, _Interrupt()],
        )
    template = _template(seed=1)  # a fresh process would start from other weights
    model = _compiled(template, count)
    model.fit(x, y, batch_size=12, epochs=4, shuffle=False, verbose=0, callbacks=[backup])
    for a, b in zip(template.get_weights(), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(_numpy(model.optimizer.iterations)) == 8  # 4 epochs of 2 batches


def test_a_weights_file_carries_the_optimizer_and_the_template_still_loads_it(tmp_path):
    x, y = _data()
    template = _template()
    model = _compiled(template, 2)
    if not isinstance(model, ParallelModel):
        pytest.skip("torch: the slices share one CPU in a plain model, not a DataParallel one")
    if not IS_KERAS_3:
        pytest.skip("tf-keras keeps the optimizer out of weights files (docs: checkpoints)")
    model.fit(x, y, batch_size=12, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "parallel.weights.h5")
    model.save_weights(path)

    fresh = _compiled(_template(seed=1), 2)
    fresh.fit(x[:12], y[:12], batch_size=12, epochs=1, verbose=0)  # builds its optimizer
    fresh.load_weights(path)
    assert int(_numpy(fresh.optimizer.iterations)) == int(_numpy(model.optimizer.iterations))
    for a, b in zip(fresh.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_allclose(_numpy(a), _numpy(b), rtol=1e-6)

    alone = _template(seed=2)  # the template alone, without an optimizer
    alone.load_weights(path)
    for a, b in zip(alone.get_weights(), template.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)
