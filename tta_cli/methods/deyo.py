"""deyo: destroy your object, entropy minimisation on samples whose prediction depends on shape.

Lee, Jung, Kim, Lee, Kim, Yoon. "Entropy is not Enough for Test-Time Adaptation: From the
Perspective of Disentangled Factors", ICLR 2024. https://arxiv.org/abs/2403.07366
Authors' code: github.com/Jhyun17/DeYO (``methods/deyo.py``, settings of ``main.py``).

Per batch (docs/METHODS.md, "deyo"): the first forward gives the predictions; samples with entropy below
0.5 ln C are kept; each kept image is destroyed (its 4x4 grid of patches shuffled) and forwarded
again without gradient; the pseudo-label probability difference (PLPD) is how much the predicted
class's probability drops; samples with PLPD above 0.2 enter an entropy loss weighted by
1/exp(E - E0) + 1/exp(-PLPD), E0 = 0.4 ln C, and one SGD step is taken. No sample left, no update.

Randomness: the shuffle draws from ``self.generator`` only (seeded by ``reseed`` before the first
batch), exactly the authors' draws: ``rand(kept, 16)`` per batch (``patch``), ``randperm(H*W)``
(``pixel``), none (``occ``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from tta_cli.errors import TTAError
from tta_cli.methods._registry import register_method
from tta_cli.methods.base import EntropyConfig, StepResult, TTAMethod, softmax_entropy
from tta_cli.methods.collectives import RowSpan, world
from tta_cli.methods.fastpaths import batch_mean
from tta_cli.methods.hyperparameters import any_finite, at_least
from tta_cli.methods.selection import affine_parameters, authors_name_rule_modules, sar_norm_modules

Augmentation = Literal["patch", "occ", "pixel"]
LayerRule = Literal["authors", "sar", "all"]


@dataclass
class DeYOConfig(EntropyConfig):
    margin_factor: float = field(default=0.5, metadata=at_least(0.0))
    """Entropy filter: keep samples with E < margin_factor * ln C."""
    e0_factor: float = field(default=0.4, metadata=at_least(0.0))
    """Weighting margin E0 = e0_factor * ln C."""
    plpd_threshold: float = field(default=0.2, metadata=any_finite())
    """Keep samples whose PLPD exceeds this (the authors' ImageNet-C "mild" script uses 0.3)."""
    aug: Augmentation = "patch"
    """How an image is destroyed: patch shuffle, occlusion by its mean, or one pixel permutation."""
    patch_len: int = field(default=4, metadata=at_least(1))
    """patch: the grid is patch_len x patch_len."""
    occ_size: int = field(default=112, metadata=at_least(1))
    """occ: side of the occluded square in pixels (the default is for 224 px images)."""
    occ_row: int = field(default=56, metadata=at_least(0))
    occ_col: int = field(default=56, metadata=at_least(0))
    layers: LayerRule = "authors"
    """authors: their name rule (skips layer4 on ResNets, nothing on ConvNeXt); sar: the structural
    rule of SAR (last quarter of the blocks and the final norm frozen); all: every norm layer."""


@register_method
class DeYO(TTAMethod):
    name = "deyo"
    data_parallel = True
    resume_attributes = ("counts",)
    config_class = DeYOConfig
    double_lr_at_bs1 = True
    amp_aware = True
    config: DeYOConfig

    def __init__(self, model: nn.Module, config: DeYOConfig | None = None, batch_size: int = 64) -> None:
        config = config if config is not None else DeYOConfig()
        _check_choice("aug", config.aug, Augmentation)
        _check_choice("layers", config.layers, LayerRule)
        super().__init__(model, config, batch_size)
        self.counts = {"reliable": 0, "used": 0}

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        if self.config.layers == "all":
            return affine_parameters(self.model)
        if self.config.layers == "sar":
            return affine_parameters(self.model, sar_norm_modules(self.model))
        return affine_parameters(self.model, authors_name_rule_modules(self.model))

    # --- one batch --------------------------------------------------------------------------------

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        """Data-parallel (``collectives``), every count and decision is the global batch's, the
        destroyed copies are those of the whole batch and the loss is a mean over its kept rows."""
        self.optimizer.zero_grad()
        logits = self.run_model(x)
        num_classes = logits.shape[1]
        entropy = softmax_entropy(logits)
        used = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

        reliable = (entropy < self.config.margin_factor * math.log(num_classes)).nonzero().squeeze(1)
        n_reliable = world().sum_int(reliable.numel())
        if n_reliable == 0:
            return StepResult(logits.detach(), used, (0, 0))

        plpd = self.plpd(logits.detach().index_select(0, reliable), x.index_select(0, reliable))
        shape_dependent = (plpd > self.config.plpd_threshold).nonzero().squeeze(1)
        n_used = world().sum_int(shape_dependent.numel())
        self.counts["reliable"] += n_reliable
        if n_used == 0:
            return StepResult(logits.detach(), used, (reliable.numel(), 0))

        kept_entropy = entropy.index_select(0, reliable).index_select(0, shape_dependent)
        kept_plpd = plpd.index_select(0, shape_dependent)
        e0 = self.config.e0_factor * math.log(num_classes)
        # exactly the authors' expression: the algebraically equal exp(E0 - E) + exp(PLPD) rounds
        # differently and flipped a threshold decision on the occlusion fixture
        weights = 1 / torch.exp(kept_entropy.detach() - e0) + 1 / torch.exp(-1.0 * kept_plpd)
        loss = batch_mean(kept_entropy.mul(weights))
        self.backward(loss)
        self.optimizer_step()
        self.optimizer.zero_grad()

        used[reliable.index_select(0, shape_dependent)] = True
        self.counts["used"] += n_used
        return StepResult(logits.detach(), used, (reliable.numel(), shape_dependent.numel()))

    @torch.no_grad()
    def plpd(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Pseudo-label probability difference: p(y) on the image minus p(y) on its destroyed copy,
        y the predicted class. Same parameters, no gradient (BatchNorm: the destroyed batch's
        statistics, as in the authors' train-mode forward)."""
        probs = logits.softmax(1)
        probs_destroyed = self.run_model(self.destroy(images)).softmax(1)
        pseudo_label = probs.argmax(dim=1).reshape(-1, 1)
        return (probs.gather(1, pseudo_label) - probs_destroyed.gather(1, pseudo_label)).reshape(-1)

    def destroy(self, images: torch.Tensor) -> torch.Tensor:
        """The augmentation that destroys the object's shape (on the normalised images, as the
        authors' code receives them); data-parallel, each process's rows of the whole batch's draw."""
        images = images.detach().clone()
        if self.config.aug == "occ":
            return occlude(images, self.config.occ_size, self.config.occ_row, self.config.occ_col)
        if self.config.aug == "pixel":
            return shuffle_pixels(images, self.generator)
        rows = world().row_span(images.shape[0])
        return shuffle_patches(images, self.config.patch_len, self.generator, rows)

    def stats(self) -> dict[str, Any]:
        return dict(self.counts)


def occlude(images: torch.Tensor, size: int, row: int, col: int) -> torch.Tensor:
    """Replace a size x size square at (row, col) by each image's per-channel mean (in place)."""
    b, c = images.shape[:2]
    mean = images.reshape(b, c, -1).mean(dim=2)
    window = images[:, :, row:row + size, col:col + size]
    window.copy_(mean.unsqueeze(-1).unsqueeze(-1).expand_as(window))
    return images


def shuffle_patches(images: torch.Tensor, grid: int, generator: torch.Generator,
                    rows: RowSpan | None = None) -> torch.Tensor:
    """Cut each image into grid x grid patches (row-major) and permute them, one permutation per
    image: new patch j = old patch perm[j], perm = argsort(U), U = rand(B, grid*grid).

    Sides that are not a multiple of ``grid`` are resized down to one and back, as the authors do
    (an identity at 32 and 224 px with the default grid of 4). ``rows`` = (first, total): the
    images are rows first.. of a batch of ``total`` (data-parallel), U is drawn for all of them."""
    b, c, h, w = images.shape
    first, total = rows if rows is not None else (0, b)
    ph, pw = h // grid, w // grid
    resized = _resize(images, ph * grid, pw * grid)
    patches = resized.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)
    draws = torch.rand(total, grid * grid, generator=generator)[first:first + b]
    perm = torch.argsort(draws, dim=-1).to(images.device)
    patches = patches[torch.arange(b, device=images.device).unsqueeze(-1), perm]
    shuffled = patches.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ph * grid, pw * grid)
    return _resize(shuffled, h, w)


def shuffle_pixels(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random permutation of the H*W pixel positions, shared by the whole batch."""
    b, c, h, w = images.shape
    perm = torch.randperm(h * w, generator=generator).to(images.device)
    return images.reshape(b, c, h * w)[:, :, perm].reshape(b, c, h, w)


def _resize(images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if images.shape[-2:] == (h, w):
        return images
    from torchvision.transforms.functional import resize

    return resize(images, [h, w], antialias=True)


def _check_choice(key: str, value: object, choices: Any) -> None:
    if value not in get_args(choices):
        raise TTAError(f"invalid value {value!r} for {key}", f"choose from {', '.join(get_args(choices))}")
