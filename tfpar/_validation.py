"""Argument checks with one policy, used by every public entry point of tfpar.

A value of the wrong type raises `TypeError`, a value of the right type
outside what is allowed raises `ValueError`. Each message names the argument,
repeats the value received (and its type, for a `TypeError`) and says what is
allowed, in the Keras form: "`name` must be ... Received: name=value ...".
`bool` is never accepted where a number is asked for, although it is an
`int` subclass: `num_workers=True` is a mistake, not 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def type_error(name: str, value: object, allowed: str) -> TypeError:
    """Returns the `TypeError` of this policy, for checks the helpers lack.

    Args:
        name: The argument's name.
        value: What the caller passed.
        allowed: What is accepted, in words (e.g. `"a list of layer names"`).
    """
    return TypeError(
        f"`{name}` must be {allowed}. Received: {name}={value!r} "
        f"of type {type(value).__name__}."
    )


def value_error(name: str, value: object, allowed: str) -> ValueError:
    """Returns the `ValueError` of this policy, for checks the helpers lack.

    Args:
        name: The argument's name.
        value: What the caller passed.
        allowed: What is accepted, in words.
    """
    return ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}.")


def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
) -> Any:
    """Checks that `value` is an int within `[minimum, maximum]` and returns it.

    Args:
        name: The argument's name, as the caller wrote it.
        value: What the caller passed.
        minimum: The smallest allowed value, or `None` for no bound.
        maximum: The largest allowed value, or `None` for no bound.
        allow_none: Whether `None` is allowed (and returned as is).

    Raises:
        TypeError: If `value` is not an int (a bool is not).
        ValueError: If it is outside the bounds.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = "an int" + (" or None" if allow_none else "")
        raise type_error(name, value, allowed)
    if (minimum is not None and value < minimum) or (
        maximum is not None and value > maximum
    ):
        raise value_error(name, value, _bounds("an int", minimum, maximum))
    return value


def check_number(
    name: str,
    value: object,
    *,
    positive: bool = False,
    minimum: float | None = None,
    unit: str = "",
    allow_none: bool = False,
) -> Any:
    """Checks that `value` is a finite real number and returns it as given.

    Args:
        name: The argument's name.
        value: What the caller passed.
        positive: Whether the number must be > 0.
        minimum: The smallest allowed value (inclusive), or `None`.
        unit: What the number counts, for the message (e.g. `"seconds"`).
        allow_none: Whether `None` is allowed (and returned as is).

    Raises:
        TypeError: If `value` is not an int or float (a bool is not).
        ValueError: If it is not finite, or not > 0 with `positive`, or below
            `minimum`.
    """
    if value is None and allow_none:
        return None
    noun = f"a number of {unit}" if unit else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise type_error(name, value, noun + (" or None" if allow_none else ""))
    if not math.isfinite(value):
        raise value_error(name, value, f"a finite {noun[2:]}")
    if positive and not value > 0:
        raise value_error(name, value, f"{noun} > 0")
    if minimum is not None and value < minimum:
        raise value_error(name, value, f"{noun} >= {minimum}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Checks that `value` is a bool and returns it.

    Raises:
        TypeError: If it is not (`1`, `"yes"` and `None` are not bools).
    """
    if not isinstance(value, bool):
        raise type_error(name, value, "True or False")
    return value


def check_choice(name: str, value: T, choices: Iterable[object]) -> T:
    """Checks that `value` is one of `choices` and returns it.

    A value of another type than every choice (an int where names are
    allowed) is a `TypeError`; a value of the right type that is not a
    choice is a `ValueError`. Both messages list the choices.

    Raises:
        TypeError: If `value`'s type is that of no choice.
        ValueError: If it is not one of `choices`.
    """
    choices = tuple(choices)
    listed = ", ".join(repr(c) for c in choices)
    if not any(type(value) is type(c) for c in choices):
        raise type_error(name, value, f"one of {listed}")
    if value not in choices:
        raise value_error(name, value, f"one of {listed}")
    return value


def check_instance(
    name: str, value: object, types: type | tuple[type, ...], allowed: str
) -> Any:
    """Checks that `value` is an instance of `types` and returns it.

    Args:
        name: The argument's name.
        value: What the caller passed.
        types: The accepted type or types.
        allowed: What is accepted, in words (e.g. `"a list of device names"`).

    Raises:
        TypeError: If it is not.
    """
    if not isinstance(value, types):
        raise type_error(name, value, allowed)
    return value


def check_sequence(
    name: str, value: object, item_type: type | tuple[type, ...], allowed: str
) -> tuple[Any, ...]:
    """Checks that `value` is a list or tuple of `item_type` and returns a tuple.

    A string is not accepted as a sequence of strings: `devices="/gpu:0"` is
    a mistake for `devices=["/gpu:0"]`.

    Args:
        name: The argument's name.
        value: What the caller passed.
        item_type: The accepted type or types of every item.
        allowed: What is accepted, in words (e.g. `"a list of layer names"`).

    Raises:
        TypeError: If `value` is not a list or tuple, or an item is not an
            `item_type` (the message names the item).
    """
    if not isinstance(value, list | tuple):
        raise type_error(name, value, allowed)
    for item in value:
        if not isinstance(item, item_type):
            raise TypeError(
                f"`{name}` must be {allowed}. Received: {name}={value!r}, whose "
                f"item {item!r} is of type {type(item).__name__}."
            )
    return tuple(value)


def _bounds(noun: str, minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{noun} from {minimum} to {maximum}"
    if minimum is not None:
        return f"{noun} >= {minimum}"
    if maximum is not None:
        return f"{noun} <= {maximum}"
    return noun
