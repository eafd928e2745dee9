"""source: the model as it is, no adaptation (the baseline every method is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta_cli.methods._registry import register_method
from tta_cli.methods.base import BNStatsChoice, MethodConfig, StepResult, TTAMethod


@dataclass
class SourceConfig(MethodConfig):
    bn_stats: BNStatsChoice = "source"


@register_method
class Source(TTAMethod):
    """Eval mode, source BatchNorm statistics, one no-grad forward per batch."""

    name = "source"
    config_class = SourceConfig
    updates_parameters = False
    changes_predictions = False
    data_parallel = True

    def __init__(self, model: torch.nn.Module, config: SourceConfig | None = None, batch_size: int = 64) -> None:
        super().__init__(model, config, batch_size)
        self.model_is_fixed = self.bn_mode in (None, "source")  # eval mode: no statistic moves either

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        logits = self.model(x)
        return StepResult(logits=logits, used=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
