"""zerosiam: entropy minimisation through an asymmetric Siamese branch, which cannot collapse.

Chen, Niu, Chen, Yang, Zhang, Tan, Wu, Shen. "ZeroSiam: An Efficient Asymmetry for Test-Time
Entropy Optimization Without Collapse", ICLR 2026. https://arxiv.org/abs/2509.23183
Authors' code: github.com/Cascol-Chen/ZeroSiam at 57dfceb (``tta_library/zerosiam.py``,
``models/byol_wrapper.py``, settings of ``main.py`` and ``main.sh``).

One forward gives the pooled pre-logits feature f and the predictions (the classifier on f). A
predictor P (one bias-free linear layer, identity at the start) makes the online branch
z_o = head(P(f)); the target branch is z_t = head(f) with the gradient stopped. The loss is
E(z_o) + alpha * (KL(p_t || p_o) + KL(p_o || p_t)), batch means, alpha = 1: the entropy is minimised
through P while the divergence ties the online prediction to the model's own. A collapsed model
(constant one-hot outputs) no longer minimises it, since P can sharpen predictions without the
backbone's having to. One backward; SGD (momentum 0.9) on every norm affine parameter at
lr * lr_scale and on P at lr * lr_p; the classifier stays frozen. No filter, no reset.

lr is SAR's rule (doubled at batch size 1, as the authors' ``main.py`` does for zerosiam);
lr_scale / lr_p default to the authors' per-model table (``main.sh``): 5 / 5 for ViT-like models,
10 / 100 for others (ResNet-50-GN, ConvNeXt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tta_cli.methods._registry import register_method
from tta_cli.methods.base import EntropyConfig, StepResult, TTAMethod, is_vit_like, softmax_entropy
from tta_cli.methods.fastpaths import batch_mean
from tta_cli.methods.hyperparameters import at_least, greater_than
from tta_cli.methods.selection import affine_parameters, linear_classifier

PREDICTOR = "predictor.weight"


@dataclass
class ZeroSiamConfig(EntropyConfig):
    alignment_weight: float = field(default=1.0, metadata=at_least(0.0))
    """alpha: weight of the symmetric KL between the online and the stop-gradient branch."""
    lr_scale: float | None = field(default=None, metadata=greater_than(0.0))
    """Norm layers learn at lr * lr_scale; None: the authors' table (5 ViT-like, else 10)."""
    lr_p: float | None = field(default=None, metadata=greater_than(0.0))
    """The predictor learns at lr * lr_p; None: the authors' table (5 ViT-like, else 100)."""


def symmetric_kl(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p_t || p_o) + KL(p_o || p_t), written as the authors' kl_div calls."""
    online_to_target = F.kl_div(online.log_softmax(dim=1), target.softmax(dim=1), reduction="none").sum(1)
    target_to_online = F.kl_div(target.log_softmax(dim=1), online.softmax(dim=1), reduction="none").sum(1)
    return online_to_target + target_to_online


@register_method
class ZeroSiam(TTAMethod):
    name = "zerosiam"
    data_parallel = True
    config_class = ZeroSiamConfig
    double_lr_at_bs1 = True
    amp_aware = True
    config: ZeroSiamConfig

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        classifier = self.classifier()
        # identity start: at the first batch the online branch is the model's own prediction
        self.predictor = nn.Linear(classifier.in_features, classifier.in_features, bias=False)
        nn.init.eye_(self.predictor.weight)
        self.predictor.to(classifier.weight.device)
        return [*affine_parameters(self.model), (PREDICTOR, self.predictor.weight)]

    def classifier(self) -> nn.Linear:
        return linear_classifier(self.model, self.name)

    def build_optimizer(self) -> torch.optim.Optimizer:
        vit = is_vit_like(self.model)
        lr_scale = self.config.lr_scale if self.config.lr_scale is not None else (5.0 if vit else 10.0)
        lr_p = self.config.lr_p if self.config.lr_p is not None else (5.0 if vit else 100.0)
        norms = [p for n, p in zip(self.param_names, self.params, strict=True) if n != PREDICTOR]
        groups = [{"params": norms, "lr": self.lr * lr_scale},
                  {"params": [self.predictor.weight], "lr": self.lr * lr_p}]
        fused = all(p.is_cuda for p in self.params)
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.config.momentum, fused=fused or None)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass through the model's own forward (so that BatchNorm runs on the chosen
        statistics): the logits, and the classifier's input f (timm's pooled pre-logits feature)."""
        captured: list[torch.Tensor] = []
        handle = self.classifier().register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            logits = self.run_model(x)
        finally:
            handle.remove()
        return captured[0], logits

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        features, logits = self.features_and_logits(x)
        target = logits.detach()
        with self.autocast():
            online = self.classifier()(self.predictor(features)).float()
        loss = batch_mean(softmax_entropy(online))
        loss = loss + self.config.alignment_weight * batch_mean(symmetric_kl(online, target))
        self.backward(loss)
        self.optimizer_step()
        self.optimizer.zero_grad()
        used = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return StepResult(logits=target, used=used)
