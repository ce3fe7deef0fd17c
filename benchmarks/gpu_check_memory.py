"""GPU check for GPUMemoryLogger on Keras 3 with JAX or torch (no TensorFlow needed).

Run on a machine with a GPU, Keras 3, nvidia-ml-py and JAX or torch:

    KERAS_BACKEND=jax   python benchmarks/gpu_check_memory.py
    KERAS_BACKEND=torch python benchmarks/gpu_check_memory.py

It trains a small model for 3 epochs with the logger every 5 batches, then
prints the logged keys and values, the allocator's and NVML's figures side by
side, `device_memory_limit`, the summary, and whether TensorFlow was imported.
Exit status 1 when a required key is missing.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import numpy as np

    from keras_parallel._compat import backend_name, keras
    from keras_parallel.callbacks import GPUMemoryLogger
    from keras_parallel.memory import MIB, NVMLSource, default_source, device_memory_limit

    backend = backend_name()
    print(f"backend={backend} keras={keras.__version__}")
    source = default_source()
    devices = source.devices()
    print(f"source={type(source).__name__} devices={devices}")

    class BatchKeys(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_end(self, batch, logs=None):
            if logs and "gpu0_current_mib" in logs:
                self.seen.append(batch)

    model = keras.Sequential(
        [
            keras.Input((256,)),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 256)).astype("float32")
    y = rng.integers(0, 10, size=(4096,))
    logger = GPUMemoryLogger(every_n_batches=5, verbose=1)
    batches = BatchKeys()
    history = model.fit(x, y, batch_size=256, epochs=3, verbose=2, callbacks=[logger, batches])

    print("history keys:", sorted(history.history))
    for key in sorted(history.history):
        print(f"  {key}: {[round(v, 2) for v in history.history[key]]}")
    print("batch readings at batches:", batches.seen)

    nvml = NVMLSource()
    print(f"nvml devices={nvml.devices()} error={nvml.error}")
    for device in devices:
        reading = source.read(device)
        line = (
            f"{device}: allocator current={reading.current_bytes / MIB:.1f} MiB "
            f"peak={reading.peak_bytes / MIB:.1f} MiB "
            f"limit={None if reading.limit_bytes is None else reading.limit_bytes / MIB}"
        )
        try:
            card = nvml.read(source.physical_device(device))
            line += f" | nvml used={card.current_bytes / MIB:.1f} MiB"
            line += f" total={card.limit_bytes / MIB:.1f} MiB"
        except Exception as error:
            line += f" | nvml: {error}"
        limit = device_memory_limit(device)
        line += f" | device_memory_limit={None if limit is None else round(limit / MIB, 1)} MiB"
        print(line)
        print(f"  reset_peak supported: {source.reset_peak(device)}")
    print("summary:", logger.summary)
    print("tensorflow imported:", "tensorflow" in sys.modules)

    required = {"gpu0_current_mib", "gpu0_peak_mib", "host_rss_mib"}
    if devices:
        missing = required - set(history.history)
    else:
        missing = {"a GPU"}
    if missing:
        print("MISSING:", sorted(missing))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
