"""auto: chooses a method and its settings from what it can see without labels, and guards it.

In readable parts: ``policy`` (what runs on a model, from its normalisation layers), ``bn_choice``
(BatchNorm models: per batch, the prediction with the best of several BatchNorm statistics),
``guard`` (batch-independent models: an entropy method watched for collapse against a frozen
source copy) and ``method`` (the registered ``auto``, a ``wrapper.WrappingMethod`` around the
chosen method). Measurements: docs/METHODS.md ("auto") and docs/BENCHMARKS.md.
"""

from __future__ import annotations

from tta_cli.methods.auto.bn_choice import (
    STREAM_MOMENTUM_IMAGES,
    BatchNormChoice,
    ClassBalancedStats,
    EntropyWindow,
    SourceCheck,
)
from tta_cli.methods.auto.guard import Guard
from tta_cli.methods.auto.method import Auto, AutoConfig
from tta_cli.methods.auto.policy import BN_RULES, DEFAULT_INNER, choose, model_norm_kind

__all__ = ["BN_RULES", "DEFAULT_INNER", "STREAM_MOMENTUM_IMAGES", "Auto", "AutoConfig", "BatchNormChoice",
           "ClassBalancedStats", "EntropyWindow", "Guard", "SourceCheck", "choose", "model_norm_kind"]
