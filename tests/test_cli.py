"""The `keras-parallel` command, run as the installed entry point: outputs and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_parallel._compat import keras

# The command as `pip install` wires it: the `keras-parallel` console-script entry point.
LOAD_MAIN = (
    "from importlib.metadata import entry_points\n"
    "(entry,) = entry_points(group='console_scripts', name='keras-parallel')\n"
    "main = entry.load()\n"
)


def user_env():
    """The environment a user has: TensorFlow's log level left to the command."""
    return {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-c", LOAD_MAIN + "import sys\nsys.exit(main(sys.argv[1:]))\n", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=user_env(),
    )


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.keras"
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(str(path))
    return str(path)


# Runs the command on several argument lists in turn, in one process (each TensorFlow
# start costs seconds): per list, the exit code, what went to stdout, what went to
# stderr (Python's and the file descriptor's, where TensorFlow's C++ lines go) and the
# heavy modules imported by then. The last stdout line is the JSON report.
RUN_MANY = LOAD_MAIN + (
    """
import contextlib, io, json, os, sys, tempfile
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryFile() as fd2:
        saved = os.dup(2)
        os.dup2(fd2.fileno(), 2)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exit:
                    code = exit.code
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        fd2.seek(0)
        c_lines = fd2.read().decode("utf-8", errors="replace")
    heavy = sorted(m for m in ("tensorflow", "keras", "tf_keras") if m in sys.modules)
    results.append([code, out.getvalue(), err.getvalue() + c_lines, heavy])
print(json.dumps(results))
"""
)

PLAN = ["plan", "MODEL", "--batch-size"]

#: Commands that stop in argparse or at the file check: (argv, exit code, what it says).
LIGHT = [
    (["--help"], 0, "devices"),
    (["--version"], 0, "keras-parallel 0."),
    (["plan", "--help"], 0, "--cpus N"),
    (["plan", "--help"], 0, "the batch_size given to fit"),
    (["plan", "--help"], 0, "--batch-norm {global,per_slice}"),
    ([*PLAN, "8", "--batch-norm", "sync"], 2, "--batch-norm: invalid choice: 'sync'"),
    (["demo", "--help"], 0, "--micro-batch-size"),
    (["devices", "--cpus", "0"], 2, "--cpus: expected a positive integer, got '0'"),
    ([*PLAN, "0"], 2, "--batch-size: expected a positive integer, got '0'"),
    ([*PLAN, "2.5"], 2, "--batch-size: expected a positive integer, got '2.5'"),
    ([*PLAN, "8", "--micro-batch-size", "big"], 2, 'a positive integer or "auto"'),
    ([*PLAN, "8", "--split", "2,-1"], 2, "--split: expected even, memory, speed, or"),
    (["plan", "NOPE", "--batch-size", "8"], 3, "no such file"),
    (["plan", "TEXT", "--batch-size", "8"], 4, "is not a Keras model: a .keras"),
    (["plan", "H5", "--batch-size", "8"], 4, "is not a Keras model: a .h5"),
]

#: Commands that start TensorFlow, after the light ones in the same process.
HEAVY = {
    "devices": ["devices", "--cpus", "2"],
    "plan": [*PLAN, "32", "--cpus", "2", "--devices", "/cpu:0", "/cpu:1", "--split", "2,1"]
    + ["--micro-batch-size", "16"],
    "zip": ["plan", "ZIP", "--batch-size", "8"],
    "plan_bn": ["plan", "BN_MODEL", "--batch-size", "12", "--cpus", "2", "--split", "2,1"]
    + ["--batch-norm", "per_slice"],
}


