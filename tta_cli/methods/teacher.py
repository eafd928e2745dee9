"""Shared pieces of the teacher-student and Adam-based methods (RoTTA, CoTTA, ROID).

* ``AdamConfig`` and ``build_adam_or_sgd``: the optimiser of MD's configurations
  (`mariodoebler/test-time-adaptation`): Adam, lr 1e-3, betas (0.9, 0.999), no weight decay on
  CIFAR-10-C; on ImageNet-C its configs use SGD (momentum 0.9, **Nesterov**, no weight decay).
* ``ema_update``: the mean teacher, teacher <- m * teacher + (1 - m) * other, with MD's arithmetic.
* ``RobustBatchNorm``: RoTTA's robust BatchNorm, kept in the BN modules' own buffers so that the model
  stays a plain timm model (its state dict loads strictly) and exports the statistics it predicts with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from tta_cli.methods.base import EntropyConfig
from tta_cli.methods.collectives import world
from tta_cli.methods.hyperparameters import at_least, between, greater_than
from tta_cli.methods.selection import is_batchnorm


@dataclass
class AdamConfig(EntropyConfig):
    """Hyperparameters of the methods that MD runs with Adam on CIFAR-10-C."""

    lr: float | None = field(default=1e-3, metadata=greater_than(0.0))
    """Adam 1e-3 (MD's CIFAR configs). ImageNet-C configs: SGD 2.5e-4 (ROID), 0.01 (CoTTA), Adam 1e-3 (RoTTA)."""
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = field(default=0.9, metadata=between(0.0, 1.0, high_inclusive=False))
    """Adam's beta1, or SGD's momentum."""
    nesterov: bool = True
    """SGD only: MD's SGD is Nesterov (its ``conf.py`` default)."""
    weight_decay: float = field(default=0.0, metadata=at_least(0.0))


def build_adam_or_sgd(params: Sequence[nn.Parameter], config: AdamConfig, lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay,
                                foreach=True)  # one kernel per op for all tensors: identical updates, less overhead
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, dampening=0.0,
                               weight_decay=config.weight_decay, nesterov=config.nesterov)
    raise ValueError(f"optimizer must be adam or sgd, got {config.optimizer!r}")


@torch.no_grad()
def ema_update(targets: Iterable[torch.Tensor], sources: Iterable[torch.Tensor], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, entry by entry (MD's ``ema_update_model``)."""
    for target, source in zip(targets, sources, strict=True):
        target.copy_(momentum * target + (1 - momentum) * source.to(target.device))


def _view(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return stat.view(1, -1, *([1] * (x.ndim - 2)))


class RobustBatchNorm:
    """RoTTA's robust BN on every BatchNorm of a model (Yuan et al., CVPR 2023, section 3.2).

    The statistics (mu, var) live in the module's ``running_mean`` / ``running_var`` (so they start
    at the source's and are what the exported model normalises with). While ``update`` is on, a forward
    blends them with the batch's, mu <- (1 - alpha) mu + alpha mean, var <- (1 - alpha) var + alpha
    biased var, stores the result and normalises with it (gradients flow through the batch part);
    otherwise it normalises with the stored values. ``y = (x - mu) / sqrt(var + eps) * w + b``, in the
    authors' order of operations. timm's BatchNormAct keeps its activation. ``remove`` restores the
    modules' own forward.
    """

    def __init__(self, model: nn.Module, alpha: float) -> None:
        self.alpha = alpha
        self.update = False
        self.modules: list[nn.Module] = []
        for module in model.modules():
            if is_batchnorm(module) and module.running_mean is not None and module.weight is not None:
                module.forward = self._forward_of(module)  # instance attribute: state dict unchanged
                self.modules.append(module)

    def _forward_of(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return self._apply(module, x)

        return forward

    def _apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.update:
            mean_b, var_b, _ = world().channel_stats(x)  # data-parallel: the global batch's
            mean = (1 - self.alpha) * module.running_mean + self.alpha * mean_b
            var = (1 - self.alpha) * module.running_var + self.alpha * var_b
            with torch.no_grad():
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
        else:
            mean, var = module.running_mean, module.running_var
        y = (x - _view(mean, x)) / torch.sqrt(_view(var, x) + module.eps)
        y = y * _view(module.weight, x) + _view(module.bias, x)
        if hasattr(module, "act"):  # timm BatchNormAct2d: dropout (identity unless configured) then act
            y = module.act(module.drop(y))
        return y

    def remove(self) -> None:
        for module in self.modules:
            del module.forward
        self.modules.clear()
