"""Several processes on JAX: Keras's `keras.distribution` with keras_parallel.

Two JAX processes on 127.0.0.1 (`keras.distribution.initialize`, a free port,
each with its CPU made 2 devices) train under `keras.distribution.DataParallel()`
on a global batch of 16 (tests/multi_worker_jax_worker.py). Both end with the
weights of one process training plain `fit` on the same global batch: plain
`fit`, DataParallel over each process's devices (equal and 2:1),
GradientAccumulation (micro-batches that divide the batch and that do not, and
"auto" planned differently on each process), and both together. A split that
differs between processes is refused before any data is read.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from keras_parallel._compat import backend_name

pytestmark = pytest.mark.skipif(
    backend_name() != "jax", reason="keras.distribution over several processes: JAX only"
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multi_worker_jax_worker.py")
TIMEOUT = 120  # seconds for the whole run; a hung collective fails the test


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs the 2 processes and the one-process reference at once; their OUT.json files."""
    folder = tmp_path_factory.mktemp("multi_worker_jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    runs = {
        "worker0": ["0", "2", str(port)],
        "worker1": ["1", "2", str(port)],
        "reference": ["0", "1", "0"],
    }
    processes = {}
    try:
        for name, args in runs.items():
            processes[name] = subprocess.Popen(
                [sys.executable, WORKER, str(folder / f"{name}.json"), *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        errors = {}
        for name, process in processes.items():
            _, stderr = process.communicate(timeout=TIMEOUT)
            if process.returncode != 0:
                errors[name] = stderr.decode(errors="replace")[-2000:]
        assert not errors, errors
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in runs}


def _assert_matches_reference(results, case):
    reference = results["reference"]["plain"]["weights"]
    for worker in ("worker0", "worker1"):
        outcome = results[worker][case]
        assert "error" not in outcome, outcome
        for got, want in zip(outcome["weights"], reference, strict=True):
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    first, second = (results[w][case]["weights"] for w in ("worker0", "worker1"))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_processes_share_every_device(results):
    assert results["worker0"]["devices"] == results["worker1"]["devices"] == 4


def test_plain_fit_matches_one_process(results):
    _assert_matches_reference(results, "plain")


def test_data_parallel_on_one_device_matches_one_process(results):
    _assert_matches_reference(results, "data_parallel_one_device")


@pytest.mark.parametrize("split", ["", "_2_1"])
def test_data_parallel_over_each_process_devices_matches_one_process(results, split):
    _assert_matches_reference(results, f"data_parallel{split}")


@pytest.mark.parametrize("case", ["accumulation", "accumulation_ragged"])
def test_gradient_accumulation_matches_one_process(results, case):
    _assert_matches_reference(results, case)


@pytest.mark.parametrize("split", ["", "_2_1"])
def test_data_parallel_with_accumulation_matches_one_process(results, split):
    _assert_matches_reference(results, f"data_parallel{split}_accumulation")


def test_auto_plans_agree_on_the_smallest_size(results):
    _assert_matches_reference(results, "accumulation_auto")
    for worker in ("worker0", "worker1"):
        assert results[worker]["accumulation_auto"]["micro_batch_size"] == [2, 2]


def test_memory_logger_logs_on_every_process(results):
    _assert_matches_reference(results, "memory_logger")
    for worker in ("worker0", "worker1"):
        logged = results[worker]["memory_logger"]["logged"]
        assert set(logged) - {"loss"}, logged


def test_a_split_that_differs_between_processes_is_refused(results):
    for worker in ("worker0", "worker1"):
        outcome = results[worker]["split_differs"]
        assert outcome["error"] == "ValueError", outcome
        assert "the same `split` on every process" in outcome["message"]
        assert "one row per process" in outcome["message"]
