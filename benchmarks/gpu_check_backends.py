"""GPU check of DataParallel on Keras 3 with JAX and torch (no TensorFlow needed).

Run on a machine with a GPU, Keras 3 and JAX and/or torch:

    python benchmarks/gpu_check_backends.py            # both backends, one process each
    python benchmarks/gpu_check_backends.py --backend torch

For each backend it trains a small Conv3D clip classifier (clips of 8x64x64x3,
4 classes, SGD) and prints, last, one table:

- equivalence: DataParallel over the GPU (and, on torch, over the GPU and the
  CPU with `split=[3, 1]`: two real devices) against the template alone, from
  the same weights: largest predict difference and largest weight difference
  after 3 training steps;
- where the replicas ran (the devices of the per-replica outputs);
- speed: samples/s of DataParallel over one GPU against the bare model, batch
  8, interleaved, medians of 7 repeats of 100 steps (goal >= 0.97);
- GradientAccumulation: whether it runs on this backend.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = (8, 64, 64, 3)
# The accelerator to check; KP_CHECK_DEVICE=/cpu:0 runs the script on a CPU (a smoke test).
GPU = os.environ.get("KP_CHECK_DEVICE", "/gpu:0")
SECOND = "/cpu:0"


def _check(backend: str) -> dict:
    sys.path.insert(0, ROOT)
    import numpy as np

    import keras_parallel
    from keras_parallel._compat import backend_name, keras
    from keras_parallel.devices import list_devices

    assert backend_name() == backend, backend_name()
    result = {"backend": backend, "keras": keras.__version__, "devices": list_devices()}

    def template(seed=0):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input(CLIP)
        x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
        x = keras.layers.MaxPooling3D(2)(x)
        x = keras.layers.Conv3D(16, 3, padding="same", activation="relu")(x)
        x = keras.layers.GlobalAveragePooling3D()(x)
        return keras.Model(inputs, keras.layers.Dense(4)(x))

    def compile_(model):
        model.compile(
            keras.optimizers.SGD(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    def numpy(value):
        return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, *CLIP)).astype("float32")
    y = rng.integers(0, 4, size=(24,)).astype("int32")

    def equivalence(devices, split=None):
        model = template()
        initial = model.get_weights()
        compile_(model)
        predicted = model.predict(x[:7], verbose=0)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        expected = model.get_weights()
        model.set_weights(initial)
        parallel = compile_(keras_parallel.DataParallel(model, devices=devices, split=split))
        core = keras_parallel.replicas(parallel)
        placed = [str(getattr(o, "device", "?")) for o in core.replica_outputs(x[:7])]
        predict_diff = float(np.abs(parallel.predict(x[:7], verbose=0) - predicted).max())
        parallel.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        weight_diff = max(
            float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), expected, strict=True)
        )
        return {
            "devices": devices,
            "split": split,
            "replica_output_devices": placed,
            "predict_max_abs_diff": predict_diff,
            "weights_max_abs_diff_after_3_steps": weight_diff,
        }

    result["equivalence"] = [equivalence([GPU])]
    if backend == "torch" and GPU != SECOND:
        result["equivalence"].append(equivalence([GPU, SECOND], split=[3, 1]))

    bare = compile_(template())
    wrapped = compile_(keras_parallel.DataParallel(template(), devices=[GPU]))
    data = (np.repeat(x, 40, axis=0), np.repeat(y, 40, axis=0))

    def rate(model, steps=100):
        start = time.perf_counter()
        model.fit(*data, batch_size=8, steps_per_epoch=steps, epochs=1, verbose=0)
        return steps * 8 / (time.perf_counter() - start)

    rate(bare, 3)
    rate(wrapped, 3)
    rates = {"bare": [], "dp1": []}
    for _ in range(7):
        rates["bare"].append(rate(bare))
        rates["dp1"].append(rate(wrapped))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    result["samples_per_s"] = medians
    result["dp1_over_bare"] = medians["dp1"] / medians["bare"]

    try:
        from keras_parallel.callbacks import GradientAccumulation

        probe = compile_(template())
        probe.fit(
            x, y, batch_size=8, epochs=1, verbose=0, callbacks=[GradientAccumulation(4)]
        )
        result["gradient_accumulation"] = "runs"
    except Exception as error:  # reported, not hidden
        result["gradient_accumulation"] = f"{type(error).__name__}: {str(error)[:160]}"
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["jax", "torch"], action="append")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_check(os.environ["KERAS_BACKEND"])), flush=True)
        return 0
    results = []
    for backend in args.backend or ["jax", "torch"]:
        env = dict(os.environ, KERAS_BACKEND=backend, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        done = subprocess.run(
            [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"--- {backend}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
            results.append({"backend": backend, "failed": True})
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    print("\n" + json.dumps(results, indent=1))
    print("\n| backend | devices | split | predict diff | weights diff | replicas on |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for e in r.get("equivalence", []):
            print(
                f"| {r['backend']} | {e['devices']} | {e['split']} | "
                f"{e['predict_max_abs_diff']:.2e} | {e['weights_max_abs_diff_after_3_steps']:.2e}"
                f" | {e['replica_output_devices']} |"
            )
    print("\n| backend | bare samples/s | DataParallel(1 GPU) samples/s | ratio | GA |")
    print("|---|---|---|---|---|")
    for r in results:
        if "samples_per_s" in r:
            s = r["samples_per_s"]
            print(
                f"| {r['backend']} | {s['bare']:.0f} | {s['dp1']:.0f} | "
                f"{r['dp1_over_bare']:.3f} | {r['gradient_accumulation'][:60]} |"
            )
    return 1 if any(r.get("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
