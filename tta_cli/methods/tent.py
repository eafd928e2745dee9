"""tent: fully test-time adaptation by entropy minimisation.

Wang, Shelhamer, Liu, Olshausen, Darrell. "Tent: Fully Test-Time Adaptation by Entropy
Minimization", ICLR 2021. https://arxiv.org/abs/2006.10726

Per batch: one forward, the mean softmax entropy of the whole batch as the loss, one backward and
one SGD step on the affine parameters of every norm layer (BatchNorm on batch statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta_cli.methods._registry import register_method
from tta_cli.methods.base import EntropyConfig, StepResult, TTAMethod, softmax_entropy
from tta_cli.methods.fastpaths import batch_mean


@dataclass
class TentConfig(EntropyConfig):
    pass


@register_method
class Tent(TTAMethod):
    name = "tent"
    data_parallel = True
    config_class = TentConfig
    amp_aware = True

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        logits = self.run_model(x)
        loss = batch_mean(softmax_entropy(logits))
        self.backward(loss)
        self.optimizer_step()
        self.optimizer.zero_grad()
        used = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return StepResult(logits=logits.detach(), used=used)
