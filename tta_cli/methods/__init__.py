"""Test-time adaptation methods: one module per method, and the registry that names them.

``create_method("sar", model, lr=1e-3)`` builds a method; ``list_methods()`` names them all;
``method_config("sar", reliable_rows="off")`` parses and checks hyperparameters (``--set``).
The registry lives in ``_registry``; the built-in methods are imported here, in one place, which
registers them. A new method module imports ``register_method`` from ``tta_cli.methods._registry``
and is added to the import list below.
"""

from __future__ import annotations

from tta_cli.methods._registry import (
    ALIASES,
    Method,
    MethodClass,
    create_method,
    get_method_class,
    list_methods,
    method_config,
    register_method,
)
from tta_cli.methods.base import (
    EntropyConfig,
    MethodConfig,
    StepResult,
    TTAMethod,
    default_lr,
    entropy_margin,
    softmax_entropy,
)

# isort: split
# The built-in methods, after the registry (importing a module registers its classes).
from tta_cli.methods import (
    come,
    cotta,
    deyo,
    eata,
    foa_shift,
    lame,
    norm,
    rdumb,
    roid,
    rotta,
    sar,
    source,
    tent,
    zerosiam,
)

# isort: split
# auto composes the methods above (imports the registry's create_method), so it comes last.
from tta_cli.methods import auto

__all__ = [
    "ALIASES",
    "EntropyConfig",
    "Method",
    "MethodClass",
    "MethodConfig",
    "StepResult",
    "TTAMethod",
    "auto",
    "come",
    "cotta",
    "create_method",
    "default_lr",
    "deyo",
    "eata",
    "entropy_margin",
    "foa_shift",
    "get_method_class",
    "lame",
    "list_methods",
    "method_config",
    "norm",
    "rdumb",
    "register_method",
    "roid",
    "rotta",
    "sar",
    "softmax_entropy",
    "source",
    "tent",
    "zerosiam",
]
