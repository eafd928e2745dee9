"""roid: universal test-time adaptation through weight ensembling, diversity weighting and prior correction.

Marsden, Doebler, Yang. "Universal Test-time Adaptation through Weight Ensembling, Diversity
Weighting, and Prior Correction", WACV 2024. https://arxiv.org/abs/2306.00650 (the authors' code:
mariodoebler/test-time-adaptation, ``roid.py``; spec section 4).

Per batch, on the norm layers' affine parameters (BatchNorm on batch statistics):

1. z = model(x); diversity d_i = 1 - cos(p_ema, softmax(z_i)) and certainty c_i = -entropy(z_i),
   each min-max normalised over the batch; samples with d_i below the batch mean are dropped;
   w_i = exp(d_i c_i / T) for the kept; p_ema <- 0.9 p_ema + 0.1 mean_batch softmax(z);
2. loss = sum_kept w_i SLR(z_i) / B, the soft likelihood ratio SLR = -sum_c p_c log(p_c / (1 - p_c))
   with p clamped to 0.99;
3. consistency: + sum_kept w_i SCE(model(A-(x_i)), z_i) / B, symmetric cross-entropy to the
   prediction on an augmented view (A-: CoTTA's augmentation without blur and noise);
4. one Adam step; weight ensembling theta <- 0.99 theta + 0.01 theta_source;
5. prior correction: the returned predictions are z * pi', pi' the smoothed batch prior (the
   authors multiply the logits, not the probabilities).

At batch size 1 the min-max normalisation over the batch is 0 / 0 (in the authors' code every
update is then non-finite): here a batch of one image is used for no update, so ROID at ``-b 1``
predicts with batch statistics and the prior correction only, as the guard left it before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta_cli.methods._registry import register_method
from tta_cli.methods.augment import AUGMENTATION_A_MINUS, Normalization
from tta_cli.methods.base import StepResult, TTAMethod, softmax_entropy
from tta_cli.methods.collectives import world
from tta_cli.methods.hyperparameters import between, greater_than
from tta_cli.methods.teacher import AdamConfig, build_adam_or_sgd, ema_update


@dataclass
class ROIDConfig(AdamConfig):
    """MD's defaults (CIFAR-10-C: Adam 1e-3; ImageNet-C: optimizer=sgd, lr=0.00025)."""

    use_weighting: bool = True
    use_prior_correction: bool = True
    use_consistency: bool = True
    source_momentum: float = field(default=0.99, metadata=between(0.0, 1.0))
    """Weight ensembling: theta <- m theta + (1 - m) theta_source after every step."""
    probs_momentum: float = field(default=0.9, metadata=between(0.0, 1.0))
    temperature: float = field(default=1 / 3, metadata=greater_than(0.0))


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    probs = logits.softmax(1).clamp(min=0.0, max=clip)
    return -(probs * torch.log(probs / (torch.ones_like(probs) - probs) + eps)).sum(1)


def symmetric_cross_entropy(x: torch.Tensor, x_ref: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    return (-(1 - alpha) * (x_ref.softmax(1) * x.log_softmax(1)).sum(1)
            - alpha * (x.softmax(1) * x_ref.log_softmax(1)).sum(1))


def min_max(values: torch.Tensor) -> torch.Tensor:
    """Scaled to [0, 1] over the batch; all 0 where every value is the same (a batch of one image,
    where the authors' formula gives 0 / 0 and every update would be non-finite and undone)."""
    spread = values.max() - values.min()
    return torch.where(spread > 0, (values - values.min()) / spread, torch.zeros_like(values))


def prior_correction(logits: torch.Tensor) -> torch.Tensor:
    """Logits times the smoothed batch prior pi' = (pi + s) / (1 + s C), s = max(1/B, 1/C) / max(pi)."""
    batch, classes = logits.shape
    prior = logits.softmax(1).mean(0)
    smooth = max(1 / batch, 1 / classes) / torch.max(prior)
    return logits * ((prior + smooth) / (1 + smooth * classes))


@register_method
class ROID(TTAMethod):
    name = "roid"
    data_parallel = True
    resume_attributes = ("class_probs",)
    config_class = ROIDConfig
    amp_aware = True
    predicts_first_forward = False
    """With prior correction the predictions are the first forward's logits times the batch prior."""
    config: ROIDConfig

    def __init__(self, model: nn.Module, config: ROIDConfig | None = None, batch_size: int = 64) -> None:
        super().__init__(model, config, batch_size)
        self.normalization = Normalization.of(model)
        self.class_probs: torch.Tensor | None = None
        self.reseed(0)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return build_adam_or_sgd(self.params, self.config, self.lr)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        logits = self.run_model(x)
        # the weights, the EMA and the prior are over the whole batch: data-parallel, every process
        # computes them on the global batch's logits (B x C, gathered) and takes its own rows
        all_logits = world().gather_rows(logits.detach())
        first, _ = world().row_span(x.shape[0])
        rows = slice(first, first + x.shape[0])
        weights, drop = (t[rows] for t in self.sample_weights(all_logits))
        keep = ~drop
        loss_per_sample = soft_likelihood_ratio(logits)
        if self.config.use_weighting:
            loss_per_sample = loss_per_sample * weights
        loss = loss_per_sample[keep].sum() / self.batch_size
        if self.config.use_consistency and bool(world().sum(keep.sum()) > 0):  # x[keep] synchronises anyway
            kept = x[keep]
            augmented = self.normalization.augment(kept, self.generator, AUGMENTATION_A_MINUS,
                                                   world().row_span(kept.shape[0]))
            consistency = symmetric_cross_entropy(self.run_model(augmented), logits[keep])
            if self.config.use_weighting:
                consistency = consistency * weights[keep]
            loss = loss + consistency.sum() / self.batch_size
        self.backward(loss)
        self.optimizer_step()
        self.optimizer.zero_grad()
        ema_update(self.params, self.source.params, self.config.source_momentum)
        with torch.no_grad():
            predictions = self.predictions_from(all_logits)[rows]
        return StepResult(logits=predictions, used=keep)

    def predictions_from(self, logits: torch.Tensor) -> torch.Tensor:
        return prior_correction(logits) if self.config.use_prior_correction else logits

    @torch.no_grad()
    def sample_weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, dropped): diversity times certainty weights, and the samples of below-mean diversity.
        Updates the EMA of the mean prediction over the whole batch."""
        if not self.config.use_weighting:
            return torch.ones_like(logits[:, 0]), torch.zeros_like(logits[:, 0], dtype=torch.bool)
        if logits.shape[0] < 2:  # one image has no diversity to weight: no update (measured: updating
            # on single images anyway took the sample_data stream from 53% to 18%)
            return torch.zeros_like(logits[:, 0]), torch.ones_like(logits[:, 0], dtype=torch.bool)
        probs = logits.softmax(1)
        if self.class_probs is None:
            self.class_probs = 1 / logits.shape[1] * torch.ones(logits.shape[1], device=logits.device)
        diversity = min_max(1 - F.cosine_similarity(self.class_probs.unsqueeze(0), probs, dim=1))
        drop = diversity < diversity.mean()
        certainty = min_max(-softmax_entropy(logits))
        weights = torch.exp(diversity * certainty / self.config.temperature)
        weights[drop] = 0.0
        m = self.config.probs_momentum
        self.class_probs = m * self.class_probs + (1 - m) * probs.mean(0)
        return weights, drop

    @torch.no_grad()
    def reset(self) -> None:
        super().reset()
        self.class_probs = None

    def stats(self) -> dict[str, Any]:
        return {}
