"""tta: test-time adaptation of image classifiers on real image streams.

The library is small and public::

    from tta_cli import create_method
    method = create_method("sar", model)      # configures the model, picks the parameters
    logits = method(images)                   # predicts, then adapts on this batch

Importing ``tta_cli`` does not import torch (``tta --help`` stays instant); the names below are
loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tta_cli.engine import run_stream
    from tta_cli.errors import TTAError
    from tta_cli.methods import (
        MethodConfig,
        StepResult,
        TTAMethod,
        create_method,
        list_methods,
        method_config,
        register_method,
    )
    from tta_cli.models import load_model
    from tta_cli.run import adapt, predict

_LAZY = {
    "create_method": "tta_cli.methods",
    "list_methods": "tta_cli.methods",
    "register_method": "tta_cli.methods",
    "method_config": "tta_cli.methods",
    "TTAMethod": "tta_cli.methods",
    "MethodConfig": "tta_cli.methods",
    "StepResult": "tta_cli.methods",
    "load_model": "tta_cli.models",
    "adapt": "tta_cli.run",
    "predict": "tta_cli.run",
    "run_stream": "tta_cli.engine",
    "TTAError": "tta_cli.errors",
}

__all__ = [
    "MethodConfig",
    "StepResult",
    "TTAError",
    "TTAMethod",
    "__version__",
    "adapt",
    "create_method",
    "list_methods",
    "load_model",
    "method_config",
    "predict",
    "register_method",
    "run_stream",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'tta_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
