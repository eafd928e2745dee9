"""eta / eata: efficient anti-forgetting test-time adaptation.

Niu, Wu, Zhang, Chen, Zheng, Zhao, Tan. "Efficient Test-Time Model Adaptation without
Forgetting", ICML 2022. https://arxiv.org/abs/2204.02610

Per batch (docs/METHODS.md, "eta / eata"): keep the reliable samples (entropy below E0 = 0.4 ln C), drop those
whose prediction is redundant with the running mean prediction (|cos| >= 0.05), weight the rest by
exp(E0 - E) and minimise their entropy; EATA adds a Fisher-weighted L2 pull towards the source
weights (beta = 2000), the Fisher taken on a small clean set (``compute_fisher``). ETA is EATA
without that term. No sample left, no update.

Speed paths, each exact and tested on its own (``fastpaths``, docs/PERFORMANCE.md): the filters
are masks and the update decision stays on the device, so a step never waits for it; on a
batch-independent model where few samples are kept, the predictions come from a no-grad forward
and only the kept rows are forwarded again with autograd (``reliable_rows="auto"``,
``fastpaths.gradient_rows``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta_cli.methods._registry import register_method
from tta_cli.methods.base import EntropyConfig, StepResult, TTAMethod, softmax_entropy
from tta_cli.methods.collectives import world
from tta_cli.methods.fastpaths import gradient_rows, masked_mean, mean_of_kept_rows, update_if_any
from tta_cli.methods.hyperparameters import at_least, between
from tta_cli.methods.selection import is_batch_independent


@dataclass
class EATAConfig(EntropyConfig):
    margin_factor: float = field(default=0.4, metadata=at_least(0.0))
    """Reliable-sample threshold E0 = margin_factor * ln C."""
    d_margin: float = field(default=0.05, metadata=at_least(0.0))
    """Redundancy threshold on |cos(m, p)|."""
    fisher_alpha: float = field(default=2000.0, metadata=at_least(0.0))
    """beta, the weight of the Fisher regulariser (EATA only)."""
    probs_momentum: float = field(default=0.9, metadata=between(0.0, 1.0))
    reliable_rows: Literal["auto", "off"] = "auto"
    """auto: when the model is batch-independent and few samples are kept, predict with a no-grad
    forward and forward only the kept rows with autograd (same result, less work); off: never."""


@register_method
class ETA(TTAMethod):
    name = "eta"
    data_parallel = True
    resume_attributes = ("model_probs", "_has_probs")
    config_class = EATAConfig
    amp_aware = True
    config: EATAConfig

    def __init__(self, model: nn.Module, config: EATAConfig | None = None, batch_size: int = 64) -> None:
        super().__init__(model, config, batch_size)
        rows_only = self.config.reliable_rows == "auto" and is_batch_independent(model, self.bn_mode)
        # no second forward to shrink: cutting rows pays only after a no-grad first forward
        self.rows = gradient_rows(rows_only, after_grad_forward=False)
        self.model_probs: torch.Tensor | None = None
        """EMA of the mean kept probability vector, m; meaningful where ``_has_probs``."""
        self._has_probs: torch.Tensor | None = None  # on the device, so no step reads it back
        self.fishers: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        # 1. reliable samples S1 = {E < E0}, from the forward that gives the predictions
        logits = self.rows.first_forward(self.run_model, x)
        margin = self.config.margin_factor * math.log(logits.shape[1])
        entropy = softmax_entropy(logits)
        reliable = entropy < margin

        # 2. non-redundant samples S2 = {i in S1 : |cos(m, p_i)| < d}; then update m
        probs = logits.softmax(1)
        keep = reliable & self._not_redundant(probs)
        self._update_model_probs(probs, keep)

        rows = self.rows.rows(x, keep, host=self.reads_are_free(x))
        if rows.count == 0:  # S2 is empty (known on the host): no update
            self.rows.count("nothing reliable")
            return StepResult(logits.detach(), keep, (reliable.sum(), 0))
        self.rows.count(rows.plan)

        # 3. loss: mean over S2 of exp(E0 - E) E, plus EATA's Fisher regulariser
        entropy_rows = rows.with_grad(entropy, lambda r: softmax_entropy(self.run_model(r)))
        weights = 1 / torch.exp(rows.take(entropy).detach() - margin)
        loss, n_used = masked_mean(entropy_rows * weights, rows.selected)

        # 4. backward and step only if S2 is non-empty
        update_if_any(self, loss + self.regulariser(), n_used)
        self.optimizer.zero_grad()
        return StepResult(logits.detach(), keep, (reliable.sum(), n_used))

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
        mean, count = mean_of_kept_rows(probs, keep)
        m = self.config.probs_momentum
        updated = torch.where(self._has_probs, m * self.model_probs + (1 - m) * mean, mean)
        self.model_probs = torch.where(count > 0, updated, self.model_probs)
        self._has_probs = self._has_probs | (count > 0)

    def regulariser(self) -> torch.Tensor | float:
        return 0.0

    @property
    def plans(self) -> dict[str, int]:
        """How many batches ran each plan of gradient passes (``fastpaths.ROW_PLANS``)."""
        return self.rows.plans

    @property
    def rows_only(self) -> bool:
        return self.rows.enabled

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
    clean_data = "the Fisher regulariser"
    without_clean_data = "eta"

    def prepare(self, clean_batches: Iterable[torch.Tensor]) -> int:
        return self.compute_fisher(clean_batches)

    def preparation(self) -> dict[str, Any]:
        """The Fisher information: parameter name -> (diagonal Fisher, source value)."""
        return dict(self.fishers or {})

    def use_preparation(self, prepared: dict[str, Any]) -> None:
        self.fishers = {k: (fisher.clone(), anchor.clone()) for k, (fisher, anchor) in prepared.items()}

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
        # data-parallel: added on one process only, as the gradients are summed over the processes
        if not self.fishers or not world().is_main():
            return 0.0
        total: torch.Tensor | float = 0.0
        for name, param in zip(self.param_names, self.params, strict=False):
            if name in self.fishers:
                fisher, anchor = self.fishers[name]
                total = total + self.config.fisher_alpha * (fisher * (param - anchor) ** 2).sum()
        return total
