"""Every argument check of keras_parallel, one function per kind of argument.

As Keras's ``utils/argument_validation.py``: each function takes the value and
the argument's name, returns the value in its normal form (an `int` for
numpy integers, canonical device names, ...), and otherwise raises a
`ValueError` that reads "Invalid value for argument `name`. Expected ...
Received: name=...".

`bool` is never taken for a number: `True` is refused where an int or a
float is expected, as a typo that Python would otherwise count as 1.

Pure Python, no framework import of its own, so any module may use it. Device names
are made canonical by `keras_parallel._backend.common.devices.canonical_device_name`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

from keras_parallel._backend.common.devices import canonical_device_name

__all__ = [
    "canonical_device_name",
    "validate_callable",
    "validate_choice",
    "validate_device_probe",
    "validate_devices",
    "validate_fraction",
    "validate_memory_source",
    "validate_micro_batch_size",
    "validate_non_negative_int",
    "validate_positive_int",
    "validate_positive_number",
    "validate_ratios",
    "validate_batch_norm",
]


def _invalid(name: str, expected: str, value) -> ValueError:
    return ValueError(
        f"Invalid value for argument `{name}`. Expected {expected}. Received: {name}={value!r}"
    )


def _is_bool(value) -> bool:
    """Python's and numpy's bools (`np.bool_` is no `bool`)."""
    return isinstance(value, bool) or type(value).__name__ in ("bool_", "bool")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_positive_int(value, name: str, *, allow_none: bool = False) -> int | None:
    """Checks an int >= 1 (numpy's too); returns it as a Python int.

    Args:
        value: the argument.
        name: str. The argument's name, for the message.
        allow_none: bool. Whether None is accepted (and returned). Defaults to False.

    Raises:
        ValueError: for anything else, a bool included.
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        raise _invalid(name, "a positive int" + (" or None" if allow_none else ""), value)
    return int(value)


def validate_non_negative_int(value, name: str) -> int:
    """Checks an int >= 0 (numpy's too); returns it as a Python int.

    Raises:
        ValueError: for anything else, a bool included.
    """
    if not _is_int(value) or value < 0:
        raise _invalid(name, "a non-negative int", value)
    return int(value)


def validate_positive_number(value, name: str, *, allow_none: bool = False):
    """Checks a finite real number > 0 (a byte count, a duration); returns it unchanged.

    Raises:
        ValueError: for anything else (a bool, NaN, infinity, a string) or, without
            `allow_none`, None.
    """
    if value is None and allow_none:
        return None
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise _invalid(name, "a positive number" + (" or None" if allow_none else ""), value)
    return value


def validate_fraction(value, name: str, *, allow_none: bool = False) -> float | None:
    """Checks a share of a whole: a number in (0, 1]; returns it as a float.

    Used for margins and thresholds (`memory_margin`, `headroom_threshold`).

    Raises:
        ValueError: for anything else (a bool, NaN, 0, a number above 1, a string)
            or, without `allow_none`, None.
    """
    if value is None and allow_none:
        return None
    if not _is_real(value) or not 0 < value <= 1:
        raise _invalid(name, "a number in (0, 1]" + (" or None" if allow_none else ""), value)
    return float(value)


def validate_micro_batch_size(value, *, allow_none: bool = False, name: str = "micro_batch_size"):
    """Checks a micro-batch size: a positive int or ``"auto"`` (or None).

    Returns:
        The value, with integers (numpy's too) as a Python int.

    Raises:
        ValueError: naming the argument, what was expected and what came.
    """
    if (isinstance(value, str) and value == "auto") or (allow_none and value is None):
        return value
    if not _is_int(value) or value < 1:
        expected = 'None, a positive int or "auto"' if allow_none else 'a positive int or "auto"'
        raise _invalid(name, expected, value)
    return int(value)


def validate_ratios(ratios, argument: str = "ratios") -> list[float]:
    """Checks a sequence of slice ratios; returns them as floats.

    Any real number is a ratio: Python's, numpy's scalars (`np.int64(2)`,
    `np.float32(0.5)`), and a 1-D array (numpy's, or any with `tolist()`) is a
    sequence of them. A bool is not a number here.

    Raises:
        ValueError: for anything but a non-empty sequence of positive, finite
            numbers. The message names `argument` and the entry at fault.
    """
    expected = (
        f"Invalid value for argument `{argument}`. Expected a non-empty sequence of "
        "positive, finite numbers (one per device)"
    )
    shape = getattr(ratios, "shape", None)
    if shape is not None and hasattr(ratios, "tolist") and not isinstance(ratios, Sequence):
        if len(shape) != 1:
            raise ValueError(
                f"{expected}. Received: {argument} of shape {tuple(shape)} (a 1-D array "
                "is a sequence of ratios)"
            )
        ratios = ratios.tolist()
    if isinstance(ratios, str | bytes) or not isinstance(ratios, Sequence):
        raise ValueError(f"{expected}. Received: {argument}={ratios!r}")
    values = []
    for index, value in enumerate(ratios):
        if _is_bool(value) or not isinstance(value, numbers.Real):
            why = f"{value!r} is not a number"
        elif not math.isfinite(float(value)) or value <= 0:
            why = f"{value!r} is not positive and finite"
        else:
            values.append(float(value))
            continue
        raise ValueError(f"{expected}. Received: {argument}={list(ratios)!r}: entry {index}, {why}")
    if not values:
        raise ValueError(f"{expected}. Received: {argument}=[]")
    return values


def validate_callable(
    value, name: str, *, expected: str = "a callable", allow_none: bool = False
) -> Callable | None:
    """Checks a callable (a probe, a hook); returns it unchanged.

    Args:
        expected: str. What the callable does, for the message, e.g.
            ``"a callable size -> peak bytes"``. Defaults to ``"a callable"``.

    Raises:
        ValueError: for anything that cannot be called or, without `allow_none`, None.
    """
    if value is None and allow_none:
        return None
    if not callable(value):
        raise _invalid(name, expected + (", or None" if allow_none else ""), value)
    return value


def validate_choice(value, name: str, choices: Iterable[str]) -> str:
    """Checks one of a few names, in any case; returns it in lower case.

    Raises:
        ValueError: for anything but one of `choices`; the message lists them.
    """
    choices = [c.lower() for c in choices]
    if not isinstance(value, str) or value.lower() not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise _invalid(name, f"one of {listed}", value)
    return value.lower()


BATCH_NORM_MODES = ("global", "per_slice")


def validate_batch_norm(value, name: str = "batch_norm") -> str:
    """Checks DataParallel's `batch_norm`: "global" or "per_slice" (exactly)."""
    if not isinstance(value, str) or value not in BATCH_NORM_MODES:
        raise _invalid(name, "'global' or 'per_slice'", value)
    return value


def validate_memory_source(value, name: str, *, allow_none: bool = False, allow_bool: bool = False):
    """Checks a `keras_parallel.memory.MemorySource`-like object (it has `read`).

    Args:
        allow_none: bool. Whether None is accepted. Defaults to False.
        allow_bool: bool. Whether True/False are accepted (an on/off switch in
            place of a source). Defaults to False.

    Raises:
        ValueError: for anything else.
    """
    if (value is None and allow_none) or (isinstance(value, bool) and allow_bool):
        return value
    if not callable(getattr(value, "read", None)):
        expected = "a keras_parallel.memory.MemorySource"
        if allow_bool:
            expected = "a bool or " + expected
        if allow_none:
            expected += " or None"
        raise _invalid(name, expected, value)
    return value


def validate_device_probe(value, name: str = "probe", *, allow_none: bool = False):
    """Checks a `keras_parallel.probes.DeviceProbe`-like object (it has `memory_limit`).

    Raises:
        ValueError: for anything else or, without `allow_none`, None.
    """
    if value is None and allow_none:
        return None
    if not callable(getattr(value, "memory_limit", None)):
        expected = "a keras_parallel.probes.DeviceProbe" + (" or None" if allow_none else "")
        raise _invalid(name, expected, value)
    return value


def validate_devices(
    devices, name: str = "devices", *, allow_none: bool = False, allow_empty: bool = False
) -> list[str] | None:
    """Checks a list of device names; returns their canonical forms.

    A single name counts as a list of one. Whether the devices exist here is
    not checked (that needs the backend: `keras_parallel.devices.resolve_devices`).

    Raises:
        ValueError: for something that is not a name or a sequence of names, a
            name that is not a device name, a device named twice, or (without
            `allow_empty`) an empty list.
    """
    if devices is None and allow_none:
        return None
    if isinstance(devices, str):
        devices = [devices]
    if not isinstance(devices, Sequence):
        expected = "a list of device names such as ['/gpu:0', '/gpu:1']"
        raise _invalid(name, expected + (" or None" if allow_none else ""), devices)
    if not devices and not allow_empty:
        raise _invalid(name, "at least one device", list(devices))
    names = []
    for device in devices:
        try:
            names.append(canonical_device_name(device))
        except ValueError as error:
            raise ValueError(f"Invalid value for argument `{name}`. {error}") from None
    if len(set(names)) != len(names):
        raise ValueError(
            f"Invalid value for argument `{name}`. Each device may appear once. "
            f"Received: {name}={list(devices)!r}"
        )
    return names
