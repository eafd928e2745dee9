"""norm: BatchNorm with test-time statistics, nothing learned.

Schneider et al., "Improving robustness against common corruptions by covariate shift
adaptation", NeurIPS 2020; Nado et al., "Evaluating prediction-time batch normalization", 2020.

``bn_stats=batch`` normalises each batch with its own statistics (degenerates at batch size 1 and
on class-imbalanced batches); ``mix`` is alpha-BN (source and batch statistics mixed, defined at
batch size 1); ``ema`` updates the running statistics from each batch (momentum ``bn_alpha``) and
predicts with them, and exports them. Models without BatchNorm are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta_cli.methods._registry import register_method
from tta_cli.methods.base import BNStatsChoice, MethodConfig, StepResult, TTAMethod


@dataclass
class NormConfig(MethodConfig):
    bn_stats: BNStatsChoice = "batch"


@register_method
class Norm(TTAMethod):
    name = "norm"
    config_class = NormConfig
    updates_parameters = False
    data_parallel = True

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        logits = self.model(x)
        return StepResult(logits=logits, used=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
