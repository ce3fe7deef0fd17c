"""The `keras-parallel` command: `devices`, `plan MODEL.keras --batch-size N`, `demo`.

Exit codes: 0 success; 2 bad command-line arguments; 3 the model file does not
exist; 4 the file is not a Keras model that loads.

This module imports only the standard library: help and argument errors come
from `argparse` before TensorFlow is imported, and each command imports what it
needs. TensorFlow's own start-up lines (the ones written before its logging is
set up, "failed call to cuInit" on a machine without a GPU) are left out of the
output; set `TF_CPP_MIN_LOG_LEVEL=0` to see them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
import zipfile

EXIT_OK, EXIT_USAGE, EXIT_MISSING, EXIT_NOT_A_MODEL = 0, 2, 3, 4

#: TensorFlow's log level for the command, unless the environment sets one: 3
#: keeps only FATAL lines (errors reach the user as Python exceptions anyway).
DEFAULT_TF_LOG_LEVEL = "3"

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# -- argument types: text -> value, or an argparse error (no framework import) --


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _micro(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f'expected a positive integer or "auto", got {text!r}'
        ) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _split(text: str) -> str | list[float]:
    if text.strip().lower() in ("even", "memory", "speed"):
        return text.strip().lower()
    try:
        ratios = [float(part) for part in text.split(",")]
    except ValueError:
        ratios = []
    if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
        raise argparse.ArgumentTypeError(
            f"expected even, memory, speed, or positive ratios such as 2,1; got {text!r}"
        )
    return ratios


# -- TensorFlow's start-up lines ------------------------------------------------

_ABSL_LINE = re.compile(r"^(?P<severity>[IWEF])\d{4} [\d:.]+ +\d+ [^\s\]]+:\d+\] ")
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called"
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}


def _is_start_up_noise(line: str, level: int) -> bool:
    """A C++ log line below TF_CPP_MIN_LOG_LEVEL, which TensorFlow prints anyway at import."""
    if line.startswith(_ABSL_BANNER):
        return level >= 1
    match = _ABSL_LINE.match(line)
    return match is not None and _SEVERITY[match.group("severity")] < level


@contextlib.contextmanager
def _quiet_start_up():
    """Leaves out the C++ log lines TensorFlow writes while it loads, below the log level.

    TensorFlow's libraries log a few lines (`cudart_stub.cc`) before their
    logging is set up, so `TF_CPP_MIN_LOG_LEVEL` does not silence them. The
    process's stderr is captured while the block runs; every other line (a
    Python warning, an error) is written out afterwards, unchanged.
    """
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [
                line
                for line in text.splitlines(keepends=True)
                if not _is_start_up_noise(line, level)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _error(command: str, message: str, code: int) -> int:
    print(f"keras-parallel {command}: error: {message}", file=sys.stderr)
    return code


# -- commands -------------------------------------------------------------------


def _split_cpu(num_devices: int) -> list[str]:
    """`--cpus N`: the CPU as N devices, the way the backend allows; their names.

    TensorFlow splits its CPU into logical devices (`keras_parallel.split_cpu`);
    JAX is given N host devices before it starts; torch has one CPU device.

    Raises:
        RuntimeError: when the devices have already started with another number.
        NotImplementedError: where the backend cannot have several CPU devices.
    """
    from keras_parallel import _backend

    return _backend.devices.cpu_devices(num_devices)


def _devices_command(args) -> int:
    with _quiet_start_up():
        from keras_parallel import _backend
        from keras_parallel.devices import list_devices
        from keras_parallel.memory import device_memory_limit

    if args.cpus is not None:
        try:
            _split_cpu(args.cpus)
        except (NotImplementedError, RuntimeError) as error:
            return _error("devices", str(error), EXIT_USAGE)
    rows = []
    for device in list_devices():
        limit = device_memory_limit(device)
        kind = device.split(":")[1]
        rows.append((device, kind, "-" if limit is None else f"{limit / 2**20:,.0f}"))
    print(f"{'device':<20}{'kind':<6}{'memory limit MiB':>18}")
    for device, kind, limit in rows:
        print(f"{device:<20}{kind:<6}{limit:>18}")
    cpus = sum(kind == "CPU" for _, kind, _ in rows)
    if not any(kind == "GPU" for _, kind, _ in rows):
        if cpus > 1:
            print(
                f"No GPU found: the CPU is split into {cpus} logical devices. They share "
                "the same cores: use them to try multi-device runs, not for speed."
            )
        elif not _backend.devices.CAN_SPLIT_CPU:
            print(
                f"No GPU found: DataParallel runs on the CPU ({_backend.BACKEND} has one "
                "CPU device)."
            )
        else:
            print(
                "No GPU found: DataParallel runs on the CPU. `--cpus N` splits it into N "
                "logical devices to try multi-device runs (see `keras-parallel demo`)."
            )
    return EXIT_OK


def _model_file_problem(path: str) -> str | None:
    """Why `path` cannot be a saved Keras model, told from the file alone; None if it may be."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            return None
        return "a folder without saved_model.pb is not a SavedModel"
    extension = os.path.splitext(path)[1].lower()
    if extension == ".keras" and not zipfile.is_zipfile(path):
        return "a .keras file is a zip archive, and this file is not one"
    if extension in (".h5", ".hdf5"):
        with open(path, "rb") as file:
            if file.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
                return f"a {extension} file is an HDF5 file, and this file is not one"
    return None


