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

Speed, with the same results (docs/PERFORMANCE.md):
* the loss EMA and the recovery decision stay on the device (``torch.where``), so a step never
  waits for the device;
* on a batch-independent model (no BatchNorm on batch statistics: LayerNorm, GroupNorm, or
  BatchNorm on source statistics) the unreliable samples contribute nothing to either gradient,
  so the gradient passes run on the reliable rows only (``reliable_rows="auto"``); when few
  samples are reliable the predictions come from a no-grad forward and only the reliable rows are
  forwarded again with autograd;
* a batch with no reliable sample only needs the (zero-gradient) SGD step: its other passes are
  skipped where reading the count is free (CPU, or the reliable-rows path, which reads it anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tta_cli.methods import base, register_method
from tta_cli.methods.base import (
    PENDING_LIMIT,
    EntropyConfig,
    StepResult,
    TTAMethod,
    masked_mean,
    nan_if_empty,
    softmax_entropy,
)
from tta_cli.methods.selection import affine_parameters, is_batch_independent, sar_norm_modules


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
    reliable_rows: str = "auto"
    """auto: gradient passes on the reliable rows only when the model is batch-independent (same
    result, less work); off: always the authors' full-batch passes."""


@register_method
class SAR(TTAMethod):
    name = "sar"
    config_class = SARConfig
    double_lr_at_bs1 = True
    amp_aware = True
    config: SARConfig

    def __init__(self, model: nn.Module, config: SARConfig | None = None, batch_size: int = 64) -> None:
        super().__init__(model, config, batch_size)
        if self.config.reliable_rows not in ("auto", "off"):
            raise ValueError(f"reliable_rows must be 'auto' or 'off', got {self.config.reliable_rows!r}")
        self.rows_only = self.config.reliable_rows == "auto" and is_batch_independent(model, self.bn_mode)
        self._ema: torch.Tensor | None = None  # on the device; NaN stands for "no EMA yet"
        self._ema_pending: list[torch.Tensor] = []
        self._ema_log: list[float] = []
        self._share: float | None = None  # running reliable share, chooses the reliable-rows plan
        self.plans = {"full": 0, "reliable rows": 0, "no-grad first": 0, "nothing reliable": 0}

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        if self.config.layers == "all":
            return affine_parameters(self.model)
        if self.config.layers != "sar":
            raise ValueError(f"layers must be 'sar' or 'all', got {self.config.layers!r}")
        return affine_parameters(self.model, sar_norm_modules(self.model))

    def margin(self, num_classes: int) -> float:
        return self.config.margin_factor * math.log(num_classes)

    def _passes_are_pure(self) -> bool:
        """Forwards have no side effect (the ema statistics are updated by every forward)."""
        return self.bn_mode != "ema"

    # --- one batch --------------------------------------------------------------------------------

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        self.optimizer.zero_grad()
        if self.rows_only:
            return self._adapt_reliable_rows(x)
        return self._adapt_full_batch(x)

    def _adapt_full_batch(self, x: torch.Tensor) -> StepResult:
        """The authors' passes: both forwards over the whole batch (BatchNorm couples the rows)."""
        logits = self.run_model(x)
        margin = self.margin(logits.shape[1])
        entropy = softmax_entropy(logits)
        reliable = entropy < margin
        loss1, n_reliable = masked_mean(entropy, reliable)
        if self.reads_are_free(x) and self._passes_are_pure() and int(n_reliable) == 0:
            return self._nothing_reliable(logits, reliable, n_reliable)
        self.plans["full"] += 1
        self.backward(loss1)
        saved = self._perturb()
        self.optimizer.zero_grad()
        entropy2 = softmax_entropy(self.run_model(x))
        used = reliable & (entropy2 < margin)
        loss2, n_used = masked_mean(entropy2, used)
        self._second_backward_and_step(loss2, n_used, saved, host=self.reads_are_free(x))
        return self._finish(logits, used, n_reliable, n_used, nan_if_empty(loss2, n_used))

    def _adapt_reliable_rows(self, x: torch.Tensor) -> StepResult:
        """Batch-independent model: the unreliable rows get no gradient in either pass, so only the
        reliable rows go through the passes with autograd. Reading their indices is a host sync."""
        no_grad_first = self._share is not None and self._share < base.NO_GRAD_FIRST_BELOW
        with torch.set_grad_enabled(not no_grad_first):
            logits = self.run_model(x)
        margin = self.margin(logits.shape[1])
        entropy = softmax_entropy(logits)
        reliable = entropy < margin
        index = reliable.nonzero().squeeze(1)
        k = index.numel()
        self._share = k / x.shape[0] if self._share is None else 0.8 * self._share + 0.2 * k / x.shape[0]
        n_reliable = reliable.sum()
        if k == 0:
            return self._nothing_reliable(logits, reliable, n_reliable)
        rows = x if k == x.shape[0] else x.index_select(0, index)
        if no_grad_first:
            self.plans["no-grad first"] += 1
            loss1 = softmax_entropy(self.run_model(rows)).mean(0)
        else:
            self.plans["reliable rows"] += 1
            loss1 = entropy.index_select(0, index).mean(0)  # the authors' entropy[reliable].mean(0)
        self.backward(loss1)
        saved = self._perturb()
        self.optimizer.zero_grad()
        entropy2 = softmax_entropy(self.run_model(rows))
        kept = entropy2 < margin
        loss2, n_used = masked_mean(entropy2, kept)
        self._second_backward_and_step(loss2, n_used, saved, host=self.reads_are_free(x))
        used = torch.zeros_like(reliable).index_put_((index,), kept)
        return self._finish(logits, used, n_reliable, n_used, nan_if_empty(loss2, n_used))

    def _nothing_reliable(self, logits: torch.Tensor, reliable: torch.Tensor,
                          n_reliable: torch.Tensor) -> StepResult:
        """No reliable sample: both losses are empty means, so their backwards give zero gradients,
        the perturbation is zero and the EMA is unchanged; what is left is the SGD step with zero
        gradients (momentum still moves the weights), which is all this does."""
        self.plans["nothing reliable"] += 1
        if not self.config.skip_empty:
            for param in self.params:
                param.grad = torch.zeros_like(param)
            self.optimizer_step()
            self.optimizer.zero_grad()
        nan = torch.full((), math.nan, device=logits.device)
        return self._finish(logits, reliable, n_reliable, n_reliable, nan)

    def _second_backward_and_step(self, loss2: torch.Tensor, n_used: torch.Tensor,
                                  saved: list[torch.Tensor], host: bool) -> None:
        """Gradient at theta + eps, back to theta, SGD step (skipped on empty with skip_empty)."""
        if host and int(n_used) == 0:
            for param in self.params:  # what the backward of an empty mean gives
                param.grad = torch.zeros_like(param)
        else:
            self.backward(loss2)
        with torch.no_grad():
            torch._foreach_copy_(self.params, saved)
        if self.config.skip_empty:
            self.optimizer_step_if(n_used > 0)
        else:
            self.optimizer_step()
        self.optimizer.zero_grad()

    def _finish(self, logits: torch.Tensor, used: torch.Tensor, n_reliable: torch.Tensor,
                n_used: torch.Tensor, loss2: torch.Tensor) -> StepResult:
        collapsed = self._recover_if_collapsed(loss2)
        return StepResult(logits.detach(), used, (n_reliable, n_used), collapsed)

    @torch.no_grad()
    def _perturb(self) -> list[torch.Tensor]:
        """Move to theta + rho g / (||g|| + 1e-12), ||g|| the global norm; return theta."""
        saved = [p.detach().clone() for p in self.params]
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return saved
        grads = [p.grad for p in with_grad]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        scale = self.config.rho / (grad_norm + 1e-12)
        torch._foreach_add_(with_grad, torch._foreach_mul(grads, scale))
        return saved

    # --- model recovery ---------------------------------------------------------------------------

    @torch.no_grad()
    def _recover_if_collapsed(self, loss2: torch.Tensor) -> torch.Tensor:
        """Update the EMA with the second loss and restore the source model below the threshold.

        All on the device, in float64 as the authors' Python float (float32 on MPS): a NaN loss
        (empty selection) leaves the EMA unchanged, NaN stands for "no EMA", and the restore is a
        ``torch.where``. Returns the recovery flag (a 0-dim bool tensor, read later).
        """
        dtype = torch.float32 if loss2.device.type == "mps" else torch.float64
        value = loss2.detach().to(dtype)
        ema = self._ema if self._ema is not None else torch.full_like(value, math.nan)
        momentum = self.config.ema_momentum
        blended = momentum * ema + (1 - momentum) * value
        ema = torch.where(value.isnan(), ema, torch.where(ema.isnan(), value, blended))
        self._log_ema(ema)
        collapsed = ema < self.config.reset_threshold  # false while there is no EMA (NaN)
        self.reset_where(collapsed, momentum=self.config.reset_momentum)
        self._ema = torch.where(collapsed, torch.full_like(ema, math.nan), ema)
        self.record_reset(collapsed)
        return collapsed

    def _log_ema(self, ema: torch.Tensor) -> None:
        self._ema_pending.append(ema)
        if len(self._ema_pending) >= PENDING_LIMIT:
            self.settle()

    def settle(self) -> None:
        super().settle()
        if self._ema_pending:
            values = torch.stack(self._ema_pending).cpu().tolist()
            self._ema_log += [v for v in values if not math.isnan(v)]
            self._ema_pending.clear()

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
        self.settle()
        return self._ema_log

    def reset(self) -> None:
        momentum = None
        if not self.config.reset_momentum and self.optimizer is not None:
            momentum = [b.clone() for b in self._momentum_buffers()]
        super().reset()
        if momentum:
            with torch.no_grad():
                torch._foreach_copy_(self._momentum_buffers(), momentum)
        self._ema = None

    def stats(self) -> dict[str, Any]:
        history = self.ema_history
        return {"ema": history[-1] if history else None, "resets": len(self.resets), "plans": dict(self.plans)}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["gradient_rows"] = "reliable only" if self.rows_only else "full batch"
        return info
