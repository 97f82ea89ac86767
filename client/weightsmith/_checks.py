"""Argument checks shared by the clients, `weightsmith.edits` and `weightsmith.jobs`.

Each check returns the value in the form the request needs (an `int` for a
numpy integer, a tuple for a lone string) or raises `TypeError` (wrong kind
of value) or `ValueError` (right kind, out of range), Keras style: what was
received, what was expected. They run before anything is sent, so a mistake
surfaces at the call that made it rather than as a server error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_T = TypeVar("_T")


def integer(name: str, value: int, minimum: int, maximum: int | None = None) -> int:
    """Check an integer (numpy integers included, bools not) lies in `[minimum, maximum]`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Received a non-integer `{name}`, expected an int. Received: {name}={value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        expected = f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}"
        raise ValueError(f"Received an invalid `{name}`, expected {expected}. Received: {name}={value}")
    return int(value)


def seed(value: int | None) -> int | None:
    """Check an optional int64 seed; None stays None (unseeded)."""
    return None if value is None else integer("seed", value, INT64_MIN, INT64_MAX)


def number(name: str, value: float) -> float:
    """Check a finite real number (numpy scalars included, bools not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"Received a non-numeric `{name}`, expected a float. Received: {name}={value!r}")
    if not math.isfinite(value):
        raise ValueError(
            f"Received a non-finite `{name}`, expected a finite number. Received: {name}={value}"
        )
    return float(value)


def positive(name: str, value: float) -> float:
    """Check a finite number above 0."""
    checked = number(name, value)
    if not checked > 0:
        raise ValueError(f"Received an invalid `{name}`, expected a number above 0. Received: {name}={value}")
    return checked


def between(name: str, value: float, low: float, high: float) -> float:
    """Check a finite number in `[low, high]`."""
    checked = number(name, value)
    if not low <= checked <= high:
        raise ValueError(f"Received an invalid `{name}`, expected {low} to {high}. Received: {name}={value}")
    return checked


def timeout(name: str, value: float | None) -> float | None:
    """Check a deadline in seconds; None means no deadline."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"Received an invalid `{name}`, expected a positive number of seconds or None "
            f"for no deadline. Received: {name}={value!r}"
        )
    return float(value)


def name(name: str, value: str, example: str) -> str:
    """Check a non-empty string, such as a variable path or a layer class name."""
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"Received an invalid `{name}`, expected a non-empty string such as {example!r}. "
            f"Received: {name}={value!r}"
        )
    return value


def loss(value: str) -> str:
    """Check a Keras loss name (the server resolves it)."""
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"Received an invalid `loss`, expected a Keras loss name such as "
            f"'sparse_categorical_crossentropy'. Received: loss={value!r}"
        )
    return value


def resource_id(name: str, value: str, *, required: bool) -> str:
    """Check a model, dataset or job id string; "" passes unless `required`."""
    if not isinstance(value, str) or (required and not value):
        expected = "a non-empty id string" if required else "an id string, or '' for none"
        raise ValueError(f"Received an invalid `{name}`, expected {expected}. Received: {name}={value!r}")
    return value


def strings(name: str, value: str | Sequence[str]) -> tuple[str, ...]:
    """Check a sequence of strings; a lone string is one item, not a sequence of characters."""
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(
                f"Received an invalid item in `{name}`, expected strings. Received: {name}={value!r}"
            )
    return items


def choice(name: str, value: str, choices: Mapping[str, _T]) -> _T:
    """Look a string option up in its table of wire values."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"Received an invalid `{name}`, expected one of {sorted(choices)}. Received: {name}={value!r}"
        )
    return choices[value]


def enum_choice(name: str, value: str, proto_enum: EnumTypeWrapper) -> int:
    """A lower-case option as its proto enum number: `"per_tensor"` -> `PRUNE_SCOPE_PER_TENSOR`.

    The options are derived from the enum itself (its value names less the
    enum's prefix), so a value added to the contract is accepted here too.
    """
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", proto_enum.DESCRIPTOR.name).upper() + "_"
    choices = {
        key.removeprefix(prefix).lower(): number
        for key, number in proto_enum.items()
        if not key.endswith("_UNSPECIFIED")
    }
    return choice(name, value, choices)


def instance(name: str, value: object, cls: type[_T], builder: str) -> _T:
    """Check a message built by one of the library's builders, named in the error."""
    if not isinstance(value, cls):
        raise TypeError(
            f"Received an invalid `{name}`, expected a `{cls.__name__}` built with `{builder}`. "
            f"Received: {type(value).__name__}"
        )
    return value
