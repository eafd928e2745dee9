"""tta: test-time adaptation of image classifiers on real image streams.

The library is small and public::

    from tta_cli import create_method
    method = create_method("sar", model)      # configures the model, picks the parameters
    logits = method(images)                   # predicts, then adapts on this batch

Importing ``tta_cli`` does not import torch; the names below are loaded on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_method": "tta_cli.methods",
    "list_methods": "tta_cli.methods",
    "register_method": "tta_cli.methods",
    "method_config": "tta_cli.methods",
    "load_model": "tta_cli.models",
    "TTAError": "tta_cli.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tta_cli' has no attribute {name!r}")
