"""Memory probes: CUDA_VISIBLE_DEVICES mapping, NVML, host RSS, TensorFlow limits."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_parallel import memory
from keras_parallel._compat import IS_KERAS_3, backend_name
from keras_parallel.memory import (
    MIB,
    HostSource,
    MemoryReading,
    NVMLSource,
    device_memory_limit,
    map_visible_to_physical,
    parse_cuda_visible_devices,
)

UUIDS = [
    "GPU-aaaa1111-0000-0000-0000-000000000000",
    "GPU-bbbb2222-0000-0000-0000-000000000000",
    "GPU-cccc3333-0000-0000-0000-000000000000",
]


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", []),
        ("-1", []),
        ("0", [0]),
        ("2, 0", [2, 0]),
        ("1,-1,0", [1]),
        ("1,1,0", [1]),
        ("0,,1", [0]),
        ("GPU-bbbb2222,0", ["GPU-bbbb2222", 0]),
    ],
)
def test_parse_cuda_visible_devices(value, expected):
    assert parse_cuda_visible_devices(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, [0, 1, 2]),
        ("2,0", [2, 0]),
        ("5", []),  # no such card: CUDA sees nothing
        ("1,7,0", [1]),  # enumeration stops at the first bad entry
        ("GPU-cccc3333-0000-0000-0000-000000000000", [2]),
        ("GPU-bbbb", [1]),  # a unique prefix is enough
        ("bbbb2222,0", [1, 0]),
        ("GPU-0", []),  # matches no card
        ("MIG-1234-5678,2", [None, 2]),  # a MIG instance: no whole-card figures
    ],
)
def test_map_visible_to_physical(value, expected):
    assert map_visible_to_physical(parse_cuda_visible_devices(value), UUIDS) == expected


@given(st.permutations(list(range(8))).flatmap(lambda p: st.integers(0, 8).map(lambda n: p[:n])))
def test_index_lists_map_to_themselves(indices):
    value = ",".join(str(i) for i in indices)
    uuids = [f"GPU-{i:04d}" for i in range(8)]
    assert map_visible_to_physical(parse_cuda_visible_devices(value), uuids) == indices


def _fake_pynvml(used_by_index, total=16 * 2**30):
    module = types.SimpleNamespace()
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetCount = lambda: len(used_by_index)
    module.nvmlDeviceGetHandleByIndex = lambda i: i
    module.nvmlDeviceGetUUID = lambda handle: UUIDS[handle].encode()
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        used=used_by_index[handle], total=total, free=total - used_by_index[handle]
    )
    return module


def test_nvml_source_maps_framework_index_through_cuda_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([1 * MIB, 2 * MIB, 3 * MIB]))
    source = NVMLSource(cuda_visible_devices="2,GPU-aaaa")
    assert source.devices() == ["/device:GPU:0", "/device:GPU:1"]
    assert source.read("/gpu:0") == MemoryReading(3 * MIB, 3 * MIB, 16 * 2**30)
    assert source.read("GPU:1").current_bytes == 1 * MIB
    assert source.reset_peak("/gpu:0") is False
    with pytest.raises(ValueError, match="no whole-card figures"):
        source.read("/gpu:2")


def test_nvml_source_reads_the_environment(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([1 * MIB, 2 * MIB, 3 * MIB]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    source = NVMLSource()
    assert source.devices() == ["/device:GPU:0"]
    assert source.read("/gpu:0").current_bytes == 2 * MIB


def test_nvml_source_without_pynvml_or_driver_is_empty(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    source = NVMLSource()
    assert source.devices() == []
    assert "pynvml" in source.error
    broken = _fake_pynvml([0])

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert NVMLSource().devices() == []


def test_host_source_reads_rss():
    import psutil

    reading = HostSource().read("host")
    assert reading.current_bytes == reading.peak_bytes
    assert abs(reading.current_bytes - psutil.Process().memory_info().rss) < 256 * MIB
    assert reading.limit_bytes is None


def test_default_source_on_cpu_has_no_devices_and_cpu_read_raises(monkeypatch):
    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    source = memory.default_source()
    assert source.devices() == []
    if backend_name() == "tensorflow":
        # Without TF_CPU_ALLOCATOR_USE_BFC the CPU has no figures keras_parallel
        # uses, whether oneDNN is on (partial figures) or off (none).
        with pytest.raises(ValueError, match="TF_CPU_ALLOCATOR_USE_BFC=true"):
            source.read("/cpu:0")
        assert source.reset_peak("/cpu:0") is False
        assert source.allocator("/cpu:2") == source.allocator("CPU:0") == "/device:CPU:0"
        assert source.allocator("/gpu:1") == "/device:GPU:1"


def _cpu_figures_without_bfc():
    """TensorFlow's own answer for the CPU, and TensorFlowSource's, after a 64 MiB block."""
    import tensorflow as tf

    from keras_parallel._backend.tensorflow.memory import TensorFlowSource

    block = tf.ones([16 * 2**20])  # oneDNN's allocator counts a block this large
    float(tf.reduce_sum(block))
    try:
        raw = tf.config.experimental.get_memory_info("CPU:0")
    except ValueError as error:
        raw = str(error)
    source = TensorFlowSource()
    try:
        source.read("/cpu:0")
        read = "no error"
    except ValueError as error:
        read = str(error)
    return {"raw": raw, "read": read, "reset": source.reset_peak("/cpu:0")}


_NO_BFC_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
from test_memory import _cpu_figures_without_bfc
print("RESULT" + json.dumps(_cpu_figures_without_bfc()))
"""


