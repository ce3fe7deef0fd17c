"""The `keras-parallel` command, run as a subprocess: outputs and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from keras_parallel._compat import keras


def run_cli(*args, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "keras_parallel.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.keras"
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(str(path))
    return str(path)


def test_devices_lists_a_table():
    result = run_cli("devices")
    assert result.returncode == 0, result.stderr
    assert "/device:CPU:0" in result.stdout and "memory limit MiB" in result.stdout


def test_plan_for_a_saved_model(saved_model):
    result = run_cli("plan", saved_model, "--batch-size", "32", "--micro-batch-size", "8")
    assert result.returncode == 0, result.stderr
    assert "Plan for batch 32" in result.stdout
    assert "micro-batch 8 per device" in result.stdout


def test_missing_file_exits_3(tmp_path):
    result = run_cli("plan", str(tmp_path / "nope.keras"), "--batch-size", "8")
    assert result.returncode == 3
    assert "no such file" in result.stderr


def test_not_a_model_exits_4(tmp_path):
    path = tmp_path / "notes.keras"
    path.write_text("not a model")
    result = run_cli("plan", str(path), "--batch-size", "8")
    assert result.returncode == 4
    assert "not a Keras model" in result.stderr


@pytest.mark.parametrize("value", ["0", "2.5"])
def test_bad_batch_size_exits_2(saved_model, value):
    result = run_cli("plan", saved_model, "--batch-size", value)
    assert result.returncode == 2
    assert "--batch-size" in result.stderr and "positive integer" in result.stderr


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    out = tmp_path / "demo"
    result = run_cli(
        "demo", "--samples", "64", "--epochs", "1", "--frames", "4", "--size", "12",
        "--batch-size", "16", "--output", str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Plan for batch 16" in result.stdout
    assert "Held-out accuracy" in result.stdout
    assert "predictions match" in result.stdout
    assert (out / "direction_classifier.keras").exists()
    loaded = keras.models.load_model(str(out / "direction_classifier.keras"))
    assert loaded.predict(np.zeros((2, 4, 12, 12, 1), "float32"), verbose=0).shape == (2, 4)
