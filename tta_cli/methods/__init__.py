"""The method registry: ``register_method``, ``create_method``, ``list_methods``.

In the spirit of timm's ``register_model`` / ``create_model``: each method module registers its
class on import, and ``create_method("sar", model, lr=1e-3)`` builds one with its dataclass of
hyperparameters, where unknown keys are an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from torch import nn

from tta_cli.errors import TTAError
from tta_cli.methods.base import MethodConfig, StepResult, TTAMethod

_REGISTRY: dict[str, type[TTAMethod]] = {}
_ALIASES: dict[str, str] = {}

M = TypeVar("M", bound=type[TTAMethod])


def register_method(cls: M) -> M:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[TTAMethod]:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list_methods(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(list_methods())}"
        raise TTAError(f"unknown method {name!r}", hint)
    return _REGISTRY[key]


def _field_type(config_class: type, name: str) -> Any:
    hints = get_type_hints(config_class)
    hint = hints[name]
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0] if args else str
    return hint


def _coerce(value: Any, target: Any, key: str) -> Any:
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null"):
        return None
    try:
        if target is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target in (int, float):
            return target(value)
    except ValueError:
        raise TTAError(f"invalid value {value!r} for {key}", f"expected {target.__name__}") from None
    return value


def method_config(name: str, **overrides: Any) -> MethodConfig:
    """The method's hyperparameter dataclass with overrides (strings are parsed, as from --set)."""
    config_class = get_method_class(name).config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TTAError(
            f"unknown setting {', '.join(unknown)} for method {name!r}",
            f"valid settings: {', '.join(sorted(fields))}",
        )
    values = {k: _coerce(v, _field_type(config_class, k), k) for k, v in overrides.items()}
    return config_class(**values)


def create_method(
    name: str,
    model: nn.Module,
    config: MethodConfig | None = None,
    batch_size: int = 64,
    **overrides: Any,
) -> TTAMethod:
    """Wrap ``model`` in the named method, e.g. ``create_method("sar", model, lr=1e-3)``.

    ``batch_size`` is what the paper's learning-rate rule and the BatchNorm choice at batch size 1
    depend on; pass the one you will feed. Extra keyword arguments set hyperparameters.
    """
    cls = get_method_class(name)
    if config is None:
        config = method_config(cls.name, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return cls(model, config, batch_size=batch_size)


# Importing the modules registers the built-in methods.
from tta_cli.methods import (  # noqa: E402
    cotta,  # noqa: F401
    eata,
    norm,
    roid,  # noqa: F401
    rotta,  # noqa: F401
    sar,
    source,
    tent,
)

_ALIASES.update({"bn": "norm", "none": "source", "eta": "eta"})

__all__ = [
    "MethodConfig",
    "StepResult",
    "TTAMethod",
    "create_method",
    "eata",
    "get_method_class",
    "list_methods",
    "method_config",
    "norm",
    "register_method",
    "sar",
    "source",
    "tent",
]
