"""Parsing and checking method hyperparameters (the ``--set key=value`` values).

Each method has one dataclass of hyperparameters. Its field types say what a value may be:
``Literal[...]`` lists the choices, ``bool``/``int``/``float`` are parsed from strings, ``X | None``
also accepts ``none``. Every float must be finite; a field narrows its range with
``field(default=..., metadata=at_least(1))`` (or ``greater_than``, ``between``, ``any_finite``);
every number has such metadata (``tests/test_methods_hyperparameters.py`` checks it). Any value that does
not fit is a ``TTAError`` naming the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from tta_cli.errors import TTAError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
NONE_WORDS = ("none", "null")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range a number must lie in; ``None`` is unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def holds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        return not (self.high is not None
                    and (value > self.high or (value == self.high and not self.high_inclusive)))

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>=' if self.low_inclusive else '>'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<=' if self.high_inclusive else '<'} {self.high:g}")
        return " and ".join(parts)


def any_finite() -> dict[str, Bounds]:
    """Any finite number: a field whose whole range is meaningful says so explicitly."""
    return {"bounds": Bounds()}


def at_least(low: float) -> dict[str, Bounds]:
    return {"bounds": Bounds(low=low)}


def greater_than(low: float) -> dict[str, Bounds]:
    return {"bounds": Bounds(low=low, low_inclusive=False)}


def between(low: float, high: float, high_inclusive: bool = True, low_inclusive: bool = True) -> dict[str, Bounds]:
    return {"bounds": Bounds(low=low, high=high, low_inclusive=low_inclusive, high_inclusive=high_inclusive)}


def _field_type(config_class: type, name: str) -> tuple[Any, bool]:
    """The field's type without ``None``, and whether ``None`` is allowed."""
    hint = get_type_hints(config_class)[name]
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        return (args[0] if len(args) == 1 else hint), optional
    return hint, False


def _invalid(key: str, value: Any, expected: str) -> TTAError:
    return TTAError(f"invalid value {value!r} for {key}", f"expected {expected}")


def _parse(value: Any, target: Any, key: str) -> Any:
    """A string from ``--set`` turned into the field's type (other values are checked as they are)."""
    if get_origin(target) is Literal:
        choices = get_args(target)
        if value not in choices:
            raise _invalid(key, value, "one of " + ", ".join(str(c) for c in choices))
        return value
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        raise _invalid(key, value, "true or false")
    if target is int:
        if isinstance(value, bool):
            raise _invalid(key, value, "an integer")
        try:
            number = int(value) if isinstance(value, (int, str)) else None
        except ValueError:
            number = None
        if number is None:
            raise _invalid(key, value, "an integer")
        return number
    if target is float:
        if isinstance(value, bool):
            raise _invalid(key, value, "a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _invalid(key, value, "a number") from None
    if target is str and not isinstance(value, str):
        raise _invalid(key, value, "a string")
    return value


def check_value(config_class: type, key: str, value: Any) -> Any:
    """``value`` as field ``key`` of ``config_class`` holds it, or a ``TTAError`` saying why not."""
    target, optional = _field_type(config_class, key)
    if value is None or (optional and isinstance(value, str) and value.lower() in NONE_WORDS):
        if optional:
            return None
        raise _invalid(key, value, "a value (this hyperparameter cannot be none)")
    parsed = _parse(value, target, key)
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        field = next(f for f in dataclasses.fields(config_class) if f.name == key)
        bounds: Bounds = field.metadata.get("bounds", Bounds())
        if not math.isfinite(parsed) or not bounds.holds(parsed):
            kind = "an integer" if isinstance(parsed, int) else "a finite number"
            raise _invalid(key, value, f"{kind} {bounds.describe()}".rstrip())
    return parsed


def choices(config_class: type, key: str) -> tuple[Any, ...] | None:
    """The values a ``Literal`` field accepts (``None`` for any other type)."""
    target, _ = _field_type(config_class, key)
    return get_args(target) if get_origin(target) is Literal else None


def accepts(config_class: type, key: str) -> str:
    """What field ``key`` accepts, in the words of the error messages: "one of a, b", "true or
    false", "an integer >= 1", "a number", each with "or none" where ``None`` is allowed."""
    target, optional = _field_type(config_class, key)
    options = choices(config_class, key)
    if options is not None:
        words = "one of " + ", ".join(str(c) for c in options)
    elif target is bool:
        words = "true or false"
    elif target in (int, float):
        field = next(f for f in dataclasses.fields(config_class) if f.name == key)
        bounds: Bounds = field.metadata.get("bounds", Bounds())
        words = f"{'an integer' if target is int else 'a number'} {bounds.describe()}".rstrip()
    else:
        words = "a string" if target is str else getattr(target, "__name__", str(target))
    return f"{words} or none" if optional else words


def check_config(config: Any) -> None:
    """Every field of a hyperparameter dataclass holds a valid value (``TTAError`` otherwise)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        setattr(config, field.name, check_value(type(config), field.name, value))


def parse_overrides(config_class: type, method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides checked against ``config_class``: unknown keys and invalid values are errors."""
    names = sorted(f.name for f in dataclasses.fields(config_class))
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TTAError(
            f"unknown hyperparameter {', '.join(unknown)} for method {method!r}",
            f"valid: {', '.join(names)}",
        )
    return {key: check_value(config_class, key, value) for key, value in overrides.items()}


__all__ = [
    "Bounds",
    "accepts",
    "any_finite",
    "at_least",
    "between",
    "check_config",
    "check_value",
    "choices",
    "greater_than",
    "parse_overrides",
]
