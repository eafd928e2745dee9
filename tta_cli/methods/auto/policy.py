"""What auto runs on a model: chosen from its normalisation layers, before the first batch.

The rule is the one measured safest on the wild benchmark (docs/BENCHMARKS.md, "auto"):
BatchNorm models predict with the best of several BatchNorm statistics per batch (``bn_choice``);
batch-independent models (GroupNorm, LayerNorm, no norm) run ROID under the guard (``guard``), and
LAME predicts their batches of few classes (``few_classes``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from tta_cli.methods.selection import has_batchnorm, norm_modules

DEFAULT_INNER = "roid"
"""Batch-independent models: the faithful method with the largest mean gain under the guard, and
none below the source, on the CIFAR-10 quick rows (resnet18-gn, convnext-atto-ln; continual and
correlated, stream seed 0); held out: the other seeds, ``gn-more`` and the 10,000-image streams
(docs/BENCHMARKS.md, "auto on GroupNorm and LayerNorm models")."""

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


def choose(kind: str, num_classes: int, inner: str, bn_stream: str = "balanced",
           few_classes: bool = True, source_ensemble: bool = True, domain_change: bool = True) -> dict[str, Any]:
    """The plan for a model: which method, which settings, and why (recorded as ``choice``)."""
    if kind == "batchnorm":
        rule = "choose" if bn_stream == "off" else f"choose+{bn_stream}"
        return {"method": "norm", "norm": kind, "bn_stats": BN_RULES[rule],
                "why": "BatchNorm: test-time statistics gain most on shifted data, but one batch's statistics "
                       "fail on batches of one or few classes (label shift, correlated streams); the rule is the "
                       "one measured safest in docs/BENCHMARKS.md"}
    name = DEFAULT_INNER if inner == "auto" else inner
    why = f"{name} gained most without loss among the faithful methods measured under the guard" \
        if inner == "auto" else f"{name} as asked"
    return {"method": name, "norm": kind,
            "why": f"{kind}: batch-independent model; {why}; guarded against collapse (thresholds in units of "
                   f"ln C={math.log(num_classes):.2f}) and against harm (the source predicts while the label-free "
                   f"estimate of the accuracy change over recent images says harm)"
                   + (f"; {name}'s predictions are averaged with the source model's" if source_ensemble else "")
                   + (f"; {name} restarts from the source model where the input's domain changes" if domain_change
                      else "")
                   + ("; batches of few classes (class-ordered, label-correlated streams) are predicted by LAME on "
                      "the source model" if few_classes else "")}
