"""sar: sharpness-aware and reliable entropy minimisation, with model recovery.

Niu, Wu, Zhang, Wen, Chen, Zhao, Tan. "Towards Stable Test-Time Adaptation in Dynamic Wild
World", ICLR 2023. https://arxiv.org/abs/2302.12400

Per batch (spec section 2): a forward at theta gives the predictions; the reliable samples
(entropy below E0 = 0.4 ln C) give the first loss, whose gradient g moves the weights to
theta + rho g / ||g|| (SAM); a second forward of the full batch there, re-filtered, gives the loss
whose gradient updates theta with SGD. An EMA of the second loss below 0.2 signals collapse and
restores the source model.

Faithful to the authors' code by default, including two behaviours that matter for results:
* an empty selection still takes the SGD step (zero gradient, so momentum keeps moving the
  weights); ``skip_empty=True`` skips the step instead;
* model recovery restores the parameters, but the SGD momentum survives it (the authors' SAM
  wrapper restores only its own state, not the inner SGD's); ``reset_momentum=True`` clears it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tta_cli.methods import register_method
from tta_cli.methods.base import EntropyConfig, StepResult, TTAMethod, softmax_entropy
from tta_cli.methods.selection import affine_parameters, sar_norm_modules


@dataclass
class SARConfig(EntropyConfig):
    margin_factor: float = 0.4
    """Reliable-sample threshold E0 = margin_factor * ln C."""
    rho: float = 0.05
    """SAM neighbourhood radius."""
    reset_threshold: float = 0.2
    """Model recovery when the EMA of the second loss falls below this."""
    ema_momentum: float = 0.9
    skip_empty: bool = False
    """Skip the update when no sample passes the filters (the original steps anyway)."""
    reset_momentum: bool = False
    """Also clear SGD momentum on model recovery (the original keeps it)."""
    layers: str = "sar"
    """Which norm layers to adapt: sar (skip the last quarter of blocks and the final norm) or all."""


@register_method
class SAR(TTAMethod):
    name = "sar"
    config_class = SARConfig
    double_lr_at_bs1 = True
    config: SARConfig

    def __init__(self, model: nn.Module, config: SARConfig | None = None, batch_size: int = 64) -> None:
        super().__init__(model, config, batch_size)
        self.ema: float | None = None
        self.ema_history: list[float] = []

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        if self.config.layers == "all":
            return affine_parameters(self.model)
        if self.config.layers != "sar":
            raise ValueError(f"layers must be 'sar' or 'all', got {self.config.layers!r}")
        return affine_parameters(self.model, sar_norm_modules(self.model))

    def margin(self, num_classes: int) -> float:
        return self.config.margin_factor * math.log(num_classes)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        optimizer = self.optimizer
        optimizer.zero_grad()
        logits = self.model(x)
        margin = self.margin(logits.shape[1])
        entropy = softmax_entropy(logits)
        reliable = entropy < margin
        n_reliable = reliable.sum()
        entropy[reliable].mean(0).backward()

        if self.config.skip_empty and int(n_reliable) == 0:
            optimizer.zero_grad()
            empty = torch.zeros_like(reliable)
            return StepResult(logits.detach(), empty, (n_reliable, n_reliable), self._recover_if_collapsed(None))

        saved = self._perturb()
        optimizer.zero_grad()
        entropy2 = softmax_entropy(self.model(x))[reliable]
        reliable2 = entropy2 < margin
        loss2 = entropy2[reliable2].mean(0)
        loss2.backward()
        with torch.no_grad():
            for param, old in zip(self.params, saved):
                param.copy_(old)
        n_used = reliable2.sum()
        if not (self.config.skip_empty and int(n_used) == 0):
            optimizer.step()
        optimizer.zero_grad()

        used = torch.zeros_like(reliable)
        used[reliable] = reliable2
        return StepResult(logits.detach(), used, (n_reliable, n_used), self._recover_if_collapsed(loss2))

    @torch.no_grad()
    def _perturb(self) -> list[torch.Tensor]:
        """Move to theta + rho g / (||g|| + 1e-12), ||g|| the global norm; return theta."""
        with_grad = [p for p in self.params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad])
        )
        scale = self.config.rho / (grad_norm + 1e-12)
        saved = [p.detach().clone() for p in self.params]
        for param in with_grad:
            param.add_(param.grad * scale.to(param))
        return saved

    def _recover_if_collapsed(self, loss2: torch.Tensor | None) -> bool:
        """Update the EMA with the second loss and restore the source model below the threshold.

        Reading the loss is the one host-device sync per batch; the EMA is a Python float, as in
        the authors' code, and a NaN loss (empty selection) leaves it unchanged.
        """
        value = float(loss2.detach()) if loss2 is not None else math.nan
        if not math.isnan(value):
            momentum = self.config.ema_momentum
            self.ema = value if self.ema is None else momentum * self.ema + (1 - momentum) * value
        if self.ema is None:
            return False
        self.ema_history.append(self.ema)
        if self.ema < self.config.reset_threshold:
            self.reset()
            self.record_reset()
            return True
        return False

    def reset(self) -> None:
        momentum = None
        if not self.config.reset_momentum and self.optimizer is not None:
            momentum = {id(p): s["momentum_buffer"].clone() for p, s in self.optimizer.state.items()
                        if s.get("momentum_buffer") is not None}
        super().reset()
        if momentum:
            for param in self.params:
                if id(param) in momentum:
                    self.optimizer.state[param]["momentum_buffer"] = momentum[id(param)]
        self.ema = None

    def stats(self) -> dict[str, Any]:
        return {"ema": self.ema_history[-1] if self.ema_history else None, "resets": len(self.resets)}
