"""What every method shares: configuring the model, the parameters it adapts, reset and export.

A method wraps a model. ``method(x)`` returns the logits of the first forward of ``x`` (the
predictions, made before this batch's update) and adapts on ``x``; ``method.step(x)`` returns the
same logits plus which samples were used. Subclasses implement ``forward_and_adapt`` (the loss and
the update) and ``collect_params`` (which norm layers); everything else lives here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tta_cli.methods.selection import (
    BatchNormStats,
    affine_parameters,
    has_batchnorm,
    resolve_bn_stats,
)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax of the logits, as the authors compute it."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


@dataclass
class StepResult:
    """One batch through a method.

    ``logits`` are the first forward's (the predictions); ``used`` marks the samples that
    contributed to the update after every filter; ``filtered`` counts the samples left after each
    filter, in order (e.g. reliable, then non-redundant); ``reset`` says the model was restored.
    """

    logits: torch.Tensor
    used: torch.Tensor
    filtered: tuple[torch.Tensor, ...] = ()
    reset: bool = False


@dataclass
class MethodConfig:
    """Hyperparameters every method has; each method subclasses it (one dataclass per method)."""

    bn_stats: str = "auto"
    """BatchNorm statistics: auto|batch|source|mix|ema (auto: batch, or mix at batch size 1)."""
    bn_alpha: float = 0.1
    """Weight of the test batch in the mix (alpha-BN) and ema statistics."""


@dataclass
class EntropyConfig(MethodConfig):
    """Hyperparameters of the gradient-based methods."""

    lr: float | None = None
    """SGD learning rate; None applies the SAR paper's rule from the model and batch size."""
    momentum: float = 0.9
    steps: int = 1
    """Adaptation steps per batch (predictions are always the first forward's)."""
    episodic: bool = False
    """Reset to the source model before every batch."""


def is_vit_like(model: nn.Module) -> bool:
    """Transformers (patch embedding + blocks) follow the LayerNorm learning-rate rule."""
    return hasattr(model, "patch_embed")


def default_lr(model: nn.Module, batch_size: int, double_at_bs1: bool = False) -> float:
    """The SAR paper's learning-rate rule (spec section 0), for SGD with momentum 0.9."""
    if is_vit_like(model):
        lr = 0.001 / 64 * batch_size
    else:
        lr = 0.00025 / 64 * batch_size * 2 if batch_size < 32 else 0.00025
    if double_at_bs1 and batch_size == 1:
        lr *= 2
    return lr


class TTAMethod(nn.Module):
    """Base class of all methods. Subclasses set ``name``, ``config_class`` and the two hooks."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    updates_parameters: ClassVar[bool] = True
    double_lr_at_bs1: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config: MethodConfig | None = None, batch_size: int = 64) -> None:
        super().__init__()
        self.model = model
        self.config = config if config is not None else self.config_class()
        self.batch_size = batch_size
        self.bn_mode = resolve_bn_stats(self.config.bn_stats, batch_size) if has_batchnorm(model) else None
        given_lr = getattr(self.config, "lr", None)
        self.lr = given_lr if given_lr is not None else default_lr(model, batch_size, self.double_lr_at_bs1)
        self.lr_source = "given" if given_lr is not None else "paper rule"
        self.configure_model()
        named = self.collect_params() if self.updates_parameters else []
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        model.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = self.build_optimizer() if self.params else None
        self.resets: list[int] = []
        self.batches_seen = 0
        self._source_params = [p.detach().clone() for p in self.params]
        self._source_buffers = self._bn_buffers_copy() if self.bn_mode == "ema" else {}
        self._source_optim = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None

    # --- hooks for subclasses ---------------------------------------------------------------------

    def configure_model(self) -> None:
        """Eval mode (no dropout / drop-path, trap 4) with BatchNorm on the chosen statistics."""
        self.model.eval()
        self._bn_hooks = BatchNormStats(self.model, self.bn_mode) if self.bn_mode else None
        if self._bn_hooks is not None:
            self._bn_hooks.alpha = self.config.bn_alpha

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs to adapt; by default every norm affine parameter."""
        return affine_parameters(self.model)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.params, lr=self.lr, momentum=getattr(self.config, "momentum", 0.9))

    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        raise NotImplementedError

    # --- the public loop API ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x).logits

    def step(self, x: torch.Tensor) -> StepResult:
        """Predict on ``x`` with the current model, then adapt ``config.steps`` times."""
        if getattr(self.config, "episodic", False):
            self.reset()
        result = self.forward_and_adapt(x)
        for _ in range(getattr(self.config, "steps", 1) - 1):
            later = self.forward_and_adapt(x)
            result.reset = result.reset or later.reset
        self.batches_seen += 1
        return result

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the source parameters (and BN statistics, optimiser state) bit for bit."""
        for param, source in zip(self.params, self._source_params):
            param.copy_(source)
        for name, buffer in self._bn_buffers().items():
            if name in self._source_buffers:
                buffer.copy_(self._source_buffers[name])
        if self.optimizer is not None and self._source_optim is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._source_optim))

    def record_reset(self) -> None:
        self.resets.append(self.batches_seen)

    def adapted_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict as it stands: the source's but for the adapted tensors.

        The source BN running statistics are in the buffers (the hooks never write them, except
        the ``ema`` statistics, which are the adaptation and are exported as such).
        """
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def stats(self) -> dict[str, Any]:
        """Method-specific state for progress and the run record (e.g. SAR's entropy EMA)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What was chosen for this run, for printing and for ``run.json``."""
        return {
            "method": self.name,
            "config": {k: v for k, v in vars(self.config).items()},
            "lr": self.lr if self.params else None,
            "lr_source": self.lr_source if self.params else None,
            "bn_stats": self.bn_mode,
            "adapted_parameters": len(self.param_names),
            "adapted_values": sum(p.numel() for p in self.params),
            "adapted_names": self.param_names,
        }

    def close(self) -> None:
        """Remove the BN hooks: the model behaves as a plain timm model again."""
        if self._bn_hooks is not None:
            self._bn_hooks.remove()
            self._bn_hooks = None

    # --- helpers ----------------------------------------------------------------------------------

    def _bn_buffers(self) -> dict[str, torch.Tensor]:
        return {
            n: b for n, b in self.model.named_buffers() if n.endswith(("running_mean", "running_var"))
        }

    def _bn_buffers_copy(self) -> dict[str, torch.Tensor]:
        return {n: b.detach().clone() for n, b in self._bn_buffers().items()}


def entropy_margin(num_classes: int, factor: float = 0.4) -> float:
    """E0 = 0.4 ln C, the reliable-sample threshold of EATA and SAR."""
    return factor * math.log(num_classes)


__all__ = [
    "EntropyConfig",
    "MethodConfig",
    "StepResult",
    "TTAMethod",
    "default_lr",
    "entropy_margin",
    "softmax_entropy",
]
