"""Runs the getting-started guide (docs/getting-started.md) and writes what it printed.

    python tools/getting_started.py               # plan, training, logs, plot (a few minutes)
    python tools/getting_started.py --plan-only   # only print the plan (seconds)

The page shows this file's code (between the `--8<--` markers) and the output
it wrote into docs/generated/getting-started/: the plan, the training log, the
History, the CSVLogger file and the memory plot. Rerun it after a change that
alters what it prints, and commit what it wrote; tests/test_docs.py checks that
the committed plan is still what `--plan-only` prints.

It runs on a machine without a GPU. The CPU is split into two logical devices,
which stand in for the guide's two GPUs (12 GB and 6 GB):

- A CPU has no memory limit, so `split="memory"` is given the two GPUs' sizes
  through an injected `DeviceProbe` (the figures a 12 GB and a 6 GB GPU report),
  and `GradientAccumulation("auto")` a `memory_budget` scaled to this small model.
- TensorFlow reports allocator figures on a CPU only with its BFC allocator
  (`TF_CPU_ALLOCATOR_USE_BFC=true`, set below before TensorFlow starts), and
  its oneDNN kernels are off so the measured peaks repeat from run to run.
- The two logical CPUs share one allocator: the memory log has one set of keys
  (`cpu0_*`) for both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "generated", "getting-started")

# Fixed before TensorFlow starts: Keras 3 on TensorFlow, real CPU allocator
# figures, the same kernels on every x86 CPU, no start-up log lines.
os.environ.pop("TF_USE_LEGACY_KERAS", None)
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, ROOT)

# --8<-- [start:setup]
import os

# Memory figures on a CPU: TensorFlow reads this once, when it starts.
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # on your machine: leave it out

import keras

import keras_parallel
from keras_parallel.demo import make_clips  # clips of a square moving 1 of 4 ways

# No GPU here: the CPU, split into two logical devices, stands in for the two GPUs
# (before TensorFlow starts its devices).
devices = keras_parallel.split_cpu(2)  # on your machine: leave it out
FRAMES, SIZE = 8, 24  # frames per clip, pixels per side
# --8<-- [end:setup]

import tensorflow as tf  # noqa: E402

# One thread per op scheduler: the allocator peaks then repeat to the byte.
tf.config.threading.set_inter_op_parallelism_threads(1)

# --8<-- [start:standins]
# Stand-ins for the two GPUs on a CPU, which has no memory limit of its own.
GIB, MIB = 2**30, 2**20
# What a 12 GB and a 6 GB GPU report as their memory, for split="memory":
STAND_IN_LIMITS = {devices[0]: 12 * GIB, devices[1]: 6 * GIB}
# The memory each device may use, scaled down to this small model:
MEMORY_BUDGET = 10 * MIB


class StandInProbe(keras_parallel.probes.DeviceProbe):
    """The memory a 12 GB and a 6 GB GPU report, for the two logical CPUs."""

    def memory_limit(self, device):
        return STAND_IN_LIMITS[device]


# --8<-- [end:standins]


# --8<-- [start:model]
def build_classifier():
    """A small video classifier: which way does the square in the clip move?"""
    clips = keras.Input((FRAMES, SIZE, SIZE, 1), name="clip")
    x = keras.layers.Conv3D(16, 3, padding="same", activation="relu")(clips)
    x = keras.layers.MaxPooling3D((1, 2, 2))(x)
    x = keras.layers.Conv3D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    direction = keras.layers.Dense(4, activation="softmax", name="direction")(x)
    return keras.Model(clips, direction, name="video_classifier")


# --8<-- [end:model]


def make_parallel():
    # --8<-- [start:parallel]
    keras.utils.set_random_seed(0)
    model = build_classifier()
    parallel = keras_parallel.DataParallel(
        model,
        devices=devices,  # on your machine: leave it out (every GPU)
        split="memory",  # 12 GB and 6 GB: 2:1
        probe=StandInProbe(),  # on your machine: leave it out (it reads the GPUs)
    )
    # --8<-- [end:parallel]
    return model, parallel


def print_plan(parallel):
    # --8<-- [start:plan]
    plan = keras_parallel.plan(
        parallel,
        batch_size=32,
        micro_batch_size="auto",
        memory_budget=MEMORY_BUDGET,  # on your machine: leave it out (the GPUs' memory)
    )
    print(plan)
    # --8<-- [end:plan]
    return plan


# --8<-- [start:data]
class Clips(keras.utils.PyDataset):
    """Batches of clips and their labels, made when asked (as if read from disk)."""

    def __init__(self, batches, batch_size=32, seed=0):
        super().__init__()
        self.batches, self.batch_size, self.seed = batches, batch_size, seed

    def __len__(self):
        return self.batches

    def __getitem__(self, index):
        return make_clips(self.batch_size, FRAMES, SIZE, seed=self.seed + index)


# --8<-- [end:data]


def train(model, parallel):
    # --8<-- [start:fit]
    from keras_parallel.callbacks import GPUMemoryLogger, GradientAccumulation

    clips = Clips(batches=32)  # 1024 clips, 32 a batch

    parallel.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = parallel.fit(
        clips,  # batches of 32
        epochs=6,
        verbose=2,
        callbacks=[
            GradientAccumulation(
                micro_batch_size="auto",
                memory_budget=MEMORY_BUDGET,  # on your machine: leave it out
            ),
            GPUMemoryLogger(plot_path="memory.png", devices=devices),
            keras.callbacks.CSVLogger("memory_log.csv"),  # after the logger: sees its keys
        ],
    )
    model.save("video_classifier.keras")  # the template holds the trained weights
    # --8<-- [end:fit]
    test_clips = Clips(batches=4, seed=1000)
    _, accuracy = parallel.evaluate(test_clips, verbose=0)
    return history, accuracy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan-only", action="store_true", help="print the plan, nothing else")
    args = parser.parse_args(argv)

    model, parallel = make_parallel()
    if args.plan_only:
        print_plan(parallel)
        return 0

    os.makedirs(OUTPUT, exist_ok=True)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_plan(parallel)
    with open(os.path.join(OUTPUT, "plan.txt"), "w") as file:
        file.write(text.getvalue())
    sys.stdout.write(text.getvalue())

    here = os.getcwd()
    os.chdir(OUTPUT)  # the guide's relative file names land in the output folder
    try:
        start = time.perf_counter()
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            history, accuracy = train(model, parallel)
        seconds = time.perf_counter() - start
        os.remove("video_classifier.keras")  # not worth committing
    finally:
        os.chdir(here)
    with open(os.path.join(OUTPUT, "fit.txt"), "w") as file:
        file.write(log.getvalue())
    lines = [
        f"{key} {[round(float(v), 4) for v in values]}" for key, values in history.history.items()
    ]
    with open(os.path.join(OUTPUT, "history.txt"), "w") as file:
        file.write("\n".join(lines) + "\n")
    with open(os.path.join(OUTPUT, "result.txt"), "w") as file:
        file.write(
            f"Held-out accuracy: {accuracy:.1%} on 128 clips (chance 25%); training and "
            f"saving took {seconds:.0f} s on {os.cpu_count()} CPU cores "
            f"(keras {keras.__version__}, TensorFlow {tf.__version__}).\n"
        )
    print(log.getvalue())
    print("\n".join(lines))
    print(f"accuracy {accuracy:.3f}, {seconds:.0f} s; wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
