"""Properties of the micro-batch arithmetic in keras_parallel.accumulation_plan."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_parallel import accumulation_plan as plan
from keras_parallel.accumulation_plan import refine_micro_batch_size

sizes = st.integers(min_value=1, max_value=4096)


@given(batch=st.integers(0, 4096), micro=sizes, replicas=st.integers(1, 16))
def test_accumulation_steps_cover_the_batch_with_no_spare_step(batch, micro, replicas):
    steps = plan.accumulation_steps(batch, micro, replicas)
    rows = replicas * micro
    assert steps * rows >= batch
    assert (steps - 1) * rows < batch or steps == 0


def test_accumulation_steps_examples():
    # The issue's formula: n devices of micro_batch_size each.
    assert plan.accumulation_steps(32, 8) == 4
    assert plan.accumulation_steps(32, 8, num_replicas=2) == 2
    assert plan.accumulation_steps(33, 8, num_replicas=2) == 3
    assert plan.accumulation_steps(32, 64) == 1


@given(batch=st.integers(0, 4096), rows=sizes)
def test_micro_batch_sizes_partition_the_batch(batch, rows):
    parts = plan.micro_batch_sizes(batch, rows)
    assert sum(parts) == batch
    assert all(0 < p <= rows for p in parts)
    assert all(p == rows for p in parts[:-1])
    assert len(parts) == plan.accumulation_steps(batch, rows)
    if batch:
        assert sum(p / batch for p in parts) == pytest.approx(1.0)


@given(
    intercept=st.integers(0, 2**34),
    slope=st.integers(1, 2**26),
    ms=st.lists(st.integers(1, 512), min_size=2, max_size=5, unique=True),
)
def test_fit_peak_line_recovers_an_exact_line(intercept, slope, ms):
    a, b = plan.fit_peak_line([(m, intercept + slope * m) for m in ms])
    assert b == pytest.approx(slope, rel=1e-6)
    assert a == pytest.approx(intercept, rel=1e-6, abs=slope * 1e-3 + 1)


@given(
    points=st.lists(st.tuples(st.integers(1, 512), st.integers(0, 2**34)), min_size=1, max_size=6)
)
def test_fit_peak_line_never_has_a_negative_intercept_nor_drops_below_least_squares(points):
    a, b = plan.fit_peak_line(points)
    a_ls, b_ls = plan.least_squares_line(points)
    assert a >= 0 and b == b_ls
    assert a == max(0.0, a_ls)
    for m in (0, 1, 16, 4096):  # the planner's line is never below the fitted one
        assert a + b * m >= a_ls + b_ls * m


def test_fit_peak_line_clamps_the_issue_example():
    mib = 2**20
    points = [(1, 0 * mib), (2, 4 * mib), (4, 12 * mib)]
    assert plan.least_squares_line(points) == (pytest.approx(-4 * mib), pytest.approx(4 * mib))
    assert plan.fit_peak_line(points) == (0.0, pytest.approx(4 * mib))


def test_fit_peak_line_with_one_size_goes_through_the_origin():
    assert plan.fit_peak_line([(4, 400.0), (4, 404.0)]) == (0.0, pytest.approx(100.5))
    with pytest.raises(ValueError, match="points"):
        plan.fit_peak_line([])
    with pytest.raises(ValueError, match="points"):
        plan.fit_peak_line([(0, 1.0)])


@given(
    intercept=st.integers(0, 2**30),
    slope=st.integers(1, 2**24),
    limit=st.integers(1, 2**36),
    margin=st.floats(0.05, 1.0),
    max_size=st.integers(1, 10_000),
)
def test_largest_fitting_micro_batch_is_largest_that_fits(
    intercept, slope, limit, margin, max_size
):
    m = plan.largest_fitting_micro_batch(intercept, slope, limit, margin, max_size)
    assert 1 <= m <= max_size
    budget = margin * limit * (1 + 1e-9)  # the planner's float tolerance
    if m > 1:
        assert intercept + slope * m <= budget  # the chosen size fits
    if m < max_size:
        assert intercept + slope * (m + 1) > budget  # one more row would not


@given(
    intercept=st.integers(0, 2**30),
    slope=st.integers(1, 2**24),
    limits=st.tuples(st.integers(1, 2**36), st.integers(1, 2**36)),
    batch=st.integers(1, 4096),
)
def test_plan_grows_with_the_limit_and_stays_in_the_batch(intercept, slope, limits, batch):
    points = [(m, intercept + slope * m) for m in plan.probe_sizes(batch)]
    small, large = sorted(limits)
    m_small = plan.plan_micro_batch_size(points, small, batch)
    m_large = plan.plan_micro_batch_size(points, large, batch)
    assert 1 <= m_small <= m_large <= batch


def test_plan_example_with_margin():
    # peak = 1000 + 100 m, limit 2000, 80 % of it: m = (1600 - 1000) / 100 = 6.
    points = [(1, 1100), (2, 1200), (4, 1400)]
    assert plan.plan_micro_batch_size(points, 2000, batch_size=32, margin=0.8) == 6
    assert plan.plan_micro_batch_size(points, 2000, batch_size=4, margin=0.8) == 4
    assert plan.plan_micro_batch_size(points, 100, batch_size=32) == 1
    # Memory that does not grow fits the whole batch.
    assert plan.plan_micro_batch_size([(1, 5), (2, 5)], 10, batch_size=32) == 32


@given(batch=sizes)
def test_probe_sizes_are_small_and_in_the_batch(batch):
    probes = plan.probe_sizes(batch)
    assert probes == sorted(set(probes))
    assert all(1 <= m <= max(1, batch // 4) for m in probes)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: plan.accumulation_steps(8, 0), "micro_batch_size"),
        (lambda: plan.accumulation_steps(-1, 2), "batch_size"),
        (lambda: plan.accumulation_steps(8, 2, 0), "num_replicas"),
        (lambda: plan.micro_batch_sizes(8, 2.5), "rows_per_step"),
        (lambda: plan.largest_fitting_micro_batch(0, 1, 10, margin=0), "margin"),
        (lambda: plan.largest_fitting_micro_batch(0, 1, 10, margin=True), "margin"),
        (lambda: plan.accumulation_steps(8, True), "micro_batch_size"),
        (lambda: plan.accumulation_steps(True, 2), "batch_size"),
        (lambda: plan.probe_sizes(0), "batch_size"),
    ],
)
def test_invalid_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call()


@given(
    peaks=st.lists(st.integers(1, 10_000), min_size=1, max_size=40),
    estimate=st.integers(1, 60),
    budget=st.integers(0, 300_000),
)
def test_refine_finds_the_largest_size_that_fits_a_growing_peak(peaks, estimate, budget):
    cumulative = list(itertools.accumulate(peaks))  # growing with the size
    max_size = len(cumulative)

    def peak(size):
        assert 1 <= size <= max_size, size  # never asks outside [1, max_size]
        return cumulative[size - 1]

    fitting = [m for m in range(1, max_size + 1) if cumulative[m - 1] <= budget]
    expected = max(fitting) if fitting else 1
    assert refine_micro_batch_size(peak, estimate, budget, max_size) == expected
