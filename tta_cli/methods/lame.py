"""lame: Laplacian-adjusted maximum-likelihood estimation, output-only test-time adaptation.

Boudiaf, Mueller, Ben Ayed, Bertinetto. "Parameter-free Online Test-time Adaptation", CVPR 2022.
https://arxiv.org/abs/2201.05718
As run by github.com/mariodoebler/test-time-adaptation (``methods/lame.py``, from fiveai/LAME).

Nothing is learned: the model stays the source model (eval mode, source BatchNorm statistics).
Per batch (spec section 4): the pooled features f and the class probabilities of the model; a
B x B affinity K between the L2-normalised features (rbf, kNN or linear); then the assignments Y
that minimise the Laplacian-regularised energy
    sum_i [ -Y_i log p_i - lambda sum_j K_ij Y_i Y_j + Y_i log Y_i ]
by the bound-optimisation fixed point Y <- softmax(log p + lambda K Y), at most 100 steps.
The method returns Y, probabilities; as logits it returns log Y, so that softmax(log Y) = Y.

When to use it: LAME assumes that the images of a batch that look alike share a class, and pulls
each prediction towards its neighbours'. That holds on non-i.i.d. streams (a camera or a video
seeing one scene at a time, a label-shifted stream with few classes per batch: the paper's
setting), where it helps. On an i.i.d. stream, where a batch mixes all classes, it drags whole
batches onto a few classes: on ``sample_data`` at ``-b 64`` accuracy falls from 48.8% to 9.1% and the
health verdict says ``suspect``. A batch of one image has no neighbour: LAME then predicts as the
model (the rbf kernel's bandwidth would be 0 / 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from tta_cli.errors import TTAError
from tta_cli.methods._registry import register_method
from tta_cli.methods.base import MethodConfig, StepResult, TTAMethod
from tta_cli.methods.collectives import world
from tta_cli.methods.hyperparameters import at_least

Affinity = Literal["rbf", "knn", "linear"]


@dataclass
class LAMEConfig(MethodConfig):
    bn_stats: Literal["source"] = "source"
    """LAME never changes the model: its BatchNorm layers keep the source statistics."""
    affinity: Affinity = "rbf"
    """rbf (MD's default, dense), knn (the paper's: 5 nearest neighbours, binary) or linear."""
    knn: int = field(default=5, metadata=at_least(1))
    """knn: neighbours per sample; rbf: sigma is the mean distance to the knn-th closest point
    (the point itself counts)."""
    force_symmetry: bool = False
    """Use (K + K^T) / 2 (the kNN affinity is not symmetric)."""
    bound_lambda: float = field(default=1.0, metadata=at_least(0.0))
    """Weight of the Laplacian term."""
    max_steps: int = field(default=100, metadata=at_least(1))


@register_method
class LAME(TTAMethod):
    name = "lame"
    data_parallel = True
    config_class = LAMEConfig
    updates_parameters = False
    predicts_first_forward = False
    """Its outputs are the adjusted assignments (as log-probabilities), not the model's logits."""
    config: LAMEConfig

    def __init__(self, model: nn.Module, config: LAMEConfig | None = None, batch_size: int = 64) -> None:
        config = config if config is not None else LAMEConfig()
        if config.affinity not in get_args(Affinity):
            raise TTAError(f"invalid value {config.affinity!r} for affinity",
                           f"choose from {', '.join(get_args(Affinity))}")
        super().__init__(model, config, batch_size)

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        local_features, local_logits = self.features_and_logits(x)
        # the affinity is over the whole batch: data-parallel, every process gathers the global
        # batch's features and logits (B x D, small), solves for all rows alike and keeps its own
        features, logits = world().gather_rows(local_features), world().gather_rows(local_logits)
        first, _ = world().row_span(x.shape[0])
        log_probs = lame_log_probs(features, logits, self.config)[first:first + x.shape[0]]
        used = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return StepResult(logits=log_probs, used=used)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled pre-logits features and the logits, through timm's own split of the model."""
        feature_map = self.model.forward_features(x)
        features = self.model.forward_head(feature_map, pre_logits=True)
        return features.float(), self.model.get_classifier()(features).float()


def lame_log_probs(features: torch.Tensor, logits: torch.Tensor, config: LAMEConfig) -> torch.Tensor:
    """LAME's assignments for a batch's pooled features and logits, as log-probabilities."""
    unary = -torch.log(logits.softmax(dim=1) + 1e-10)
    kernel = affinity_matrix(F.normalize(features, p=2, dim=-1), config.affinity, config.knn)
    if config.force_symmetry:
        kernel = 1 / 2 * (kernel + kernel.t())
    assignments = laplacian_optimization(unary, kernel, config.bound_lambda, config.max_steps)
    # log of an exact 0 would make the engine's entropy 0 * -inf = NaN; tiny changes nothing else
    return assignments.clamp(min=torch.finfo(assignments.dtype).tiny).log()


def affinity_matrix(features: torch.Tensor, kind: str, knn: int) -> torch.Tensor:
    """B x B affinity between L2-normalised features (spec section 4, MD's ops)."""
    if kind == "linear":
        return torch.matmul(features, features.t())
    n = features.size(0)
    dist = torch.norm(features.unsqueeze(0) - features.unsqueeze(1), dim=-1, p=2)
    if kind == "knn":
        neighbours = dist.topk(min(knn + 1, n), -1, largest=False).indices[:, 1:]  # drop the point itself
        kernel = torch.zeros(n, n, device=features.device)
        kernel.scatter_(dim=-1, index=neighbours, value=1.0)
        return kernel
    if n < 2:  # one image has no neighbour: LAME predicts as the model (sigma would be 0 / 0)
        return torch.zeros(n, n, device=features.device)
    kth_dist = dist.topk(k=min(knn, n), dim=-1, largest=False).values[:, -1]
    sigma = kth_dist.mean()
    if not sigma > 0:  # identical features: all neighbours (the kernel would be 0 / 0)
        return torch.ones(n, n, device=features.device)
    return torch.exp(-dist ** 2 / (2 * sigma ** 2))


def laplacian_optimization(unary: torch.Tensor, kernel: torch.Tensor, bound_lambda: float = 1.0,
                           max_steps: int = 100) -> torch.Tensor:
    """Fixed-point iterations Y <- softmax(-unary + lambda K Y) until the energy stops changing
    (relative change <= 1e-8 after the third step)."""
    old_energy = float("inf")
    assignments = (-unary).softmax(-1)
    for step in range(max_steps):
        pairwise = bound_lambda * kernel.matmul(assignments)
        assignments = (-unary + pairwise).softmax(-1)
        energy = entropy_energy(assignments, unary, pairwise, bound_lambda)
        if step > 1 and abs(energy - old_energy) <= 1e-8 * abs(old_energy):
            break
        old_energy = energy
    return assignments


def entropy_energy(assignments: torch.Tensor, unary: torch.Tensor, pairwise: torch.Tensor,
                   bound_lambda: float) -> float:
    y = assignments
    return float((unary * y - bound_lambda * pairwise * y + y * torch.log(y.clip(1e-20))).sum())
