"""Models with their own steps: never silently trained with another step.

Backend-neutral (every flavour of tests/run_flavours.py).

- `DataParallel` refuses a template whose class defines `train_step`,
  `test_step`, `predict_step`, `compute_loss` or `compute_metrics` (the parallel
  model would run Keras's default steps), naming the method, when it is called.
- The documented route keeps the user's class and puts the parallel model inside
  it; it trains as the same class around the plain template does.
- `GradientAccumulation` refuses a model with its own `train_step` before any
  update, and runs a model's own `compute_loss` (exactly: the same update as
  plain `fit`).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_weights_close
from test_backends import _cpus, _parallel

from keras_parallel import DataParallel
from keras_parallel._compat import IS_KERAS_3, keras
from keras_parallel.callbacks import GradientAccumulation

RNG = np.random.default_rng(0)
X = RNG.normal(size=(48, 5)).astype("float32")
Y = RNG.integers(0, 3, size=(48,))


def _mean(tensor):
    if IS_KERAS_3:
        return keras.ops.mean(tensor)
    import tensorflow as tf

    return tf.reduce_mean(tensor)


def _template(cls=None, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    outputs = keras.layers.Dense(3)(hidden)
    return (cls or keras.Model)(inputs, outputs, name="template")


class OwnTrainStep(keras.Model):
    def train_step(self, data):
        return super().train_step(data)


class OwnTestStep(keras.Model):
    def test_step(self, data):
        return super().test_step(data)


class OwnPredictStep(keras.Model):
    def predict_step(self, data):
        return super().predict_step(data)


class PenalizedLoss(keras.Model):
    """An extra loss term, 0.5 * mean(output ** 2), in `compute_loss`."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kwargs):
        loss = super().compute_loss(x, y, y_pred, sample_weight, **kwargs)
        return loss + 0.5 * _mean(y_pred**2)


class Penalized(keras.Model):
    """The documented route: the user's class around the parallel model."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kwargs):
        loss = super().compute_loss(x, y, y_pred, sample_weight, **kwargs)
        return loss + 0.5 * _mean(y_pred**2)


def _compile(model):
    model.compile(
        keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def _fit(model, callbacks=()):
    model.fit(X, Y, batch_size=12, epochs=2, verbose=0, shuffle=False, callbacks=list(callbacks))


@pytest.mark.parametrize(
    "cls, method",
    [
        (OwnTrainStep, "train_step"),
        (OwnTestStep, "test_step"),
        (OwnPredictStep, "predict_step"),
        (PenalizedLoss, "compute_loss"),
    ],
)
def test_data_parallel_refuses_a_template_with_its_own_step(cls, method):
    with pytest.raises(ValueError, match=rf"defines its own {method}\b") as raised:
        DataParallel(_template(cls), devices=_cpus()[:1])
    assert "Invalid value for argument `model`" in str(raised.value)
    assert "keras_parallel.DataParallel(inner)" in str(raised.value)


def test_the_users_class_around_the_parallel_model_trains_as_around_the_template():
    plain = _template()
    _fit(_compile(Penalized(plain)))

    template = _template()
    _fit(_compile(Penalized(_parallel(template, 2, [2, 1]))))
    assert_weights_close(template.get_weights(), plain.get_weights())


def test_accumulation_refuses_a_model_with_its_own_train_step_before_any_update():
    model = _compile(_template(OwnTrainStep))
    before = model.get_weights()
    with pytest.raises(ValueError, match="cannot run the train_step") as raised:
        _fit(model, [GradientAccumulation(4)])
    assert "OwnTrainStep.train_step" in str(raised.value)
    assert_weights_close(model.get_weights(), before, rtol=0, atol=0)
    assert int(np.asarray(model.optimizer.iterations.numpy())) == 0


def test_accumulation_runs_a_models_own_compute_loss():
    plain = _compile(_template(PenalizedLoss))
    _fit(plain)
    accumulated = _compile(_template(PenalizedLoss))
    _fit(accumulated, [GradientAccumulation(4)])
    assert_weights_close(accumulated.get_weights(), plain.get_weights())
    unpenalized = _compile(_template())
    _fit(unpenalized)
    assert not np.allclose(unpenalized.get_weights()[0], plain.get_weights()[0], atol=1e-4)
