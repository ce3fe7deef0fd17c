"""keras_parallel._validation: one check per kind of argument, and the messages they give."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_parallel import _validation as v
from keras_parallel.memory import MemorySource
from keras_parallel.probes import DeviceProbe

MESSAGE = r"^Invalid value for argument `{name}`\. Expected .+\. Received: {name}="

not_numbers = st.one_of(
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.just(object()),
)


def rejects(call, name):
    with pytest.raises(ValueError, match=MESSAGE.format(name=re.escape(name))):
        call()


# -- integers --------------------------------------------------------------------


@given(value=st.integers(1, 2**63 - 1))
def test_positive_int_accepts_every_int_from_1_as_a_python_int(value):
    assert v.validate_positive_int(value, "n") == value
    converted = v.validate_positive_int(np.int64(value), "n")
    assert converted == value and type(converted) is int


@given(value=st.one_of(st.integers(max_value=0), st.floats(), not_numbers))
def test_positive_int_rejects_the_rest_bools_and_floats_included(value):
    if value is None:
        assert v.validate_positive_int(value, "n", allow_none=True) is None
    rejects(lambda: v.validate_positive_int(value, "n"), "n")


@given(value=st.integers(0, 2**40))
def test_non_negative_int_takes_zero(value):
    assert v.validate_non_negative_int(value, "rows") == value


@given(value=st.one_of(st.integers(max_value=-1), st.floats(), not_numbers))
def test_non_negative_int_rejects_the_rest(value):
    rejects(lambda: v.validate_non_negative_int(value, "rows"), "rows")


# -- real numbers ----------------------------------------------------------------


@given(value=st.floats(min_value=0, max_value=1, exclude_min=True))
def test_fraction_accepts_every_share_of_a_whole(value):
    assert v.validate_fraction(value, "margin") == value


@given(
    value=st.one_of(
        st.floats().filter(lambda x: not 0 < x <= 1),  # NaN and infinities included
        st.integers().filter(lambda x: x != 1),
        not_numbers,
    )
)
def test_fraction_rejects_the_rest_true_included(value):
    if value is None:
        assert v.validate_fraction(value, "margin", allow_none=True) is None
    rejects(lambda: v.validate_fraction(value, "margin"), "margin")


@given(value=st.one_of(st.integers(1, 2**64), st.floats(min_value=1e-300, max_value=1e300)))
def test_positive_number_accepts_finite_positive_numbers_unchanged(value):
    assert v.validate_positive_number(value, "memory_budget") == value


@given(
    value=st.one_of(
        st.floats().filter(lambda x: not (math.isfinite(x) and x > 0)),
        st.integers(max_value=0),
        not_numbers,
    )
)
def test_positive_number_rejects_the_rest(value):
    rejects(lambda: v.validate_positive_number(value, "memory_budget"), "memory_budget")


# -- micro-batch sizes and ratios --------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 2.5, 4.0, "big", True, None, [4]])
def test_micro_batch_size_says_auto_is_allowed(value):
    with pytest.raises(ValueError, match='Expected a positive int or "auto"'):
        v.validate_micro_batch_size(value)


def test_micro_batch_size_values():
    assert v.validate_micro_batch_size("auto") == "auto"
    assert v.validate_micro_batch_size(np.int32(8)) == 8
    assert v.validate_micro_batch_size(None, allow_none=True) is None
    with pytest.raises(ValueError, match='Expected None, a positive int or "auto"'):
        v.validate_micro_batch_size("big", allow_none=True)


@pytest.mark.parametrize(
    "ratios",
    [np.array([12, 6]), [np.int64(2), np.int64(1)], [np.float32(0.5), np.float32(0.25)]],
    ids=["array", "int64", "float32"],
)
def test_ratios_computed_with_numpy_are_numbers(ratios):
    values = v.validate_ratios(ratios, argument="split")
    assert values == [2 * values[1], values[1]] and all(type(x) is float for x in values)


@pytest.mark.parametrize(
    "ratios, fault",
    [
        ([2, 0], "entry 1, 0 is not positive and finite"),
        ([np.True_, 1], f"entry 0, {np.True_!r} is not a number"),  # numpy 1: True
        (np.ones((2, 2)), "of shape (2, 2)"),
    ],
)
def test_ratios_name_the_entry_at_fault(ratios, fault):
    with pytest.raises(ValueError, match="argument `split`") as error:
        v.validate_ratios(ratios, argument="split")
    assert fault in str(error.value)


@given(ratios=st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=8))
def test_ratios_accept_positive_finite_numbers(ratios):
    assert v.validate_ratios(ratios) == ratios
    assert v.validate_ratios(tuple(int(r) + 1 for r in ratios)) == [int(r) + 1 for r in ratios]


@given(
    good=st.lists(st.integers(1, 9), max_size=3),
    bad=st.one_of(
        st.floats().filter(lambda x: not (math.isfinite(x) and x > 0)),
        st.integers(max_value=0),
        st.booleans(),
        st.text(max_size=3),
    ),
)
def test_ratios_reject_a_bad_entry_naming_the_argument(good, bad):
    with pytest.raises(ValueError, match=MESSAGE.format(name="split")):
        v.validate_ratios([*good, bad], argument="split")


@pytest.mark.parametrize("value", [[], (), "2,1", None, 3])
def test_ratios_reject_what_is_not_a_non_empty_sequence(value):
    with pytest.raises(ValueError, match="Expected a non-empty sequence of positive, finite"):
        v.validate_ratios(value)


# -- devices, choices, objects -------------------------------------------------------


def test_devices_are_canonical_and_distinct():
    assert v.validate_devices(["/gpu:0", "GPU:1", "cpu"]) == [
        "/device:GPU:0",
        "/device:GPU:1",
        "/device:CPU:0",
    ]
    assert v.validate_devices("/gpu:1") == ["/device:GPU:1"]
    assert v.validate_devices(None, allow_none=True) is None
    assert v.validate_devices([], allow_empty=True) == []
    with pytest.raises(ValueError, match="`devices`. Each device may appear once"):
        v.validate_devices(["/gpu:0", "GPU:0"])
    with pytest.raises(ValueError, match="`devices`. Expected at least one device"):
        v.validate_devices([])
    with pytest.raises(ValueError, match=r"`devices`. Invalid device name.*'nonsense!'"):
        v.validate_devices(["nonsense!"])
    rejects(lambda: v.validate_devices(3), "devices")


def test_choice_callable_and_duck_typed_objects():
    assert v.validate_choice("Memory", "split", ("memory", "speed")) == "memory"
    with pytest.raises(ValueError, match="Expected one of 'memory', 'speed'"):
        v.validate_choice("fastest", "split", ("memory", "speed"))
    assert v.validate_callable(len, "memory_probe") is len
    rejects(lambda: v.validate_callable(3, "memory_probe"), "memory_probe")
    source = MemorySource()
    assert v.validate_memory_source(source, "source") is source
    assert v.validate_memory_source(True, "nvml", allow_bool=True) is True
    rejects(lambda: v.validate_memory_source(True, "source"), "source")
    rejects(lambda: v.validate_memory_source(object(), "source"), "source")
    probe = DeviceProbe()
    assert v.validate_device_probe(probe) is probe
    rejects(lambda: v.validate_device_probe(object()), "probe")


@pytest.mark.parametrize("field", ["speed_batch_size", "speed_repeats"])
@pytest.mark.parametrize("value", [0, True, 2.0])
def test_device_probe_checks_its_arguments(field, value):
    rejects(lambda: DeviceProbe(**{field: value}), field)
