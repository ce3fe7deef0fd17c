"""Training on several machines: 2 worker processes on 127.0.0.1, MultiWorkerMirroredStrategy.

Each worker (tests/multi_worker_worker.py) splits its CPU into 2 logical devices,
builds `keras_parallel.multi_worker.strategy()` (one replica per worker) and trains
every case in turn on the global batch of 16 (8 rows per worker). Both workers must
end with the weights of one process training plain `fit` on the same global batch.
One pair of workers runs all the cases of a flavour (a strategy is made once per
process); every process is ended, and each run is bounded in time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_weights_close

from keras_parallel import multi_worker
from keras_parallel._compat import IS_KERAS_3

HERE = Path(__file__).resolve().parent
WORKER = HERE / "multi_worker_worker.py"
RUN_TIMEOUT = 240  # seconds for a pair of workers to run all their cases
COLLECTIVE_TIMEOUT = 60  # seconds a worker waits for the other in a collective

TRAINING_CASES = [
    "plain",
    "dp_equal",
    "dp_21",
    "ga",
    "dp_ga",
    "memory_logger",
    "auto_agree",
    "oom",  # worker 1 alone runs out of memory at the first step: every worker redoes it
]


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(cases, tmp_path, workers=2):
    """Runs `workers` worker processes on `cases`; returns each worker's results."""
    ports = _free_ports(workers)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes, outs = [], []
    try:
        for index in range(workers):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            env["MW_TIMEOUT"] = str(COLLECTIVE_TIMEOUT)
            env["TF_CPP_MIN_LOG_LEVEL"] = "2"
            env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
            out = tmp_path / f"worker{index}.json"
            log = open(tmp_path / f"worker{index}.log", "w")  # noqa: SIM115 - closed below
            outs.append((out, log))
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(out), *cases],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        for process in processes:
            process.wait(timeout=RUN_TIMEOUT)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for _, log in outs:
            log.close()
    results = []
    for index, (out, _) in enumerate(outs):
        if not out.exists():
            log_text = (tmp_path / f"worker{index}.log").read_text()[-3000:]
            pytest.fail(f"worker {index} wrote no results:\n{log_text}")
        results.append(json.loads(out.read_text()))
    return results


@pytest.fixture(scope="module")
def reference():
    """One process, no strategy, plain `fit` on the global batch."""
    from multi_worker_worker import run_case

    return run_case("plain", 0, None)


@pytest.fixture(scope="module")
def tf_keras_runs(tmp_path_factory):
    if IS_KERAS_3:
        pytest.skip("Keras 3 refuses fit on several workers (see the Keras 3 tests)")
    # "oom_fixed" fails on every worker: it comes last (a failed case ends the run).
    return run_workers([*TRAINING_CASES, "dp_bn", "oom_fixed"], tmp_path_factory.mktemp("workers"))


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_two_workers_train_as_one_process_on_the_global_batch(case, tf_keras_runs, reference):
    for worker in tf_keras_runs:
        result = worker["cases"][case]
        assert "error" not in result, result.get("traceback")
        assert_weights_close(
            [np.asarray(w) for w in result["weights"]],
            [np.asarray(w) for w in reference["weights"]],
            rtol=1e-5,
        )
        np.testing.assert_allclose(
            result["history"]["loss"], reference["history"]["loss"], rtol=1e-5
        )
        assert result["iterations"] == reference["iterations"]  # one update per global batch


def test_batch_normalization_statistics_are_the_global_batch_s(tf_keras_runs):
    """DataParallel(batch_norm="global") in each worker: the moments of all 16 rows, over
    both workers' devices (the strategy's cross-replica sums), as one process on the batch."""
    from multi_worker_worker import run_case

    expected = run_case("plain_bn", 0, None)
    for worker in tf_keras_runs:
        result = worker["cases"]["dp_bn"]
        assert "error" not in result, result.get("traceback")
        for key in ("weights", "statistics"):
            assert_weights_close(
                [np.asarray(w) for w in result[key]],
                [np.asarray(w) for w in expected[key]],
                rtol=1e-5,
            )


