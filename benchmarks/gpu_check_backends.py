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
- GradientAccumulation (batch 32, micro-batches of 8, Adam), against plain
  `fit` at batch 8 and Keras's own `gradient_accumulation_steps=4` at batch 8:
  samples/s (interleaved, medians; goals >= 1.0x Keras's option and >= 0.95x
  plain batch 8) and the allocator peak, each configuration in a fresh process
  (JAX cannot reset its peak; goal: within 10% of plain batch 8's); equivalence
  with plain batch 32 from the same weights;
- `"auto"`: on torch a real CUDA out-of-memory error (the allocator capped with
  `torch.cuda.set_per_process_memory_fraction` between micro-batch 8's peak and
  batch 32's) recovered, with the weights then compared with plain batch 32
  (nothing lost or applied twice); on JAX a budget that batch 32 exceeds, planned
  from XLA's memory analysis, trained without running out.

`--small` uses clips of 8x24x24x3 and fewer steps (a CPU smoke test, with
KP_CHECK_DEVICE=/cpu:0).
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
CLIP = (8, 24, 24, 3) if "--small" in sys.argv else (8, 64, 64, 3)
STEPS = 10 if "--small" in sys.argv else 100
# The accelerator to check; KP_CHECK_DEVICE=/cpu:0 runs the script on a CPU (a smoke test).
GPU = os.environ.get("KP_CHECK_DEVICE", "/gpu:0")
SECOND = "/cpu:0"


def _template(keras, seed=0):
    """The Conv3D clip classifier every check trains (4 classes, logits)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(CLIP)
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling3D(2)(x)
    x = keras.layers.Conv3D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x))


def _check(backend: str) -> dict:
    sys.path.insert(0, ROOT)
    import numpy as np

    import keras_parallel
    from keras_parallel._compat import backend_name, keras
    from keras_parallel.devices import list_devices

    assert backend_name() == backend, backend_name()
    result = {"backend": backend, "keras": keras.__version__, "devices": list_devices()}

    def template(seed=0):
        return _template(keras, seed)

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

    def rate(model, steps=STEPS):
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

    if backend == "torch" and GPU != SECOND:
        result.update(_speed_split(keras, template, compile_, data))
    result.update(_accumulation(backend, template, numpy, x, y))
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    return result


SPEED_BATCH = 32
FIXED_SPLITS = ([1, 1], [3, 1], [7, 1], [15, 1], [31, 1])


def _speed_split(keras, template, compile_, data) -> dict:
    """torch, the GPU and the CPU as two devices: split="speed" against fixed ratios.

    Global batch 32, interleaved repeats, medians; the GPU alone is shown too
    (the best a split can do when the CPU only slows the step down).
    """
    import keras_parallel

    def rate(model, steps):
        start = time.perf_counter()
        model.fit(*data, batch_size=SPEED_BATCH, steps_per_epoch=steps, epochs=1, verbose=0)
        return steps * SPEED_BATCH / (time.perf_counter() - start)

    start = time.perf_counter()
    speed = keras_parallel.DataParallel(template(), devices=[GPU, SECOND], split="speed")
    chosen = keras_parallel.replicas(speed)
    out = {
        "speed_ratios": [round(r, 3) for r in chosen.ratios],
        "speed_rows_at_32": chosen.slice_sizes(SPEED_BATCH),
        "speed_figures": chosen.split_figures,
        "speed_measure_s": time.perf_counter() - start,
    }
    models = {"speed": compile_(speed), "gpu_alone": compile_(template())}
    for ratios in FIXED_SPLITS:
        models[str(ratios)] = compile_(
            keras_parallel.DataParallel(template(), devices=[GPU, SECOND], split=ratios)
        )
    steps = max(2, STEPS // 10)
    for model in models.values():
        rate(model, 2)
    rates = {name: [] for name in models}
    for _ in range(3):
        for name, model in models.items():
            rates[name].append(rate(model, steps))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    best = max((n for n in medians if n.startswith("[")), key=medians.get)
    out["speed_samples_per_s"] = medians
    out["speed_best_fixed"] = best
    out["speed_over_best_fixed"] = medians["speed"] / medians[best]
    out["speed_over_gpu_alone"] = medians["speed"] / medians["gpu_alone"]
    return out


ACCUMULATION = {  # name: (batch_size, GradientAccumulation micro-batch, Keras steps)
    "plain_b8": (8, None, None),
    "keras_ga4_b8": (8, None, 4),
    "ours_b32_m8": (32, 8, None),
    "plain_b32": (32, None, None),
}


def _peak_bytes(backend: str):
    """The accelerator's allocator peak so far (None on a CPU)."""
    if GPU.lower().startswith("/cpu"):
        return None
    if backend == "torch":
        import torch

        return int(torch.cuda.max_memory_allocated())
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _accumulation_model(keras, template, steps=None):
    model = template()
    model.compile(
        keras.optimizers.Adam(1e-3, gradient_accumulation_steps=steps),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit_config(keras, template, name, data, epochs_steps):
    from keras_parallel.callbacks import GradientAccumulation

    batch, micro, steps = ACCUMULATION[name]
    model = _accumulation_model(keras, template, steps)
    callbacks = [GradientAccumulation(micro)] if micro else []

    def run(batches):
        start = time.perf_counter()
        model.fit(
            *data,
            batch_size=batch,
            steps_per_epoch=max(1, batches * 32 // batch),
            epochs=1,
            verbose=0,
            callbacks=callbacks,
        )
        return batches * 32 / (time.perf_counter() - start)

    run(1)  # compile / warm up
    return model, run


def _accumulation(backend, template, numpy, x, y) -> dict:
    """GradientAccumulation's speed, peak, equivalence and "auto" (see the docstring)."""
    import numpy as np

    from keras_parallel._compat import keras
    from keras_parallel.callbacks import GradientAccumulation

    out = {}
    data = (np.repeat(x, 40, axis=0), np.repeat(y, 40, axis=0))

    # Equivalence: GA(8) at batch 32 against plain batch 32, same weights, 3 batches.
    def fitted(callbacks):
        model = _accumulation_model(keras, template)
        model.fit(
            data[0][:96],
            data[1][:96],
            batch_size=32,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        return model

    def difference():
        plain, ours = fitted([]), fitted([GradientAccumulation(8)])
        return max(
            float(np.abs(numpy(a) - numpy(b)).max())
            for a, b in zip(ours.get_weights(), plain.get_weights(), strict=True)
        )

    out["ga_weights_max_abs_diff"] = difference()
    if backend == "jax":
        # JAX computes float32 convolutions in TF32 on recent GPUs by default:
        # the same comparison at full float32 precision tells rounding from a bug.
        import jax

        with jax.default_matmul_precision("highest"):
            out["ga_weights_max_abs_diff_float32"] = difference()
    # Speed, interleaved.
    runs = {n: _fit_config(keras, template, n, data, STEPS)[1] for n in list(ACCUMULATION)[:3]}
    rates = {n: [] for n in runs}
    for _ in range(5):
        for name, run in runs.items():
            rates[name].append(run(STEPS // 4 or 1))
    medians = {n: statistics.median(r) for n, r in rates.items()}
    out["ga_samples_per_s"] = medians
    out["ga_over_keras_ga"] = medians["ours_b32_m8"] / medians["keras_ga4_b8"]
    out["ga_over_plain_b8"] = medians["ours_b32_m8"] / medians["plain_b8"]
    out.update(_auto_check(backend, keras, template, numpy, data))
    return out


def _auto_check(backend, keras, template, numpy, data) -> dict:
    """torch: a real CUDA OOM recovered; JAX: a budget batch 32 exceeds, never run out."""
    import numpy as np

    from keras_parallel.callbacks import GradientAccumulation

    if GPU.lower().startswith("/cpu"):
        return {"auto": "skipped on a CPU (no allocator limit)"}
    x, y = data[0][:64], data[1][:64]
    if backend == "torch":
        import torch

        def peak_of(micro):
            """Bytes a fit of a fresh model adds at its peak, over what was allocated."""
            model = _accumulation_model(keras, template)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            cbs = [GradientAccumulation(micro)] if micro else []
            model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=cbs)
            return torch.cuda.max_memory_allocated() - base

        p8, p32 = peak_of(8), peak_of(None)
        plain = _accumulation_model(keras, template)
        plain.fit(x, y, batch_size=32, shuffle=False, verbose=0)
        model = _accumulation_model(keras, template)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        # The cap: what is allocated now plus half-way between micro-batch 8's and
        # batch 32's own peaks, so batch 32 runs out and micro-batches of 8 fit.
        cap = torch.cuda.memory_allocated() + (p8 + p32) / 2
        torch.cuda.set_per_process_memory_fraction(cap / total)
        callback = GradientAccumulation("auto", memory_budget=10**15, memory_probe=lambda m: 1)
        try:
            model.fit(x, y, batch_size=32, shuffle=False, verbose=0, callbacks=[callback])
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        diff = max(
            float(np.abs(numpy(a) - numpy(b)).max())
            for a, b in zip(model.get_weights(), plain.get_weights(), strict=True)
        )
        return {
            "auto": "torch OOM recovered",
            "auto_peaks_m8_b32_MiB": [p8 / 2**20, p32 / 2**20],
            "auto_micro_after_oom": callback.micro_batch_size_,
            "auto_iterations": int(numpy(model.optimizer.iterations)),
            "auto_weights_max_abs_diff_vs_plain_b32": diff,
        }
    from keras_parallel import plan

    budget = plan(template(), 32, micro_batch_size=8).peak_bytes[0] / 0.8
    model = _accumulation_model(keras, template)
    callback = GradientAccumulation("auto", memory_budget=int(budget))
    model.fit(x, y, batch_size=32, verbose=0, callbacks=[callback])
    return {
        "auto": "jax planned under the budget",
        "auto_budget_MiB": budget / 2**20,
        "auto_micro": callback.micro_batch_size_,
        "auto_process_peak_MiB": (_peak_bytes(backend) or 0) / 2**20,
    }


def _peak_child(backend: str, name: str) -> dict:
    sys.path.insert(0, ROOT)
    import numpy as np

    from keras_parallel._compat import keras

    def template(seed=0):
        return _template(keras, seed)

    rng = np.random.default_rng(0)
    data = (rng.normal(size=(64, *CLIP)).astype("float32"), rng.integers(0, 4, size=(64,)))
    _, run = _fit_config(keras, template, name, data, 2)
    run(2)
    return {"config": name, "peak_bytes": _peak_bytes(backend)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["jax", "torch"], action="append")
    parser.add_argument("--small", action="store_true", help="small clips: a CPU smoke test")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peak", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        backend = os.environ["KERAS_BACKEND"]
        result = _peak_child(backend, args.peak) if args.peak else _check(backend)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    def child(backend, *extra):
        env = dict(os.environ, KERAS_BACKEND=backend, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        command = [sys.executable, __file__, "--child", *extra]
        if args.small:
            command.append("--small")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"--- {backend} {extra}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
            return None
        return json.loads(lines[-1][len("RESULT ") :])

    results = []
    for backend in args.backend or ["jax", "torch"]:
        result = child(backend)
        print(f"RESULT {backend} " + json.dumps(result), flush=True)
        if result is None:
            results.append({"backend": backend, "failed": True})
            continue
        peaks = {n: (child(backend, "--peak", n) or {}).get("peak_bytes") for n in ACCUMULATION}
        result["ga_peak_bytes"] = peaks
        if peaks.get("plain_b8") and peaks.get("ours_b32_m8"):
            result["ga_peak_over_plain_b8"] = peaks["ours_b32_m8"] / peaks["plain_b8"]
        results.append(result)
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
    print("\n| backend | bare samples/s | DataParallel(1 GPU) samples/s | ratio |")
    print("|---|---|---|---|")
    for r in results:
        if "samples_per_s" in r:
            s = r["samples_per_s"]
            print(
                f"| {r['backend']} | {s['bare']:.0f} | {s['dp1']:.0f} | {r['dp1_over_bare']:.3f} |"
            )
    print(
        "\n| backend | GA b32 m8 samples/s | Keras GA4 b8 | plain b8 | GA / Keras GA | "
        "GA / plain b8 | peak GA / plain b8 | GA vs plain b32 weights | same, float32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "ga_samples_per_s" in r:
            s = r["ga_samples_per_s"]
            peak = r.get("ga_peak_over_plain_b8")
            print(
                f"| {r['backend']} | {s['ours_b32_m8']:.0f} | {s['keras_ga4_b8']:.0f} | "
                f"{s['plain_b8']:.0f} | {r['ga_over_keras_ga']:.3f} | {r['ga_over_plain_b8']:.3f}"
                f" | {'n/a' if peak is None else f'{peak:.3f}'} | "
                f"{r['ga_weights_max_abs_diff']:.1e} | "
                f"{r.get('ga_weights_max_abs_diff_float32', float('nan')):.1e} |"
            )
    for r in results:
        if "speed_samples_per_s" in r:
            print(
                f"\n{r['backend']} GPU + CPU, batch {SPEED_BATCH}: split='speed' chose "
                f"{r['speed_ratios']} (rows {r['speed_rows_at_32']}, measured in "
                f"{r['speed_measure_s']:.1f} s); samples/s "
                + ", ".join(f"{k} {v:.0f}" for k, v in r["speed_samples_per_s"].items())
                + f"; speed / best fixed ({r['speed_best_fixed']}) "
                f"{r['speed_over_best_fixed']:.3f}; speed / GPU alone "
                f"{r['speed_over_gpu_alone']:.3f}"
            )
    for r in results:
        auto = {k: v for k, v in r.items() if k.startswith("auto")}
        if auto:
            print(f"{r['backend']} auto: {json.dumps(auto)}")
    return 1 if any(r.get("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
