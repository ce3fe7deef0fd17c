"""The `keras-parallel` command: `devices`, `plan MODEL.keras --batch-size N`, `demo`.

Exit codes: 0 success; 2 bad command-line arguments (argparse); 3 the model
file does not exist; 4 the file is not a Keras model that loads.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_OK, EXIT_USAGE, EXIT_MISSING, EXIT_NOT_A_MODEL = 0, 2, 3, 4


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _micro(text: str):
    return text if text == "auto" else _positive_int(text)


def _devices_command(args) -> int:
    from keras_parallel.devices import list_devices
    from keras_parallel.memory import device_memory_limit

    rows = []
    for device in list_devices():
        limit = device_memory_limit(device)
        kind = device.split(":")[1]
        rows.append((device, kind, "-" if limit is None else f"{limit / 2**20:,.0f}"))
    print(f"{'device':<20}{'kind':<6}{'memory limit MiB':>18}")
    for device, kind, limit in rows:
        print(f"{device:<20}{kind:<6}{limit:>18}")
    if not any(kind == "GPU" for _, kind, _ in rows):
        print("No GPU found: DataParallel runs on the CPU (see `keras-parallel demo`).")
    return EXIT_OK


def _plan_command(args) -> int:
    if not os.path.exists(args.model):
        print(f"keras-parallel plan: error: no such file: {args.model}", file=sys.stderr)
        return EXIT_MISSING
    import keras_parallel
    from keras_parallel._compat import keras

    try:
        model = keras.models.load_model(args.model, compile=False)
    except Exception as error:  # any failure to load means: not a usable Keras model
        print(
            f"keras-parallel plan: error: {args.model} is not a Keras model that loads "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})",
            file=sys.stderr,
        )
        return EXIT_NOT_A_MODEL
    split = args.split
    if split and split not in ("even", "memory", "speed"):
        try:
            split = [float(v) for v in split.split(",")]
        except ValueError:
            print(
                f"keras-parallel plan: error: --split expects even, memory, speed or ratios "
                f"like 2,1; got {args.split!r}",
                file=sys.stderr,
            )
            return EXIT_USAGE
    is_parallel = keras_parallel.unwrap(model) is not model  # brings its own devices
    try:
        result = keras_parallel.plan(
            model,
            args.batch_size,
            devices=None if is_parallel else args.devices,
            split=None if is_parallel else split,
            micro_batch_size=args.micro_batch_size,
            memory_budget=(
                None if args.memory_budget_mib is None else args.memory_budget_mib * 2**20
            ),
        )
    except ValueError as error:
        print(f"keras-parallel plan: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(result)
    return EXIT_OK


def _demo_command(args) -> int:
    from keras_parallel import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-parallel",
        description="Train Keras models with a bigger batch than one GPU holds.",
        epilog="Exit codes: 0 ok, 2 bad arguments, 3 missing file, 4 not a Keras model.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("devices", help="list the devices, their kind and memory limit")
    plan = commands.add_parser("plan", help="the plan for training a saved model")
    plan.add_argument("model", help="a saved Keras model (.keras, .h5, SavedModel folder)")
    plan.add_argument("--batch-size", type=_positive_int, required=True)
    plan.add_argument("--devices", nargs="+", default=None, help="device names (all GPUs)")
    plan.add_argument("--split", default=None, help="even, memory, speed, or ratios: 2,1")
    plan.add_argument("--micro-batch-size", type=_micro, default=None, help='an int or "auto"')
    plan.add_argument(
        "--memory-budget-mib", type=_positive_int, default=None, help="budget where no limit"
    )
    from keras_parallel import demo

    demo.add_arguments(commands.add_parser("demo", help="train the video demo (main job)"))
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    handler = {"devices": _devices_command, "plan": _plan_command, "demo": _demo_command}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
