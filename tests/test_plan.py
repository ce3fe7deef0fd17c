"""plan(): arithmetic properties (Hypothesis), injected memory figures, DataParallel models."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import keras_parallel
from keras_parallel import DataParallel, plan
from keras_parallel._compat import keras
from keras_parallel.probes import DeviceProbe

MIB = 2**20
CPU2 = ["/cpu:0", "/cpu:1"]
CPU3 = ["/cpu:0", "/cpu:1", "/cpu:2"]

_MODEL = {}


def small_model():
    if "m" not in _MODEL:
        inputs = keras.Input((4,))
        _MODEL["m"] = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    return _MODEL["m"]


class Limits(DeviceProbe):
    def __init__(self, limits):
        super().__init__()
        self.limits = limits

    def memory_limit(self, device):
        return self.limits.get(device)


@pytest.fixture(autouse=True)
def _clear_session():  # keep the shared model alive across examples
    yield


@given(
    batch=st.integers(1, 512),
    devices=st.sampled_from([CPU2, CPU3]),
    ratios_seed=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    micro=st.one_of(st.none(), st.integers(1, 64)),
)
def test_rows_and_steps_cover_the_batch(batch, devices, ratios_seed, micro):
    ratios = ratios_seed[: len(devices)]
    result = plan(small_model(), batch, devices=devices, split=ratios, micro_batch_size=micro)
    n = len(devices)
    if micro is None:
        assert result.accumulation_steps == 1
        assert sum(result.rows_per_device) == batch
    else:
        assert result.accumulation_steps == math.ceil(batch / (n * micro))
        assert result.accumulation_steps * result.rows_per_step >= batch
        assert sum(result.rows_per_device) == result.rows_per_step == min(batch, n * micro)
    assert result.rows_per_device == keras_parallel.slice_sizes(result.rows_per_step, ratios)


@given(
    batch=st.integers(1, 256),
    intercept_mib=st.integers(0, 200),
    per_row_mib=st.integers(1, 50),
    limits_mib=st.lists(st.integers(300, 4000), min_size=2, max_size=2),
    ratios=st.lists(st.integers(1, 4), min_size=2, max_size=2),
)
def test_auto_never_exceeds_a_device_budget(batch, intercept_mib, per_row_mib, limits_mib, ratios):
    probe = Limits({f"/device:CPU:{i}": v * MIB for i, v in enumerate(limits_mib)})
    result = plan(
        small_model(),
        batch,
        devices=CPU2,
        split=ratios,
        micro_batch_size="auto",
        memory_probe=lambda rows: (intercept_mib + per_row_mib * rows) * MIB,
        probe=probe,
        memory_margin=0.8,
    )
    assert result.accumulation_steps * result.rows_per_step >= batch
    for rows, peak, limit in zip(
        result.rows_per_device, result.peak_bytes, result.limit_bytes, strict=True
    ):
        if rows:  # the fitted line is exact, or (one probe size) through the origin: higher
            assert peak >= (intercept_mib + per_row_mib * rows) * MIB * (1 - 1e-6)
        if result.micro_batch_size > 1:
            assert peak <= 0.8 * limit * (1 + 1e-9)
    assert result.fits is (
        all(p <= 0.8 * lim for p, lim in zip(result.peak_bytes, result.limit_bytes, strict=True))
    )


def test_unequal_devices_get_unequal_micro_rows():
    probe = Limits({"/device:CPU:0": 1200 * MIB, "/device:CPU:1": 600 * MIB})
    result = plan(
        small_model(),
        32,
        devices=CPU2,
        split="memory",
        micro_batch_size="auto",
        memory_probe=lambda rows: (40 + 20 * rows) * MIB,
        probe=probe,
    )
    assert result.ratios == [2.0, 1.0]
    # device 1 fits (480 - 40) / 20 = 22 rows, device 0 46: 32 rows go 22 + 10.
    assert result.rows_per_device == [22, 10]
    assert result.accumulation_steps == 1 and result.fits is True
    text = str(result)
    assert "/device:CPU:0" in text and "fits" in text
    # The first line says what the table shows, not "micro-batch 16 per device".
    assert text.splitlines()[0] == (
        "Plan for batch 32 on 2 device(s): 1 step of 32 rows, split 22 + 10 (no accumulation)"
    )
    assert "16 per device" not in text


def table_rows(text):
    return [int(line.split()[2]) for line in text.splitlines() if line.startswith("/device:")]


@given(
    batch=st.integers(1, 300),
    devices=st.sampled_from([CPU2, CPU3]),
    ratios_seed=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    micro=st.one_of(st.none(), st.integers(1, 40)),
)
def test_first_line_says_what_the_table_shows(batch, devices, ratios_seed, micro):
    ratios = ratios_seed[: len(devices)]
    result = plan(
        small_model(),
        batch,
        devices=devices,
        split=ratios,
        micro_batch_size=micro,
        memory_probe=lambda rows: None,
    )
    text = str(result)
    first = text.splitlines()[0]
    split = [int(r) for r in re.search(r"split ([\d +]+)", first).group(1).split(" + ")]
    assert split == table_rows(text) == result.rows_per_device
    steps = re.search(r": (\d+) (?:accumulation )?steps? of (\d+) rows", first)
    assert int(steps.group(1)) == result.accumulation_steps
    assert int(steps.group(2)) == result.rows_per_step == sum(split)
    last = re.search(r"the last of (\d+)", first)
    rest = batch - (result.accumulation_steps - 1) * result.rows_per_step
    assert (int(last.group(1)) if last else result.rows_per_step) == rest
    assert "per device" not in first


MIB_PEAKS = {1: 1, 2: 4, 4: 12}  # MiB at 1, 2, 4 rows: the least-squares line is -3 + 3.71 m


def test_a_negative_fitted_intercept_is_taken_as_zero_and_said():
    result = plan(
        small_model(),
        32,  # 16 rows per device: peaks measured at 1, 2 and 4 rows
        devices=CPU2,
        memory_probe=lambda rows: MIB_PEAKS[rows] * MIB,
        memory_budget=1000 * MIB,
    )
    note = next(n for n in result.notes if n.startswith("peak memory measured"))
    assert "at 1, 2, 4 rows: 1.0, 4.0, 12.0 MiB" in note
    assert "line: 0.0 MiB + 3.71 MiB per row" in note
    assert "-3.0 MiB, was below zero" in note
    assert not re.search(r"line: -", note)
    slope = 156 / 42 * MIB
    assert result.peak_bytes == [int(slope * 16)] * 2  # above the fitted line's -3 + 16 b


def test_kept_whole_says_only_the_reason_that_applies():
    measured = plan(
        small_model(),
        32,
        devices=CPU2,
        micro_batch_size="auto",
        memory_probe=lambda rows: (10 + rows) * MIB,
    )
    [note] = [n for n in measured.notes if "keeps the batch whole" in n]
    assert note == (
        "'auto' keeps the batch whole: no memory limit for /device:CPU:0, /device:CPU:1 "
        "(`memory_budget` sets one)"
    )
    limited = plan(
        small_model(),
        32,
        devices=CPU2,
        micro_batch_size="auto",
        memory_probe=lambda rows: None,
        memory_budget=100 * MIB,
    )
    [note] = [n for n in limited.notes if "keeps the batch whole" in n]
    assert note == "'auto' keeps the batch whole: no measured peaks"
    neither = plan(
        small_model(), 32, devices=CPU2, micro_batch_size="auto", memory_probe=lambda rows: 0
    )
    [note] = [n for n in neither.notes if "keeps the batch whole" in n]
    assert "no memory limit" in note and "no measured peaks" in note


def test_no_figures_keeps_the_batch_whole_and_says_so():
    result = plan(small_model(), 32, devices=CPU2, micro_batch_size="auto")
    assert result.fits is None and result.accumulation_steps == 1
    assert any("keeps the batch whole" in note for note in result.notes)


def test_plan_of_a_data_parallel_model_uses_its_devices():
    parallel = DataParallel(small_model(), devices=CPU3, split=[3, 2, 1])
    result = plan(parallel, 12)
    assert result.devices == ["/device:CPU:0", "/device:CPU:1", "/device:CPU:2"]
    assert result.rows_per_device == [6, 4, 2]
    with pytest.raises(ValueError, match="brings its own devices"):
        plan(parallel, 12, devices=CPU2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "`batch_size`"),
        ({"batch_size": 8, "micro_batch_size": 0}, "`micro_batch_size`"),
        ({"batch_size": 8, "micro_batch_size": "big"}, "`micro_batch_size`"),
        ({"batch_size": 8, "memory_margin": 1.5}, "`memory_margin`"),
        ({"batch_size": 8, "memory_margin": True}, "`memory_margin`"),
        ({"batch_size": True}, "`batch_size`"),
        ({"batch_size": 8, "micro_batch_size": True}, "`micro_batch_size`"),
        ({"batch_size": 8, "memory_budget": -1}, "`memory_budget`"),
        ({"batch_size": 8, "memory_budget": True}, "`memory_budget`"),
        ({"batch_size": 8, "memory_probe": 3}, "`memory_probe`"),
        ({"batch_size": 8, "probe": object()}, "`probe`"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(small_model(), devices=CPU2, **kwargs)