def test_workers_agree_on_the_smallest_auto_micro_batch(tf_keras_runs):
    # Worker 0's plan is 8 rows, worker 1's 2: both run 2 (collectives must match).
    sizes = [worker["cases"]["auto_agree"]["micro_batch_size"] for worker in tf_keras_runs]
    assert sizes == [2, 2]
    for worker in tf_keras_runs:
        assert worker["cases"]["auto_agree"]["history"]["micro_batch_size"] == [2.0, 2.0]


def test_memory_logger_logs_on_every_worker(tf_keras_runs):
    for worker in tf_keras_runs:
        history = worker["cases"]["memory_logger"]["history"]
        assert set(history) - {"loss"}, history


def test_out_of_memory_on_one_worker_is_redone_by_every_worker_at_half_size(tf_keras_runs):
    # Worker 1 alone runs out of memory at 8 rows: both workers undo the step and
    # redo the same batch at 4 rows (weights, loss and iterations as one process:
    # checked with the training cases above).
    for worker in tf_keras_runs:
        result = worker["cases"]["oom"]
        assert "error" not in result, result.get("traceback")
        assert result["micro_batch_size"] == 4
        assert result["history"]["micro_batch_size"] == [4.0, 4.0]
        # The undone 8-row pass left no trace in either worker's layer state.
        assert result["largest"] == 4.0


def test_out_of_memory_at_a_fixed_size_fails_every_worker_at_once(tf_keras_runs):
    # A fixed size is not redone: the worker that ran out raises the allocator's
    # error, the other is told in the same step (no wait for the collective timeout).
    failing, other = (tf_keras_runs[i]["cases"]["oom_fixed"] for i in (1, 0))
    assert failing["error"]["type"] == "ResourceExhaustedError"
    assert other["error"]["type"] == "ResourceExhaustedError"
    assert "another worker ran out of memory" in other["error"]["message"]
    for result in (failing, other):
        assert result["seconds"] < COLLECTIVE_TIMEOUT / 2


@pytest.mark.skipif(not IS_KERAS_3, reason="Keras 3 only")
def test_keras_3_on_several_workers(tmp_path):
    results = run_workers(["plain", "auto_agree", "dp_equal"], tmp_path)
    for worker in results:
        # GradientAccumulation made inside the strategy's scope refuses at once
        # (Keras 3's fit fails before any callback is called).
        accumulation = worker["cases"]["auto_agree"]["error"]
        assert accumulation["type"] == "NotImplementedError", accumulation
        assert "GradientAccumulation cannot run there" in accumulation["message"]
        # Keras's own failure (keras-team/keras#20585): when this stops failing,
        # lift the refusal in keras_parallel.multi_worker.check_fit_supported.
        plain = worker["cases"]["plain"]["error"]
        assert "PerReplica" in plain["message"], plain
        # keras_parallel's models refuse clearly, before reading data.
        refused = worker["cases"]["dp_equal"]["error"]
        assert refused["type"] == "NotImplementedError"
        assert "keras-team/keras#20585" in refused["message"]
        assert "TF_USE_LEGACY_KERAS=1" in refused["message"]


def test_strategy_without_tf_config_is_one_worker_one_replica(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    resolver = multi_worker.cluster_resolver()
    assert resolver.cluster_spec().as_dict() == {}
    assert resolver.num_accelerators() == {"GPU": 0}


def test_cluster_resolver_reads_the_cluster_and_the_task():
    config = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    resolver = multi_worker.cluster_resolver(json.dumps(config))
    assert resolver.cluster_spec().as_dict() == {"worker": ["a:1", "b:2"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tf_config="{not json"), "tf_config"),
        (dict(tf_config={"cluster": {"worker": ["a:1", "b:2"]}}), "task"),
        (dict(communication="mpi"), "communication"),
        (dict(timeout=0), "timeout"),
    ],
)
def test_strategy_refuses_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        multi_worker.strategy(**kwargs)
