"""eta / eata: efficient anti-forgetting test-time adaptation.

Niu, Wu, Zhang, Chen, Zheng, Zhao, Tan. "Efficient Test-Time Model Adaptation without
Forgetting", ICML 2022. https://arxiv.org/abs/2204.02610

Per batch (spec section 2): keep the reliable samples (entropy below E0 = 0.4 ln C), drop those
whose prediction is redundant with the running mean prediction (|cos| >= 0.05), weight the rest by
exp(E0 - E) and minimise their entropy; EATA adds a Fisher-weighted L2 pull towards the source
weights (beta = 2000), the Fisher taken on a small clean set (``compute_fisher``). ETA is EATA
without that term. No sample left, no update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta_cli.methods import register_method
from tta_cli.methods.base import EntropyConfig, StepResult, TTAMethod, softmax_entropy


@dataclass
class EATAConfig(EntropyConfig):
    margin_factor: float = 0.4
    """Reliable-sample threshold E0 = margin_factor * ln C."""
    d_margin: float = 0.05
    """Redundancy threshold on |cos(m, p)|."""
    fisher_alpha: float = 2000.0
    """beta, the weight of the Fisher regulariser (EATA only)."""
    probs_momentum: float = 0.9


@register_method
class ETA(TTAMethod):
    name = "eta"
    config_class = EATAConfig
    config: EATAConfig

    def __init__(self, model: nn.Module, config: EATAConfig | None = None, batch_size: int = 64) -> None:
        super().__init__(model, config, batch_size)
        self.model_probs: torch.Tensor | None = None
        self.fishers: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        logits = self.model(x)
        margin = self.config.margin_factor * math.log(logits.shape[1])
        entropy = softmax_entropy(logits)
        reliable = entropy < margin
        probs = logits[reliable].softmax(1)
        entropy = entropy[reliable]
        if self.model_probs is not None:
            cosine = F.cosine_similarity(self.model_probs.unsqueeze(0), probs, dim=1)
            keep = cosine.abs() < self.config.d_margin
            entropy, probs = entropy[keep], probs[keep]
        else:
            keep = torch.ones_like(entropy, dtype=torch.bool)
        self._update_model_probs(probs)
        weights = 1 / torch.exp(entropy.detach() - margin)
        loss = (entropy * weights).mean(0) + self.regulariser()
        n_used = entropy.shape[0]
        if n_used:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad()
        used = torch.zeros_like(reliable)
        used[reliable] = keep
        return StepResult(logits.detach(), used, (reliable.sum(), keep.sum()))

    @torch.no_grad()
    def _update_model_probs(self, probs: torch.Tensor) -> None:
        if probs.shape[0] == 0:
            return
        mean = probs.mean(0)
        m = self.config.probs_momentum
        self.model_probs = mean if self.model_probs is None else m * self.model_probs + (1 - m) * mean

    def regulariser(self) -> torch.Tensor | float:
        return 0.0

    def reset(self) -> None:
        super().reset()
        self.model_probs = None

    def stats(self) -> dict[str, Any]:
        return {}


@register_method
class EATA(ETA):
    """ETA plus the Fisher regulariser; without ``compute_fisher`` it behaves as ETA."""

    name = "eata"

    @torch.enable_grad()
    def compute_fisher(self, batches: Iterable[torch.Tensor]) -> int:
        """Diagonal Fisher from clean batches (squared batch gradient of the cross-entropy with
        the model's own argmax, averaged over batches). Returns the number of images used."""
        sums: dict[str, torch.Tensor] = {}
        n_batches = n_images = 0
        named = list(zip(self.param_names, self.params))
        for images in batches:
            logits = self.model(images)
            F.cross_entropy(logits, logits.argmax(1)).backward()
            for name, param in named:
                if param.grad is not None:
                    squared = param.grad.detach() ** 2
                    sums[name] = squared + sums[name] if name in sums else squared
            self.optimizer.zero_grad()
            n_batches += 1
            n_images += images.shape[0]
        if n_batches:
            self.fishers = {
                name: (sums[name] / n_batches, param.detach().clone())
                for name, param in named
                if name in sums
            }
        return n_images

    def regulariser(self) -> torch.Tensor | float:
        if not self.fishers:
            return 0.0
        total: torch.Tensor | float = 0.0
        for name, param in zip(self.param_names, self.params):
            if name in self.fishers:
                fisher, anchor = self.fishers[name]
                total = total + self.config.fisher_alpha * (fisher * (param - anchor) ** 2).sum()
        return total
