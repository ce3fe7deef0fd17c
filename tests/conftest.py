"""Test set-up shared by every test module.

- The CPU is split into 3 logical devices once per test process, before anything
  touches TensorFlow's devices, so multi-device tests run without GPUs.
- Hypothesis profiles: "ci" (derandomized, no deadline, modest example count) is
  loaded when CI is set or HYPOTHESIS_PROFILE=ci; "dev" otherwise.
- Tests marked `gpu` / `multi_gpu` are skipped without one / two GPUs.
- With Keras 3 on JAX or torch (`KERAS_BACKEND`), only the backend-neutral test
  modules (`BACKEND_NEUTRAL`) are collected, TensorFlow is not imported, and
  JAX gets 3 host devices (`XLA_FLAGS`, set before JAX starts).
- After each test's set-up, the objects alive are frozen out of Python's garbage
  collector (`gc.freeze`), so its full collections walk only what the running test made.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

NUM_LOGICAL_CPUS = 3

_LEGACY = os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true")
BACKEND = "tensorflow" if _LEGACY else os.environ.get("KERAS_BACKEND", "tensorflow")

#: The test modules that use no TensorFlow of their own: they run on every backend.
BACKEND_NEUTRAL = {
    "test_accumulation_backends.py",
    "test_backend_probes.py",
    "test_backends.py",
    "test_batch_norm.py",
    "test_layout.py",
    "test_multi_worker_jax.py",
    "test_own_steps.py",
    "test_resume.py",
    "test_versions.py",
}

if BACKEND == "tensorflow":
    import tensorflow as tf

    _cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
        )
    except RuntimeError:  # already initialized by an earlier import in this process
        pass
else:
    if BACKEND == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            flags += f" --xla_force_host_platform_device_count={NUM_LOGICAL_CPUS}"
        if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
            # The host devices' all-reduce aborts the process when one device's
            # thread is 40 s late (XLA's default): on a busy 2-core CI machine it can be.
            # (jaxlib 0.8 and later; earlier ones abort on a flag they do not know.)
            from keras_parallel._backend.jax.devices import collective_timeout_flag

            flags += " " + collective_timeout_flag()
        os.environ["XLA_FLAGS"] = flags.strip()


#: Only the backend-neutral modules, on TensorFlow too: `tests/run_flavours.py
#: --neutral`, as CI runs the floor versions (KERAS_PARALLEL_NEUTRAL_ONLY=1).
NEUTRAL_ONLY = BACKEND != "tensorflow" or os.environ.get("KERAS_PARALLEL_NEUTRAL_ONLY") == "1"


def pytest_ignore_collect(collection_path, config):
    if not NEUTRAL_ONLY:
        return None
    name = collection_path.name
    if name.startswith("test_") and name.endswith(".py"):
        return name not in BACKEND_NEUTRAL
    return None


@pytest.fixture
def jax_data_parallel_distribution():
    """`keras.distribution.DataParallel()` over this process's 3 host devices (JAX)."""
    if BACKEND != "jax":
        pytest.skip("keras.distribution lays out a jitted step: JAX")
    import keras

    distribution = keras.distribution.DataParallel()
    if len(distribution.device_mesh.devices.flat) != NUM_LOGICAL_CPUS:
        pytest.skip(f"needs JAX's {NUM_LOGICAL_CPUS} host devices")
    keras.distribution.set_distribution(distribution)
    try:
        yield distribution
    finally:
        keras.distribution.set_distribution(None)


settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def _num_gpus() -> int:
    from keras_parallel.devices import list_devices

    return len([d for d in list_devices() if ":GPU:" in d])


def pytest_collection_modifyitems(config, items):
    gpus = _num_gpus()
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more GPUs")
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(skip_gpu)
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def cpu_devices():
    """Names of the logical CPU devices: ["/cpu:0", "/cpu:1", "/cpu:2"]."""
    return [f"/cpu:{i}" for i in range(NUM_LOGICAL_CPUS)]


@pytest.fixture(autouse=True)
def _clear_session():
    from keras_parallel._compat import keras

    keras.backend.clear_session()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """Freezes the objects alive once a test is set up, out of the garbage collector's view.

    Keras 3's `clear_session` (above) runs a full garbage collection before every
    test, and Python runs more as objects pile up; each walks every tracked object:
    TensorFlow's and Keras's, and what earlier tests left in their caches, over a
    million by the end. On a 2-core machine that was 0.8 s a test, 5.5 of the Keras 3
    flavour's 14 minutes. Frozen, they are no longer walked. The collection here
    first (cheap: only what the last test made is walked) frees the last test's
    cycles, which tf-keras's `clear_session` leaves; what is frozen is what is still
    reachable. Frozen objects are still freed when their last reference goes; only a
    cycle among them orphaned later (a module-scoped fixture's model) is never
    collected: memory kept until the process ends, no test result changed.
    """
    yield
    gc.collect()
    gc.freeze()
