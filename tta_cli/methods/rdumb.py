"""rdumb: ETA with a periodic reset to the source model.

Press, Schneider, Kümmerer, Bethge. "RDumb: A simple approach that questions our progress in
continual test-time adaptation", NeurIPS 2023. https://arxiv.org/abs/2306.05401
As run by github.com/mariodoebler/test-time-adaptation (``cfgs/*/rdumb.yaml``): that repository's
EATA class with the Fisher weight 0 (ETA) and ``RESET_AFTER_NUM_UPDATES``.

Per batch (docs/METHODS.md, "rdumb"): ETA (``eata.py``: reliable filter E < E0 = 0.4 ln C, redundancy filter
against the EMA of the kept probabilities, entropy weighted by 1/exp(E - E0), update only if a sample
is left), with Adam (lr 1e-3); after every ``reset_every``-th batch, counted whether or not it
updated, the model, the Adam state and the EMA go back to the source. The batch's predictions are
the ones made before its reset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from tta_cli.methods._registry import register_method
from tta_cli.methods.base import StepResult
from tta_cli.methods.eata import ETA, EATAConfig
from tta_cli.methods.hyperparameters import at_least, between, greater_than

CIFAR_SIZE_CLASSES = 100
"""Up to this many classes the CIFAR redundancy margin applies (MD: 0.4 on CIFAR-10/100-C, 0.05 on
ImageNet-C and CCC; 0.1 on DomainNet-126, an outlier not followed here)."""


@dataclass
class RDumbConfig(EATAConfig):
    lr: float | None = field(default=1e-3, metadata=greater_than(0.0))
    """Adam learning rate (MD's CIFAR configuration)."""
    d_margin: float | None = field(default=None, metadata=at_least(0.0))
    """Redundancy threshold on |cos(m, p)|; None: 0.4 up to 100 classes, else 0.05 (MD's configs)."""
    fisher_alpha: float = field(default=0.0, metadata=at_least(0.0))
    beta1: float = field(default=0.9, metadata=between(0.0, 1.0, high_inclusive=False))
    reset_every: int = field(default=1000, metadata=at_least(0))
    """Reset to the source after every this many batches (0: never)."""


def redundancy_margin(num_classes: int) -> float:
    return 0.4 if num_classes <= CIFAR_SIZE_CLASSES else 0.05


@register_method
class RDumb(ETA):
    name = "rdumb"
    resume_attributes = ("adaptation_steps",)
    config_class = RDumbConfig
    config: RDumbConfig

    def __init__(self, model: nn.Module, config: RDumbConfig | None = None, batch_size: int = 64) -> None:
        config = config if config is not None else RDumbConfig()
        if config.d_margin is None:
            config = dataclasses.replace(config, d_margin=redundancy_margin(_num_classes(model)))
        if config.reset_every < 0:
            raise ValueError(f"reset_every must be >= 0, got {config.reset_every}")
        super().__init__(model, config, batch_size)
        self.adaptation_steps = 0

    def build_optimizer(self) -> torch.optim.Optimizer:
        # foreach: one kernel per op for all tensors, the same updates with less per-tensor overhead
        return torch.optim.Adam(self.params, lr=self.lr, betas=(self.config.beta1, 0.999), weight_decay=0.0,
                                foreach=True)

    def reads_are_free(self, tensor: torch.Tensor) -> bool:
        # Adam's moments and step count cannot be undone like SGD's momentum, so the "update only
        # if a sample is left" decision is always taken on the host (a sync per batch on a GPU)
        return True

    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        result = super().forward_and_adapt(x)
        self.adaptation_steps += 1
        if self.config.reset_every and self.adaptation_steps % self.config.reset_every == 0:
            self.reset()
            self.record_reset(True)
            result.reset = True
        return result


def _num_classes(model: nn.Module) -> int:
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and classes > 0:
        return classes
    raise ValueError("rdumb needs the model's number of classes (model.num_classes) to choose d_margin")