def _plan_command(args) -> int:
    if not os.path.exists(args.model):
        return _error("plan", f"no such file: {args.model}", EXIT_MISSING)
    problem = _model_file_problem(args.model)
    if problem is not None:
        return _error("plan", f"{args.model} is not a Keras model: {problem}", EXIT_NOT_A_MODEL)
    with _quiet_start_up():
        import keras_parallel
        from keras_parallel._compat import keras
        from keras_parallel.devices import list_devices

    devices = args.devices
    if args.cpus is not None:
        try:
            cpus = _split_cpu(args.cpus)  # before the model is loaded: it starts the devices
        except (NotImplementedError, RuntimeError) as error:
            return _error("plan", str(error), EXIT_USAGE)
        if devices is None and not list_devices("GPU"):
            devices = cpus
    try:
        model = keras.models.load_model(args.model, compile=False)
    except Exception as error:  # any failure to load means: not a usable Keras model
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return _error(
            "plan",
            f"{args.model} is not a Keras model that loads here "
            f"({type(error).__name__}: {first_line})",
            EXIT_NOT_A_MODEL,
        )
    is_parallel = keras_parallel.unwrap(model) is not model
    if is_parallel and (args.devices is not None or args.split is not None):
        return _error(
            "plan",
            f"{args.model} is a DataParallel model: it brings its own devices and split, "
            "so --devices and --split do not apply",
            EXIT_USAGE,
        )
    try:
        result = keras_parallel.plan(
            model,
            args.batch_size,
            devices=None if is_parallel else devices,
            split=None if is_parallel else args.split,
            micro_batch_size=args.micro_batch_size,
            batch_norm=None if is_parallel else args.batch_norm,
            memory_budget=(
                None if args.memory_budget_mib is None else args.memory_budget_mib * 2**20
            ),
        )
    except ValueError as error:
        return _error("plan", str(error), EXIT_USAGE)
    print(result)
    return EXIT_OK


def _demo_command(args) -> int:
    with _quiet_start_up():
        from keras_parallel import demo

    return demo.run(args)


# -- the parser -----------------------------------------------------------------


