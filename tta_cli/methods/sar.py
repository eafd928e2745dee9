"""sar: sharpness-aware and reliable entropy minimisation, with model recovery.

Niu, Wu, Zhang, Wen, Chen, Zhao, Tan. "Towards Stable Test-Time Adaptation in Dynamic Wild
World", ICLR 2023. https://arxiv.org/abs/2302.12400

Per batch (docs/METHODS.md, "sar"): a forward at theta gives the predictions; the reliable samples
(entropy below E0 = 0.4 ln C) give the first loss, whose gradient g moves the weights to
theta + rho g / ||g|| (SAM); a second forward of the batch there, re-filtered, gives the loss
whose gradient updates theta with SGD. An EMA of the second loss below 0.2 signals collapse and
restores the source model.

Faithful to the authors' code by default, including two behaviours that matter for results:
* an empty selection still takes the SGD step (zero gradient, so momentum keeps moving the
  weights); ``skip_empty=True`` skips the step instead;
* model recovery restores the parameters, but the SGD momentum survives it (the authors' SAM
  wrapper restores only its own state, not the inner SGD's); ``reset_momentum=True`` clears it too.

Speed paths, each exact and tested on its own (``fastpaths``, docs/PERFORMANCE.md): filters are
masks and decisions stay on the device (no host sync); on a batch-independent model the gradient
passes run on the reliable rows only (``reliable_rows="auto"``, ``fastpaths.gradient_rows``); a batch
with nothing reliable, where that is known, runs only its zero-gradient SGD step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tta_cli.methods._registry import register_method
from tta_cli.methods.base import EntropyConfig, StepResult, TTAMethod, softmax_entropy
from tta_cli.methods.fastpaths import (
    DeviceLog,
    backward_or_zero,
    gradient_rows,
    masked_mean,
    nan_aware_ema,
    reported_mean,
    step_if_any,
)
from tta_cli.methods.hyperparameters import at_least, between
from tta_cli.methods.selection import affine_parameters, is_batch_independent, sar_norm_modules


@dataclass
class SARConfig(EntropyConfig):
    margin_factor: float = field(default=0.4, metadata=at_least(0.0))
    """Reliable-sample threshold E0 = margin_factor * ln C."""
    rho: float = field(default=0.05, metadata=at_least(0.0))
    """SAM neighbourhood radius."""
    reset_threshold: float = field(default=0.2, metadata=at_least(0.0))
    """Model recovery when the EMA of the second loss falls below this."""
    ema_momentum: float = field(default=0.9, metadata=between(0.0, 1.0))
    skip_empty: bool = False
    """Skip the update when no sample passes the filters (the original steps anyway)."""
    reset_momentum: bool = False
    """Also clear SGD momentum on model recovery (the original keeps it)."""
    layers: Literal["sar", "all"] = "sar"
    """Which norm layers to adapt: sar (skip the last quarter of blocks and the final norm) or all."""
    reliable_rows: Literal["auto", "off"] = "auto"
    """auto: gradient passes on the reliable rows only when the model is batch-independent (same
    result, less work); off: always the authors' full-batch passes."""


