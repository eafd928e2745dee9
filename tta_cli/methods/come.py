"""come: conservatively minimising entropy, the entropy of a subjective opinion in Tent or SAR.

Zhang, Bian, Kong, Zhao, Zhang. "COME: Test-time Adaption by Conservatively Minimizing Entropy",
ICLR 2025. https://arxiv.org/abs/2410.10894
Authors' code: github.com/BlueWhaleLab/COME at 409a19b (``tent_come.py``, ``sar_come.py``,
settings of ``main.py``).

COME reads the logits z as the evidence of a Dirichlet distribution (alpha_k = exp(z_k) + 1, uniform
prior of total mass K) and minimises the entropy of the subjective opinion it gives: C beliefs
b_k = exp(z_k) / (sum_j exp(z_j) + K) and one uncertainty mass u = K / (sum_j exp(z_j) + K), a
distribution over C + 1 outcomes. Unlike the softmax entropy it is low both for a confident sample
and for one the model knows it cannot judge (all mass on u), so it does not push unreliable samples
to overconfidence. Before the opinion, the logits are rescaled so that the gradient has no
component along their norm (z / ||z|| * ||z||, the second norm detached: same values), which bounds
how far the evidence can grow.

It replaces the softmax entropy of an entropy method ("a drop-in replacement"), everywhere that
method uses it:
* ``base=tent`` (default, the authors' ``Tent_COME``): one forward (the predictions), the mean
  opinion entropy of the whole batch as the loss, one SGD step on every norm layer's affine
  parameters (BatchNorm on batch statistics);
* ``base=sar`` (``SAR_COME``): SAR's step (``sar.py``: reliable filter E < 0.4 ln C, SAM, second
  filter, model recovery when the EMA of the second loss falls below 0.2, SAR's layers) with the
  opinion entropy for E in every place.

K: the paper's K is the number of classes; the authors' code writes 1000 (ImageNet's) for it
whatever the model, which ``prior_mass=1000`` reproduces on other models (docs/METHODS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from tta_cli.errors import TTAError
from tta_cli.methods._registry import register_method
from tta_cli.methods.base import StepResult
from tta_cli.methods.fastpaths import batch_mean, nan_aware_ema
from tta_cli.methods.hyperparameters import greater_than
from tta_cli.methods.sar import SAR, SARConfig
from tta_cli.methods.selection import affine_parameters, sar_norm_modules

Base = Literal["tent", "sar"]
RecoveryEMA = Literal["keep", "clear"]


@dataclass
class COMEConfig(SARConfig):
    base: Base = "tent"
    """The entropy method whose entropy COME replaces: tent, or sar (its fields below apply)."""
    prior_mass: float | None = field(default=None, metadata=greater_than(0.0))
    """K, the Dirichlet prior's total mass (the uncertainty's evidence); None: the number of classes
    (the paper's K; the authors' code hard-codes 1000, ImageNet's number of classes)."""
    offset: float = field(default=1e-7, metadata=greater_than(0.0))
    """Added to every opinion mass before the log (the authors' 1e-7)."""
    layers: Literal["auto", "sar", "all"] = "auto"
    """auto: every norm layer for tent, SAR's rule for sar; sar or all as named."""
    recovery_ema: RecoveryEMA = "keep"
    """sar: keep (the authors' code): the EMA keeps its collapsed value through a recovery, so the
    model is recovered again after every batch until it climbs back above the threshold; clear:
    it restarts, as in tta's sar."""


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
class COME(SAR):
    name = "come"
    config_class = COMEConfig
    double_lr_at_bs1 = False  # the authors' main.py keeps SAR's rule without doubling, for both bases
    config: COMEConfig

    def __init__(self, model: nn.Module, config: COMEConfig | None = None, batch_size: int = 64) -> None:
        config = config if config is not None else COMEConfig()
        for key, choices in (("base", Base), ("recovery_ema", RecoveryEMA)):
            value = getattr(config, key)
            if value not in get_args(choices):
                raise TTAError(f"invalid value {value!r} for {key}", f"choose from {', '.join(get_args(choices))}")
        super().__init__(model, config, batch_size)

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        layers = self.config.layers if self.config.layers != "auto" else ("sar" if self.config.base == "sar" else "all")
        if layers == "all":
            return affine_parameters(self.model)
        return affine_parameters(self.model, sar_norm_modules(self.model))

    def sample_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """The opinion's entropy in place of the softmax's (in both bases)."""
        prior_mass = self.config.prior_mass if self.config.prior_mass is not None else float(logits.shape[1])
        return opinion_entropy(logits, prior_mass, self.config.offset)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        return super().forward_and_adapt(x) if self.config.base == "sar" else self._tent_step(x)

    def _tent_step(self, x: torch.Tensor) -> StepResult:
        logits = self.run_model(x)
        self.backward(batch_mean(self.sample_entropy(logits)))
        self.optimizer_step()
        self.optimizer.zero_grad()
        used = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return StepResult(logits=logits.detach(), used=used)

    @torch.no_grad()
    def _recover_if_collapsed(self, loss2: torch.Tensor) -> torch.Tensor:
        """SAR's recovery; with ``recovery_ema=keep`` the EMA survives it, as in the authors' code
        (their ``reset()`` sets it to None, and the caller then stores the collapsed value again)."""
        if self.config.recovery_ema == "clear":
            return super()._recover_if_collapsed(loss2)
        ema = nan_aware_ema(self._ema, loss2, self.config.ema_momentum)
        self._ema_log.add(self.batches_seen, ema)
        collapsed = ema < self.config.reset_threshold
        self.reset_where(collapsed, momentum=self.config.reset_momentum)
        self._ema = ema
        self.record_reset(collapsed)
        return collapsed