@pytest.fixture(scope="module")
def one_process(saved_model, tmp_path_factory):
    """Every command of LIGHT, then of HEAVY, run in one process: {name or index: result}."""
    import zipfile

    folder = tmp_path_factory.mktemp("cli_files")
    files = {"MODEL": saved_model, "NOPE": str(folder / "nope.keras")}
    files["BN_MODEL"] = str(folder / "bn.keras")
    inputs = keras.Input((4,))
    normalized = keras.layers.BatchNormalization()(keras.layers.Dense(3)(inputs))
    keras.Model(inputs, keras.layers.Dense(2)(normalized)).save(files["BN_MODEL"])
    files["TEXT"] = str(folder / "notes.keras")
    files["H5"] = str(folder / "notes.h5")
    for name in ("TEXT", "H5"):
        with open(files[name], "w") as file:
            file.write("not a model")
    files["ZIP"] = str(folder / "archive.keras")
    with zipfile.ZipFile(files["ZIP"], "w") as archive:
        archive.writestr("readme.txt", "not a model")
    argvs = [argv for argv, _, _ in LIGHT] + list(HEAVY.values())
    argvs = [[files.get(arg, arg) for arg in argv] for argv in argvs]
    done = subprocess.run(
        [sys.executable, "-c", RUN_MANY, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=300,
        env=user_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # nothing reached the terminal outside the commands
    results = json.loads(done.stdout.splitlines()[-1])
    return dict(enumerate(results[: len(LIGHT)])) | dict(
        zip(HEAVY, results[len(LIGHT) :], strict=True)
    )


def test_help_and_argument_errors_come_without_importing_tensorflow(one_process):
    for index, (argv, code, says) in enumerate(LIGHT):
        got, out, err, heavy = one_process[index]
        assert got == code, (argv, out, err)
        assert says in (out if code == 0 else err), (argv, out, err)
        assert "not found" not in err.lower(), (argv, err)
        assert heavy == [], argv


def test_devices_on_a_cpu_split_in_two_prints_the_table_only(one_process):
    code, out, err, _ = one_process["devices"]
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["device", "kind", "memory", "limit", "MiB"]
    assert [line.split()[0] for line in lines[1:3]] == ["/device:CPU:0", "/device:CPU:1"]
    assert "split into 2 logical devices" in out
    assert "same cores" in out
    assert err == ""  # no TensorFlow start-up lines (cuInit, cudart_stub)


def test_plan_on_a_cpu_split_in_two(one_process):
    code, out, err, _ = one_process["plan"]
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        "Plan for batch 32 on 2 device(s): 1 step of 32 rows, split 22 + 10 (no accumulation)"
    )
    assert lines[1] == "micro_batch_size=16: a step holds up to 16 x 2 = 32 rows, cut by the ratios"
    assert [line.split()[:3] for line in lines[3:5]] == [
        ["/device:CPU:0", "2", "22"],
        ["/device:CPU:1", "1", "10"],
    ]


def test_plan_says_what_batch_normalization_statistics_cover(one_process):
    code, out, err, _ = one_process["plan_bn"]
    assert code == 0, err
    assert (
        "BatchNormalization: statistics of each device's slice (8, 4 rows) "
        "(batch_norm='per_slice')" in out
    )


def test_a_zip_that_is_not_a_model_exits_4(one_process):
    code, out, err, _ = one_process["zip"]
    assert code == 4, out + err
    assert "is not a Keras model that loads here" in err
    assert "not found" not in err.lower()


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    out = tmp_path / "demo"
    result = run_cli(
        "demo", "--samples", "64", "--epochs", "1", "--frames", "4", "--size", "12",
        "--batch-size", "16", "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Plan for batch 16" in result.stdout
    assert "Held-out accuracy" in result.stdout
    assert "predictions match" in result.stdout
    assert (out / "direction_classifier.keras").exists()
    loaded = keras.models.load_model(str(out / "direction_classifier.keras"))
    assert loaded.predict(np.zeros((2, 4, 12, 12, 1), "float32"), verbose=0).shape == (2, 4)


def test_the_command_picks_an_installed_backend_when_keras_would_use_a_missing_one(
    monkeypatch, tmp_path
):
    import keras_parallel_cli as cli

    environ = {"KERAS_HOME": str(tmp_path)}  # no keras.json: Keras would use TensorFlow
    installed = {"tensorflow": False, "jax": False, "torch": True}
    monkeypatch.setattr(cli, "_installed", lambda module: installed[module])
    assert cli.choose_backend(environ) == "torch"
    assert environ["KERAS_BACKEND"] == "torch"

    # The backend Keras would use is installed: the choice stays Keras's.
    environ = {"KERAS_HOME": str(tmp_path)}
    (tmp_path / "keras.json").write_text('{"backend": "torch"}')
    assert cli.choose_backend(environ) is None
    assert "KERAS_BACKEND" not in environ


def test_the_demo_module_runs_as_the_demo_command():
    """`python -m keras_parallel.demo` is `keras-parallel demo` (same options, same prog)."""
    done = subprocess.run(
        [sys.executable, "-m", "keras_parallel.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env=user_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: keras-parallel demo")
    assert "--micro-batch-size" in done.stdout
