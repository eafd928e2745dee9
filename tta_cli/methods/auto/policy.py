"""What auto runs on a model: chosen from its normalisation layers, before the first batch.

The rule is the one measured safest on the wild benchmark (docs/BENCHMARKS.md, "auto"):
BatchNorm models predict with the best of several BatchNorm statistics per batch (``bn_choice``);
batch-independent models (GroupNorm, LayerNorm, no norm) run an entropy method under the guard
(``guard``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from tta_cli.methods.selection import has_batchnorm, norm_modules

DEFAULT_INNER = "eta"
"""Batch-independent models: measured in docs/BENCHMARKS.md ("auto")."""

BN_RULES = {
    "choose": "per batch, the source statistics or the batch's own, whichever predicts with the lower entropy "
              "(near ties mix them)",
    "choose+balanced": "per batch, the source statistics, the batch's own or the stream's so far (class-balanced), "
                       "whichever predicts with the lowest entropy over the latest 64 or more images (near ties mix "
                       "them)",
}
"""The BatchNorm rule as ``describe()["choice"]`` states it, with and without the stream candidate."""


def model_norm_kind(model: nn.Module) -> str:
    """batchnorm, groupnorm, layernorm or none: what the model normalises with."""
    if has_batchnorm(model):
        return "batchnorm"
    kinds = {type(m).__name__.lower() for _, m in norm_modules(model)}
    if any("group" in k for k in kinds):
        return "groupnorm"
    return "layernorm" if kinds else "none"


def choose(kind: str, num_classes: int, inner: str, bn_stream: str = "balanced") -> dict[str, Any]:
    """The plan for a model: which method, which settings, and why (recorded as ``choice``)."""
    if kind == "batchnorm":
        rule = "choose" if bn_stream == "off" else f"choose+{bn_stream}"
        return {"method": "norm", "norm": kind, "bn_stats": BN_RULES[rule],
                "why": "BatchNorm: test-time statistics gain most on shifted data, but one batch's statistics "
                       "fail on batches of one or few classes (label shift, correlated streams); the rule is the "
                       "one measured safest in docs/BENCHMARKS.md"}
    name = DEFAULT_INNER if inner == "auto" else inner
    return {"method": name, "norm": kind,
            "why": f"{kind}: batch-independent model; {name} measured safest among entropy methods "
                   f"(thresholds in units of ln C={math.log(num_classes):.2f}), guarded against collapse"}