def _add_cpus_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpus",
        type=_positive_int,
        default=None,
        metavar="N",
        help="make the CPU N devices first (TensorFlow: logical devices; JAX: host "
        "devices; not on torch), to try several devices without a GPU; they share the "
        "same cores: no speed-up",
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (as `keras_parallel.demo.add_arguments`), without importing it."""
    parser.add_argument("--samples", type=_positive_int, default=1024, help="training clips")
    parser.add_argument("--epochs", type=_positive_int, default=6, help="epochs")
    parser.add_argument("--frames", type=_positive_int, default=8, help="frames per clip")
    parser.add_argument("--size", type=_positive_int, default=24, help="frame height and width")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="batch size")
    parser.add_argument("--micro-batch-size", type=_micro, default="auto", help='an int or "auto"')
    parser.add_argument("--learning-rate", type=_positive_float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default="keras_parallel_demo", help="folder for the model and the plot"
    )
    parser.add_argument("--verbose", action="store_true", help="a progress bar per step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-parallel",
        description="Train Keras models with a bigger batch than one GPU holds.",
        epilog="Exit codes: 0 ok, 2 bad arguments, 3 missing file, 4 not a Keras model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    devices = commands.add_parser("devices", help="list the devices, their kind and memory limit")
    _add_cpus_argument(devices)
    devices.set_defaults(handler=_devices_command)

    plan = commands.add_parser("plan", help="the plan for training a saved model")
    plan.add_argument("model", help="a saved Keras model (.keras, .h5, SavedModel folder)")
    plan.add_argument(
        "--batch-size",
        type=_positive_int,
        required=True,
        help="the batch_size given to fit: rows per step over all devices",
    )
    plan.add_argument(
        "--devices",
        nargs="+",
        default=None,
        help="device names, e.g. /gpu:0 /gpu:1 (default: every GPU; without one, the "
        "CPU, or its N logical devices with --cpus N)",
    )
    _add_cpus_argument(plan)
    plan.add_argument(
        "--split", type=_split, default=None, help="even, memory, speed, or ratios: 2,1"
    )
    plan.add_argument("--micro-batch-size", type=_micro, default=None, help='an int or "auto"')
    plan.add_argument(
        "--batch-norm",
        choices=["global", "per_slice"],
        default=None,
        help="BatchNormalization statistics of the whole step (global, the default) or "
        "of each device's slice (per_slice); a DataParallel model brings its own",
    )
    plan.add_argument(
        "--memory-budget-mib",
        type=_positive_int,
        default=None,
        help="MiB per device where the limit is unknown (a CPU)",
    )
    plan.set_defaults(handler=_plan_command)

    demo = commands.add_parser(
        "demo", help="train a small video classifier on every device found, and show the plan"
    )
    add_demo_arguments(demo)
    demo.set_defaults(handler=_demo_command)
    return parser


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _configured_backend(environ) -> str | None:
    """The backend Keras 3 would use: `KERAS_BACKEND`, else keras.json's, else None."""
    if environ.get("KERAS_BACKEND"):
        return environ["KERAS_BACKEND"]
    home = environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as config:
            import json

            return json.load(config).get("backend")
    except (OSError, ValueError, AttributeError):
        return None


def choose_backend(environ=None) -> str | None:
    """Picks an installed Keras backend when the one Keras would use is missing.

    Keras 3 uses TensorFlow unless `KERAS_BACKEND` (or ~/.keras/keras.json) says
    otherwise; installed with `.[jax]` or `.[torch]` alone, it would fail at import.
    The command then sets `KERAS_BACKEND` to the first installed of TensorFlow, JAX
    and torch, for itself only (an application may; a library may not). Returns the
    backend it set, or None when it left the choice to Keras. `environ`: the
    environment to read and set (default `os.environ`).
    """
    environ = os.environ if environ is None else environ
    configured = _configured_backend(environ) or "tensorflow"
    if environ.get("TF_USE_LEGACY_KERAS") or _installed(configured):
        return None
    for backend in ("tensorflow", "jax", "torch"):
        if _installed(backend):
            environ["KERAS_BACKEND"] = backend
            return backend
    return None


def _version() -> str:
    """The installed package's version (no framework import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keras-parallel")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line for a person at a terminal: no Python source line."""
    return f"{category.__name__}: {message}\n"


def main(argv=None) -> int:
    # An application may choose TensorFlow's log level (a library may not), and
    # how warnings look in its terminal.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_TF_LOG_LEVEL)
    import warnings

    warnings.formatwarning = _format_warning
    args = build_parser().parse_args(argv)
    choose_backend()
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
