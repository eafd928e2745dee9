"""The method registry: ``register_method``, ``create_method``, ``list_methods``.

In the spirit of timm's ``register_model`` / ``create_model``: each method module registers its
class on import (importing ``register_method`` from here, never from the package, so that no
module imports the package that imports it), and ``create_method("sar", model, lr=1e-3)`` builds
one with its dataclass of hyperparameters, where unknown keys and invalid values are a
``TTAError`` that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

from torch import nn

from tta_cli.errors import TTAError
from tta_cli.methods.base import MethodConfig, TTAMethod
from tta_cli.methods.hyperparameters import parse_overrides
from tta_cli.methods.wrapper import WrappingMethod

Method = TTAMethod | WrappingMethod
"""A registered method: a ``TTAMethod``, or a policy around one (``WrappingMethod``, e.g. auto)."""
MethodClass = type[TTAMethod] | type[WrappingMethod]

_REGISTRY: dict[str, MethodClass] = {}
ALIASES: dict[str, str] = {"bn": "norm", "none": "source"}
"""Other names a user may type for a method."""

M = TypeVar("M", type[TTAMethod], type[WrappingMethod])


def register_method(cls: M) -> M:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    known = _REGISTRY.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name {cls.name!r} of {cls.__module__}.{cls.__qualname__} is taken by "
                         f"{known.__module__}.{known.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


DEFAULT_METHOD = "auto"
"""What ``tta adapt`` runs without ``--method``."""


def method_summary(cls: MethodClass) -> str:
    """What the method does, in one sentence: its module docstring's first paragraph, without the
    leading ``name:`` (or ``eta / eata:``) that repeats the name beside it in a listing."""
    import sys

    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    text = " ".join(doc.split("\n\n")[0].split())
    head, sep, rest = text.partition(": ")
    if sep and all(part.strip().isidentifier() for part in head.split("/")):
        text = rest
    return text[:1].upper() + text[1:]


def get_method_class(name: str) -> MethodClass:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list_methods(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(list_methods())}"
        raise TTAError(f"unknown method {name!r}", hint)
    return _REGISTRY[key]


def method_config(name: str, **overrides: Any) -> MethodConfig:
    """The method's hyperparameter dataclass with overrides (strings are parsed, as from --set).

    Unknown keys and invalid values raise ``TTAError`` with the valid keys or values.
    """
    cls = get_method_class(name)
    return cls.config_class(**parse_overrides(cls.config_class, cls.name, overrides))


def create_method(
    name: str,
    model: nn.Module,
    config: MethodConfig | None = None,
    batch_size: int = 64,
    **overrides: Any,
) -> Method:
    """Wrap ``model`` in the named method, e.g. ``create_method("sar", model, lr=1e-3)``.

    ``batch_size`` is what the paper's learning-rate rule and the BatchNorm choice at batch size 1
    depend on; pass the one you will feed. Extra keyword arguments set hyperparameters.
    """
    cls = get_method_class(name)
    if config is None:
        config = method_config(cls.name, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **parse_overrides(type(config), cls.name, overrides))
    return cls(model, config, batch_size=batch_size)


__all__ = [
    "ALIASES",
    "Method",
    "MethodClass",
    "create_method",
    "get_method_class",
    "list_methods",
    "method_config",
    "register_method",
]
