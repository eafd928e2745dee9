"""come: conservatively minimising entropy, Tent with the entropy of a subjective opinion.

Zhang, Bian, Kong, Zhao, Zhang. "COME: Test-time Adaption by Conservatively Minimizing Entropy",
ICLR 2025. https://arxiv.org/abs/2410.10894
Authors' code: github.com/BlueWhaleLab/COME at 409a19b (``tent_come.py``, settings of ``main.py``).

COME reads the logits z as the evidence of a Dirichlet distribution (alpha_k = exp(z_k) + 1, uniform
prior of total mass K) and minimises the entropy of the subjective opinion it gives: C beliefs
b_k = exp(z_k) / (sum_j exp(z_j) + K) and one uncertainty mass u = K / (sum_j exp(z_j) + K), a
distribution over C + 1 outcomes. Unlike the softmax entropy it is low both for a confident sample
and for one the model knows it cannot judge (all mass on u), so it does not push unreliable samples
to overconfidence. Before the opinion, the logits are rescaled so that the gradient has no
component along their norm (z / ||z|| * ||z||, the second norm detached: same values), which bounds
how far the evidence can grow.

Per batch (Tent with this loss, as the authors' ``Tent_COME``): one forward (the predictions), the
mean opinion entropy of the whole batch as the loss, one backward and one SGD step on the affine
parameters of every norm layer (BatchNorm on batch statistics).

K: the paper's K is the number of classes; the authors' code writes 1000 (ImageNet's) for it
whatever the model, which ``prior_mass=1000`` reproduces on other models (docs/METHODS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tta_cli.methods._registry import register_method
from tta_cli.methods.base import EntropyConfig, StepResult, TTAMethod
from tta_cli.methods.fastpaths import batch_mean
from tta_cli.methods.hyperparameters import greater_than


@dataclass
class COMEConfig(EntropyConfig):
    prior_mass: float | None = field(default=None, metadata=greater_than(0.0))
    """K, the Dirichlet prior's total mass (the uncertainty's evidence); None: the number of classes
    (the paper's K; the authors' code hard-codes 1000, ImageNet's number of classes)."""
    offset: float = field(default=1e-7, metadata=greater_than(0.0))
    """Added to every opinion mass before the log (the authors' 1e-7)."""


def opinion_entropy(logits: torch.Tensor, prior_mass: float, offset: float = 1e-7) -> torch.Tensor:
    """Per-sample entropy of the subjective opinion (C beliefs + 1 uncertainty) from the logits.

    Computed as the authors do (exp without a max shift: logits above ~88 overflow in fp32, as
    theirs do), so that the results match theirs to the last bits."""
    norm = torch.linalg.vector_norm(logits, ord=2, dim=-1, keepdim=True)
    logits = logits / norm * norm.detach()
    evidence = torch.exp(logits)
    strength = evidence.sum(dim=1, keepdim=True) + prior_mass
    opinion = torch.cat([evidence / strength, prior_mass / strength], dim=1) + offset
    return -(opinion * torch.log(opinion)).sum(1)


@register_method
class COME(TTAMethod):
    name = "come"
    config_class = COMEConfig
    amp_aware = True
    config: COMEConfig

    def prior_mass(self, num_classes: int) -> float:
        return self.config.prior_mass if self.config.prior_mass is not None else float(num_classes)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        logits = self.run_model(x)
        entropy = opinion_entropy(logits, self.prior_mass(logits.shape[1]), self.config.offset)
        self.backward(batch_mean(entropy))
        self.optimizer_step()
        self.optimizer.zero_grad()
        used = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return StepResult(logits=logits.detach(), used=used)
