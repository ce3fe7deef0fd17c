"""The keras_parallel demo: which way does the shape move? (`keras-parallel demo`)

Generated video clips of a bright square moving left, right, up or down over
noise; a small Conv3D classifier learns the direction. The model is trained
with `DataParallel` over every device found (a CPU split into two logical
devices with a 2:1 split when there is no GPU), `GradientAccumulation("auto")`
and `GPUMemoryLogger`; the plan is printed first, then training, held-out
accuracy, where the files went, and a reload check.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

DIRECTIONS = ("right", "left", "down", "up")


def make_clips(num: int, frames: int = 8, size: int = 24, seed: int = 0):
    """`num` clips of shape (frames, size, size, 1) and their direction labels (0-3)."""
    # The square (up to 5 pixels) must be able to travel across the frames: at
    # least 1 pixel a frame, 2 where there is room.
    fastest = (size - 5) // max(frames - 1, 1)
    if fastest < 1:
        raise ValueError(
            f"Invalid arguments for `make_clips`. Expected size >= frames + 4, so a "
            f"square can move across the clip. Received: frames={frames}, size={size}"
        )
    rng = np.random.default_rng(seed)
    clips = rng.normal(0.0, 0.15, size=(num, frames, size, size, 1)).astype("float32")
    labels = rng.integers(0, len(DIRECTIONS), size=num)
    moves = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}
    for i, label in enumerate(labels):
        side = int(rng.integers(3, 6))
        speed = min(int(rng.integers(1, 3)), fastest)
        travel = speed * (frames - 1)
        dy, dx = moves[int(label)]
        lo_y = travel if dy < 0 else 0
        hi_y = size - side - (travel if dy > 0 else 0)
        lo_x = travel if dx < 0 else 0
        hi_x = size - side - (travel if dx > 0 else 0)
        y0 = int(rng.integers(lo_y, hi_y + 1))
        x0 = int(rng.integers(lo_x, hi_x + 1))
        for t in range(frames):
            y, x = y0 + dy * speed * t, x0 + dx * speed * t
            clips[i, t, y : y + side, x : x + side, 0] += 1.0
    return clips, labels.astype("int32")


def build_classifier(frames: int, size: int):
    from keras_parallel._compat import keras

    inputs = keras.Input((frames, size, size, 1), name="clip")
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling3D((1, 2, 2))(x)
    x = keras.layers.Conv3D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    outputs = keras.layers.Dense(len(DIRECTIONS), activation="softmax", name="direction")(x)
    return keras.Model(inputs, outputs, name="direction_classifier")


def _split_cpu_if_no_gpu() -> bool:
    """Makes the CPU 2 devices when there is no GPU. True if it did.

    TensorFlow splits its CPU into logical devices (`keras_parallel.split_cpu`),
    JAX is given 2 host devices before it starts; torch has one CPU device, so
    it trains there on one. The two devices share the same cores: the demo shows
    the mechanics, not speed.
    """
    from keras_parallel import _backend

    return _backend.devices.stand_in_cpus(2)


def run(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Real allocator figures on a CPU too (read before TensorFlow starts), so the
    # memory log and plot have something to show on a laptop.
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    on_cpu = _split_cpu_if_no_gpu()

    import keras_parallel
    from keras_parallel import _backend
    from keras_parallel._compat import keras
    from keras_parallel.callbacks import GPUMemoryLogger, GradientAccumulation
    from keras_parallel.devices import list_devices

    keras.utils.set_random_seed(args.seed)
    backend = f"{keras_parallel.FLAVOUR}, {_backend.BACKEND}"
    gpus = list_devices("GPU")
    if on_cpu:
        devices = [d for d in list_devices("CPU")][:2]
        split = [2, 1]
        where = "no GPU: a CPU split into 2 devices, 2:1"
    elif not gpus:
        devices, split = list_devices("CPU")[:1], None
        where = "no GPU: one CPU device"
    else:
        devices = None
        split = "memory" if len(gpus) > 1 else None
        where = f"{len(gpus)} GPU(s), split={split or 'even'}"
    micro = args.micro_batch_size
    micro = micro if micro == "auto" else int(micro)

    os.makedirs(args.output, exist_ok=True)
    model_path = os.path.join(args.output, "direction_classifier.keras")
    plot_path = os.path.join(args.output, "memory.png")

    x_train, y_train = make_clips(args.samples, args.frames, args.size, seed=args.seed)
    x_test, y_test = make_clips(max(64, args.samples // 4), args.frames, args.size, seed=99)

    template = build_classifier(args.frames, args.size)
    print(f"keras_parallel {keras_parallel.__version__} ({backend}) - {where}")
    print(
        f"Task: which way does the shape move ({', '.join(DIRECTIONS)})? "
        f"{len(x_train)} training clips of {args.frames}x{args.size}x{args.size}, "
        f"chance = {1 / len(DIRECTIONS):.0%}\n"
    )
    plan = keras_parallel.plan(
        template, args.batch_size, devices=devices, split=split, micro_batch_size=micro
    )
    print(plan, "\n")

    parallel = keras_parallel.DataParallel(template, devices=devices, split=split)
    parallel.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = [
        GradientAccumulation(micro_batch_size=micro),
        # The devices trained on (every GPU when `devices` is None). Two logical
        # CPUs share one allocator: the plot has one line and says so under it.
        # JAX and torch keep no figures for a CPU: there, every GPU (none: the
        # host's memory only).
        GPUMemoryLogger(
            plot_path=plot_path,
            devices=devices if _backend.memory.CPU_FIGURES else None,
        ),
    ]
    start = time.perf_counter()
    parallel.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=1 if args.verbose else 2,
    )
    seconds = time.perf_counter() - start
    _, accuracy = parallel.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)
    print(
        f"\nHeld-out accuracy: {accuracy:.1%} on {len(x_test)} clips (chance "
        f"{1 / len(DIRECTIONS):.0%}); training took {seconds:.0f} s"
    )

    parallel.save(model_path)
    print(f"Saved the model to {model_path}")
    if os.path.exists(plot_path):
        print(f"Saved the memory plot to {plot_path}")
    before = parallel.predict(x_test, batch_size=args.batch_size, verbose=0)
    loaded = keras.models.load_model(model_path)
    after = loaded.predict(x_test, batch_size=args.batch_size, verbose=0)
    difference = float(np.max(np.abs(before - after)))
    same = difference <= 1e-6
    print(
        f"Reloaded it: predictions {'match' if same else 'DIFFER'} "
        f"(max difference {difference:.1e})"
    )
    return 0 if same else 1


if __name__ == "__main__":  # `python -m keras_parallel.demo`: `keras-parallel demo`
    from keras_parallel_cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