@register_method
class SAR(TTAMethod):
    name = "sar"
    data_parallel = True
    resume_attributes = ("_ema",)
    config_class = SARConfig
    double_lr_at_bs1 = True
    amp_aware = True
    config: SARConfig

    def __init__(self, model: nn.Module, config: SARConfig | None = None, batch_size: int = 64) -> None:
        super().__init__(model, config, batch_size)
        rows_only = self.config.reliable_rows == "auto" and is_batch_independent(model, self.bn_mode)
        self.rows = gradient_rows(rows_only, after_grad_forward=True)
        self._ema: torch.Tensor | None = None  # on the device; NaN stands for "no EMA yet"
        self._ema_log = DeviceLog()

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        if self.config.layers == "all":
            return affine_parameters(self.model)
        return affine_parameters(self.model, sar_norm_modules(self.model))

    def margin(self, num_classes: int) -> float:
        return self.config.margin_factor * math.log(num_classes)

    # --- one batch: Algorithm 1 of the paper -------------------------------------------------------

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        self.optimizer.zero_grad()
        # entropy at theta (the forward that gives the predictions); reliable samples S1 = {E < E0}
        logits = self.rows.first_forward(self.run_model, x)
        margin = self.margin(logits.shape[1])
        entropy = self.sample_entropy(logits)
        reliable = entropy < margin
        rows = self.rows.rows(x, reliable, host=self.reads_are_free(x))
        if rows.count == 0 and self._passes_are_pure():
            return self._step_with_nothing_reliable(logits, reliable)
        self.rows.count(rows.plan)

        # the reliable entropy loss: mean entropy over S1; its gradient g moves theta to the sharpest
        # point of the neighbourhood, theta + eps with eps = rho g / ||g|| (SAM's first step)
        loss1, n_reliable = masked_mean(rows.with_grad(entropy, self._entropy), rows.selected)
        self.backward(loss1)
        theta = self.perturb()

        # the loss at theta + eps over S2 = S1 & {E' < E0}; its gradient updates theta (SAM's second step)
        entropy2 = self._entropy(rows.x)
        used = rows.selected & (entropy2 < margin)
        loss2, n_used = masked_mean(entropy2, used)
        backward_or_zero(self, loss2, n_used)
        self.restore(theta)
        self._sgd_step(n_used)

        # model recovery: an EMA of the second loss below e0 (0.2) restores the source model
        collapsed = self._recover_if_collapsed(reported_mean(loss2, n_used))
        return StepResult(logits.detach(), rows.to_batch(used), (n_reliable, n_used), collapsed)

    def sample_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """The per-sample loss SAR minimises: the prediction's entropy (a variant may replace it)."""
        return softmax_entropy(logits)

    def _entropy(self, x: torch.Tensor) -> torch.Tensor:
        return self.sample_entropy(self.run_model(x))

    def _sgd_step(self, n_used: torch.Tensor) -> None:
        if self.config.skip_empty:
            step_if_any(self, n_used)
        else:
            self.optimizer_step()
        self.optimizer.zero_grad()

    # --- SAM's two steps --------------------------------------------------------------------------

    @torch.no_grad()
    def perturb(self) -> list[torch.Tensor]:
        """Move to theta + rho g / (||g|| + 1e-12), ||g|| the global norm, and clear the gradients;
        return theta."""
        saved = [p.detach().clone() for p in self.params]
        with_grad = [p for p in self.params if p.grad is not None]
        if with_grad:
            grads = [p.grad for p in with_grad]
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            scale = self.config.rho / (grad_norm + 1e-12)
            torch._foreach_add_(with_grad, torch._foreach_mul(grads, scale))
        self.optimizer.zero_grad()
        return saved

    @torch.no_grad()
    def restore(self, theta: list[torch.Tensor]) -> None:
        """Back to theta, keeping the gradient taken at theta + eps (SAM's second step)."""
        torch._foreach_copy_(self.params, theta)

    # --- the fast path where nothing is reliable --------------------------------------------------

    def _step_with_nothing_reliable(self, logits: torch.Tensor, reliable: torch.Tensor) -> StepResult:
        """Steps 2-6 when S1 is known to be empty: both losses are empty means, so their backwards
        give zero gradients, the perturbation is zero and the EMA is unchanged; what is left is the
        SGD step with zero gradients (momentum still moves the weights), which is all this does."""
        self.rows.count("nothing reliable")
        if not self.config.skip_empty:
            for param in self.params:
                param.grad = torch.zeros_like(param)
            self.optimizer_step()
            self.optimizer.zero_grad()
        n_reliable = reliable.sum()
        collapsed = self._recover_if_collapsed(torch.full((), math.nan, device=logits.device))
        return StepResult(logits.detach(), reliable, (n_reliable, n_reliable), collapsed)

    def _passes_are_pure(self) -> bool:
        """Forwards have no side effect, so they may be skipped (ema statistics change in each)."""
        return self.bn_mode != "ema"

    # --- model recovery ---------------------------------------------------------------------------

    @torch.no_grad()
    def _recover_if_collapsed(self, loss2: torch.Tensor) -> torch.Tensor:
        """Update the EMA with the second loss (NaN: empty, no update) and restore the source model
        below the threshold; on the device. Returns the recovery flag (0-dim bool, read later)."""
        ema = nan_aware_ema(self._ema, loss2, self.config.ema_momentum)
        self._ema_log.add(self.batches_seen, ema)
        collapsed = ema < self.config.reset_threshold  # false while there is no EMA (NaN)
        self.reset_where(collapsed, momentum=self.config.reset_momentum)
        self._ema = torch.where(collapsed, torch.full_like(ema, math.nan), ema)
        self.record_reset(collapsed)
        return collapsed

    def settle(self) -> None:
        super().settle()
        self._ema_log.settle()

    @property
    def ema(self) -> float | None:
        """The current EMA of the second loss (None before the first one and after a recovery)."""
        if self._ema is None:
            return None
        value = float(self._ema)
        return None if math.isnan(value) else value

    @property
    def ema_history(self) -> list[float]:
        """The EMA after each batch's update, for the batches where there was one."""
        return [v for _, v in self._ema_log.entries() if not math.isnan(v)]

    @property
    def plans(self) -> dict[str, int]:
        """How many batches ran each plan of gradient passes (``fastpaths.ROW_PLANS``)."""
        return self.rows.plans

    @property
    def rows_only(self) -> bool:
        return self.rows.enabled

    def reset(self) -> None:
        momentum = None
        if not self.config.reset_momentum and self.optimizer is not None:
            momentum = [b.clone() for b in self.momentum_buffers()]
        super().reset()
        if momentum:
            with torch.no_grad():
                torch._foreach_copy_(self.momentum_buffers(), momentum)
        self._ema = None

    def stats(self) -> dict[str, Any]:
        history = self.ema_history
        return {"ema": history[-1] if history else None, "resets": len(self.resets), "plans": dict(self.plans)}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["gradient_rows"] = "reliable only" if self.rows_only else "full batch"
        return info
