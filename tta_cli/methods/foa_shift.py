"""foa_shift: back-to-source activation shifting, forward-only test-time adaptation.

Niu, Miao, Chen, Wu, Zhao. "Test-Time Model Adaptation with Only Forward Passes", ICML 2024
(FOA), Eqns. (8)-(9). https://arxiv.org/abs/2404.01650
Authors' code: github.com/mr-eggplant/FOA at 004b02d (``tta_library/foa_shift.py``, the
``foa_shift`` algorithm of ``main.py``).

FOA searches input prompts of a ViT with CMA-ES and shifts the final features towards the source
domain; this is the shifting alone, which the authors also run on its own (``foa_shift``). Before
the stream, the mean mu_s of the classifier's input feature is taken on a few clean (source)
images (``compute_source_statistics``). Per batch, one no-grad forward gives the features f_i (the
pooled pre-logits feature, the normed class token on a ViT); the predictions are the classifier on
f_i + (mu_s - mu_t), mu_t the running mean of the test features of the batches before this one
(none on the first batch: no shift); then mu_t <- 0.9 mu_t + 0.1 mean_i f_i (the first batch's mean
at the start). Nothing is learned, no backward pass is taken: it runs wherever the model runs
forward (CPUs, quantised or exported models) at the cost of one forward.

Without source statistics there is nothing to shift towards: it then predicts as the source model
(``describe()["source_images"]`` is 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tta_cli.methods._registry import register_method
from tta_cli.methods.base import BNStatsChoice, MethodConfig, StepResult, TTAMethod
from tta_cli.methods.collectives import world
from tta_cli.methods.hyperparameters import at_least, between
from tta_cli.methods.selection import linear_classifier


@dataclass
class FOAShiftConfig(MethodConfig):
    bn_stats: BNStatsChoice = "source"
    """The model stays the source model (the authors run it in eval mode)."""
    momentum: float = field(default=0.1, metadata=between(0.0, 1.0))
    """Weight of each batch's mean in the running test mean mu_t (Eqn. 9)."""
    shift_scale: float = field(default=1.0, metadata=at_least(0.0))
    """The shift added is shift_scale * (mu_s - mu_t) (Eqn. 8: 1)."""


@register_method
class FOAShift(TTAMethod):
    name = "foa_shift"
    data_parallel = True
    config_class = FOAShiftConfig
    updates_parameters = False
    predicts_first_forward = False
    """Its outputs are the classifier on shifted features, not the model's own logits."""
    resume_attributes = ("test_mean", "source_mean", "source_images")
    clean_data = "the source feature mean"
    without_clean_data = "source"
    """Without clean images there is no source mean to shift towards: the model as it is."""
    config: FOAShiftConfig

    def __init__(self, model: nn.Module, config: FOAShiftConfig | None = None, batch_size: int = 64) -> None:
        super().__init__(model, config, batch_size)
        self.classifier()  # refuse a model without a linear classifier now, not at the first batch
        self.source_mean: torch.Tensor | None = None
        self.source_images = 0
        self.test_mean: torch.Tensor | None = None

    def classifier(self) -> nn.Linear:
        return linear_classifier(self.model, self.name)

    @torch.no_grad()
    def shifted_forward(self, x: torch.Tensor, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own forward (BatchNorm on the chosen statistics), with ``shift`` added to the
        classifier's input (timm's pooled pre-logits feature f); returns (logits, the unshifted f)."""
        captured: list[torch.Tensor] = []

        def shift_input(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
            captured.append(args[0].float())
            return None if shift is None else (args[0] + shift.to(args[0].dtype), *args[1:])

        handle = self.classifier().register_forward_pre_hook(shift_input)
        try:
            logits = self.run_model(x)
        finally:
            handle.remove()
        return logits, captured[0]

    @torch.no_grad()
    def compute_source_statistics(self, batches: Iterable[torch.Tensor]) -> int:
        """mu_s from clean source images (the authors: their ImageNet validation images). Returns
        the number of images used."""
        features = [self.shifted_forward(images, None)[1] for images in batches]
        if features:
            all_features = torch.cat(features)
            self.source_mean = _mean(all_features)
            self.source_images = all_features.shape[0]
        return self.source_images

    def prepare(self, clean_batches: Iterable[torch.Tensor]) -> int:
        return self.compute_source_statistics(clean_batches)

    def preparation(self) -> dict[str, Any]:
        return {} if self.source_mean is None else {"source_mean": self.source_mean, "images": self.source_images}

    def use_preparation(self, prepared: dict[str, Any]) -> None:
        if prepared:
            self.source_mean = prepared["source_mean"].clone().to(self.device)
            self.source_images = int(prepared["images"])

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        shift = None
        if self.test_mean is not None and self.source_mean is not None:
            shift = self.config.shift_scale * (self.source_mean - self.test_mean)
        logits, features = self.shifted_forward(x, shift)
        # data-parallel: the mean of the global batch's features (gathered, B x D), alike everywhere
        self.update_test_mean(_mean(world().gather_rows(features)))
        return StepResult(logits=logits, used=torch.ones(x.shape[0], dtype=torch.bool, device=x.device))

    def update_test_mean(self, batch_mean: torch.Tensor) -> None:
        """Eqn. (9): mu_t <- (1 - m) mu_t + m * batch mean, m = 0.1; the first batch's mean at the start."""
        if self.test_mean is None:
            self.test_mean = batch_mean
        else:
            self.test_mean = (1 - self.config.momentum) * self.test_mean + self.config.momentum * batch_mean

    def reset(self) -> None:
        super().reset()
        self.test_mean = None

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["source_images"] = self.source_images
        return info


def _mean(features: torch.Tensor) -> torch.Tensor:
    """The mean over the rows as the authors take it (``torch.std_mean``, whose rounding differs from
    ``mean()`` in the last bits); one row is its own mean (std_mean would warn about its std)."""
    if features.shape[0] == 1:
        return features[0].clone()
    return torch.std_mean(features, dim=0)[1]
