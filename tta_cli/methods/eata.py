"""eta / eata: efficient anti-forgetting test-time adaptation.

Niu, Wu, Zhang, Chen, Zheng, Zhao, Tan. "Efficient Test-Time Model Adaptation without
Forgetting", ICML 2022. https://arxiv.org/abs/2204.02610

Per batch (spec section 2): keep the reliable samples (entropy below E0 = 0.4 ln C), drop those
whose prediction is redundant with the running mean prediction (|cos| >= 0.05), weight the rest by
exp(E0 - E) and minimise their entropy; EATA adds a Fisher-weighted L2 pull towards the source
weights (beta = 2000), the Fisher taken on a small clean set (``compute_fisher``). ETA is EATA
without that term. No sample left, no update.

Speed, with the same results (docs/PERFORMANCE.md): the filters are masks, so a step never waits
for the device; on a batch-independent model (no BatchNorm on batch statistics) where few samples
are kept, the predictions come from a no-grad forward and only the kept rows are forwarded again
with autograd (``reliable_rows="auto"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta_cli.methods import base, register_method
from tta_cli.methods.base import (
    EntropyConfig,
    StepResult,
    TTAMethod,
    masked_mean,
    softmax_entropy,
)
from tta_cli.methods.selection import is_batch_independent


@dataclass
class EATAConfig(EntropyConfig):
    margin_factor: float = 0.4
    """Reliable-sample threshold E0 = margin_factor * ln C."""
    d_margin: float = 0.05
    """Redundancy threshold on |cos(m, p)|."""
    fisher_alpha: float = 2000.0
    """beta, the weight of the Fisher regulariser (EATA only)."""
    probs_momentum: float = 0.9
    reliable_rows: str = "auto"
    """auto: when the model is batch-independent and few samples are kept, predict with a no-grad
    forward and forward only the kept rows with autograd (same result, less work); off: never."""


@register_method
class ETA(TTAMethod):
    name = "eta"
    config_class = EATAConfig
    amp_aware = True
    config: EATAConfig

    def __init__(self, model: nn.Module, config: EATAConfig | None = None, batch_size: int = 64) -> None:
        super().__init__(model, config, batch_size)
        if self.config.reliable_rows not in ("auto", "off"):
            raise ValueError(f"reliable_rows must be 'auto' or 'off', got {self.config.reliable_rows!r}")
        self.rows_only = self.config.reliable_rows == "auto" and is_batch_independent(model, self.bn_mode)
        self._share: float | None = None  # running kept share, chooses the kept-rows plan
        self.model_probs: torch.Tensor | None = None
        """EMA of the mean kept probability vector, m; meaningful where ``_has_probs``."""
        self._has_probs: torch.Tensor | None = None  # on the device, so no step reads it back
        self.fishers: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        if self.rows_only and self._share is not None and self._share < base.NO_GRAD_FIRST_BELOW:
            return self._adapt_kept_rows(x)
        result = self._adapt_masked(x)
        if self.rows_only:  # the plan needs the kept share (a host read; this path syncs anyway)
            self._track_share(int(result.filtered[1]), x.shape[0])
        return result

    @torch.enable_grad()
    def _adapt_masked(self, x: torch.Tensor) -> StepResult:
        # Filters are masks over the whole batch rather than index selections, which would need
        # the selected count on the host (a sync on a GPU); every per-sample value is row-wise.
        logits = self.run_model(x)
        margin, entropy, reliable, keep = self._filter(logits)
        weights = 1 / torch.exp(entropy.detach() - margin)
        loss, n_used = masked_mean(entropy * weights, keep)
        self._update(loss + self.regulariser(), n_used)
        self.optimizer.zero_grad()
        return StepResult(logits.detach(), keep, (reliable.sum(), n_used))

    @torch.no_grad()
    def _adapt_kept_rows(self, x: torch.Tensor) -> StepResult:
        """Batch-independent model: the predictions and both filters need no gradient, and only the
        kept rows contribute to the loss, so only they are forwarded again, with autograd."""
        logits = self.run_model(x)
        margin, entropy, reliable, keep = self._filter(logits)
        index = keep.nonzero().squeeze(1)
        self._track_share(index.numel(), x.shape[0])
        if index.numel():
            with torch.enable_grad():
                kept_entropy = softmax_entropy(self.run_model(x.index_select(0, index)))
                weights = 1 / torch.exp(entropy.index_select(0, index) - margin)
                self.backward((kept_entropy * weights).mean(0) + self.regulariser())
            self.optimizer_step()
            self.optimizer.zero_grad()
        return StepResult(logits, keep, (reliable.sum(), keep.sum()))

    def _filter(self, logits: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """E0, the entropies, the reliable mask and the kept (reliable, non-redundant) mask; updates m."""
        margin = self.config.margin_factor * math.log(logits.shape[1])
        entropy = softmax_entropy(logits)
        reliable = entropy < margin
        probs = logits.softmax(1)
        keep = reliable & self._not_redundant(probs)
        self._update_model_probs(probs, keep)
        return margin, entropy, reliable, keep

    def _track_share(self, kept: int, batch: int) -> None:
        share = kept / batch
        self._share = share if self._share is None else 0.8 * self._share + 0.2 * share

    def _not_redundant(self, probs: torch.Tensor) -> torch.Tensor:
        """|cos(m, p_i)| < d_margin, or every sample while there is no m yet."""
        if self.model_probs is None:
            self.model_probs = probs.new_zeros(probs.shape[1])
            self._has_probs = torch.zeros((), dtype=torch.bool, device=probs.device)
        cosine = F.cosine_similarity(self.model_probs.unsqueeze(0), probs.detach(), dim=1)
        return ~self._has_probs | (cosine.abs() < self.config.d_margin)

    @torch.no_grad()
    def _update_model_probs(self, probs: torch.Tensor, keep: torch.Tensor) -> None:
        """m <- 0.9 m + 0.1 mean of the kept p (the mean itself the first time; unchanged if none)."""
        count = keep.sum()
        zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
        mean = torch.where(keep.unsqueeze(1), probs, zero).sum(0) / count.clamp(min=1)
        m = self.config.probs_momentum
        updated = torch.where(self._has_probs, m * self.model_probs + (1 - m) * mean, mean)
        self.model_probs = torch.where(count > 0, updated, self.model_probs)
        self._has_probs = self._has_probs | (count > 0)

    def _update(self, loss: torch.Tensor, n_used: torch.Tensor) -> None:
        """Backward and step only if a sample is kept (the authors'), without a sync on a GPU."""
        if self.reads_are_free(n_used):
            if int(n_used):
                self.backward(loss)
                self.optimizer_step()
            return
        self.backward(loss)
        self.optimizer_step_if(n_used > 0)

    def regulariser(self) -> torch.Tensor | float:
        return 0.0

    def reset(self) -> None:
        super().reset()
        self.model_probs = None
        self._has_probs = None

    def stats(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["gradient_rows"] = "kept only (when few)" if self.rows_only else "full batch"
        return info


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
        named = list(zip(self.param_names, self.params, strict=False))
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
        for name, param in zip(self.param_names, self.params, strict=False):
            if name in self.fishers:
                fisher, anchor = self.fishers[name]
                total = total + self.config.fisher_alpha * (fisher * (param - anchor) ** 2).sum()
        return total