@pytest.mark.slow
@pytest.mark.skipif(backend_name() != "tensorflow", reason="TensorFlow's CPU allocator")
@pytest.mark.skipif(
    not IS_KERAS_3,
    reason="the Keras 3 flavour runs it: oneDNN on there, off in a subprocess (no Keras used)",
)
def test_cpu_read_raises_without_bfc_with_onednn_on_and_off(monkeypatch):
    """TensorFlow raises with oneDNN off and reports partial figures with it on: we raise in both.

    This process runs in one of the two worlds; a subprocess runs the other. Neither
    uses Keras, so one TensorFlow flavour (Keras 3) runs it for both.
    """
    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    here = _cpu_figures_without_bfc()
    other_onednn = "1" if isinstance(here["raw"], str) else "0"
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=other_onednn, TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", _NO_BFC_SCRIPT, root, os.path.join(root, "tests")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [s for s in done.stdout.splitlines() if s.startswith("RESULT")][-1]
    there = json.loads(line[len("RESULT") :])
    # The two worlds differ in TensorFlow (one raises, one answers) ...
    assert isinstance(here["raw"], str) != isinstance(there["raw"], str), (here, there)
    # ... and not for the user.
    for result in (here, there):
        assert "TF_CPU_ALLOCATOR_USE_BFC=true" in result["read"], result
        assert result["reset"] is False, result


@pytest.mark.skipif(backend_name() != "tensorflow", reason="TensorFlow's CPU allocator")
@pytest.mark.parametrize(
    "value, is_bfc",
    [("true", True), ("1", True), ("TRUE", True), ("false", False), ("yes", False), (None, False)],
)
def test_cpu_allocator_is_bfc_reads_the_variable_as_tensorflow_does(monkeypatch, value, is_bfc):
    from keras_parallel._backend.tensorflow import memory as tf_memory

    if value is None:
        monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    else:
        monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", value)
    assert tf_memory.cpu_allocator_is_bfc() is is_bfc


def test_device_memory_limit_is_none_on_cpu_and_missing_gpu():
    assert device_memory_limit("/cpu:0") is None
    assert device_memory_limit("/gpu:0") is None
    with pytest.raises(ValueError):
        device_memory_limit("not a device")


@pytest.mark.skipif(backend_name() != "tensorflow", reason="TensorFlow layout")
def test_tensorflow_logical_limits_and_physical_mapping(monkeypatch):
    import tensorflow as tf

    from keras_parallel._backend.tensorflow import memory as tf_memory

    gpus = ["physical0", "physical1"]
    configs = {
        "physical0": [
            tf.config.LogicalDeviceConfiguration(memory_limit=1024),
            tf.config.LogicalDeviceConfiguration(memory_limit=2048),
        ],
        "physical1": None,
    }
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus)
    monkeypatch.setattr(tf.config, "get_logical_device_configuration", configs.get)
    monkeypatch.setattr(tf_memory, "nvml_total_bytes", lambda index: 24 * 2**30 + index)
    assert tf_memory.logical_gpu_layout() == [(0, 1024 * MIB), (0, 2048 * MIB), (1, None)]
    assert device_memory_limit("/gpu:0") == 1024 * MIB
    assert device_memory_limit("GPU:1") == 2048 * MIB
    assert device_memory_limit("/gpu:2") == 24 * 2**30 + 1  # card total of physical GPU 1
    assert device_memory_limit("/gpu:3") is None
    source = tf_memory.TensorFlowSource()
    assert source.physical_device("/gpu:1") == "/device:GPU:0"
    assert source.physical_device("/gpu:2") == "/device:GPU:1"


@pytest.mark.parametrize(
    "path", ["keras_parallel/memory.py", "keras_parallel/callbacks/gpu_memory_logger.py"]
)
def test_backend_libraries_are_imported_lazily(path):
    """Importing these modules must not import TensorFlow, JAX, torch or pynvml.

    Under ``KERAS_BACKEND=jax`` or ``torch`` TensorFlow may not be installed.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, path)) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in tree.body:  # module level only; imports inside functions are lazy
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    heavy = ("tensorflow", "jax", "torch", "pynvml", "keras_parallel._backend.tensorflow")
    assert not [name for name in imported if name.startswith(heavy)]
