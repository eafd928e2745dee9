"""Augmentation A (CoTTA's test-time augmentation) and its variant A- (ROID's), with seeded draws.

Wang, Fink, Van Gool, Dai. "Continual Test-Time Domain Adaptation", CVPR 2022 (CoTTA's
``get_tta_transforms``, also used by RoTTA and, without blur and noise, by ROID).

One call augments a whole batch in [0, 1] with one set of random parameters shared by every image:
clip; colour jitter (brightness, contrast, saturation, hue, gamma in a random order); pad by half the
image size (``edge``, A-: ``reflect``); random affine (rotation, translation by up to 1/16 of the
padded size, scale; bilinear, fill 0); (A only) Gaussian blur; centre crop back; random horizontal
flip; (A only) Gaussian noise of std 0.005; clip. Every random number is drawn from the given
``torch.Generator``, in the order and with the shapes of docs/METHODS.md ("Randomness",
= torchvision 0.29's ``RandomAffine`` / ``GaussianBlur`` / ``RandomHorizontalFlip`` draws), and the
image operations are torchvision's functional ops, so a generator seeded s reproduces the authors'
code run after ``torch.manual_seed(s)``.

Our batches arrive normalised with the model's mean/std (timm's transform), while the authors'
models normalise inside (``Sequential(normalize, model)``) and augment in [0, 1]:
``Normalization.augment`` un-normalises (exactly, for 8-bit images), augments and normalises
again with the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode

from tta_cli.methods.collectives import RowSpan

Padding = Literal["edge", "reflect"]


@dataclass(frozen=True)
class AugmentationSpec:
    """The ranges of augmentation A (CoTTA's CIFAR/ImageNet values, not the ``soft`` ones)."""

    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.7, 1.3)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.06, 0.06)
    gamma: tuple[float, float] = (0.7, 1.3)
    degrees: tuple[float, float] = (-15.0, 15.0)
    translate: float = 1 / 16
    scale: tuple[float, float] = (0.9, 1.1)
    blur_kernel: int = 5
    blur_sigma: tuple[float, float] = (0.001, 0.5)
    noise_std: float = 0.005
    padding: Padding = "edge"
    blur_and_noise: bool = True
    """False is A- (ROID): no blur, no noise."""


AUGMENTATION_A = AugmentationSpec()
AUGMENTATION_A_MINUS = AugmentationSpec(padding="reflect", blur_and_noise=False)


def _uniform_scalar(generator: torch.Generator, low: float, high: float) -> float:
    """One float32 uniform draw of a 0-d tensor (the colour jitter's draw)."""
    return torch.tensor(1.0).uniform_(low, high, generator=generator).item()


def _uniform_one(generator: torch.Generator, low: float, high: float) -> float:
    """One element of ``torch.empty(1).uniform_`` (torchvision's affine and blur draws)."""
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _gamma(img: torch.Tensor, factor: float) -> torch.Tensor:
    # clamped first: gamma after a contrast change can meet values <= 0 (NaN gradients)
    return TF.adjust_gamma(img.clamp(1e-8, 1.0), factor)


def _colour_ops(spec: AugmentationSpec) -> list[tuple[tuple[float, float], Callable[..., torch.Tensor]]]:
    return [
        (spec.brightness, TF.adjust_brightness),
        (spec.contrast, TF.adjust_contrast),
        (spec.saturation, TF.adjust_saturation),
        (spec.hue, TF.adjust_hue),
        (spec.gamma, _gamma),
    ]


def colour_jitter(img: torch.Tensor, generator: torch.Generator, spec: AugmentationSpec) -> torch.Tensor:
    """The five colour operations in a random order, each factor drawn just before it is applied."""
    ops = _colour_ops(spec)
    for index in torch.randperm(len(ops), generator=generator).tolist():
        (low, high), apply = ops[index]
        img = apply(img, _uniform_scalar(generator, low, high))
    return img


def random_affine(img: torch.Tensor, generator: torch.Generator, spec: AugmentationSpec) -> torch.Tensor:
    """Rotation, then translation (x, y), then scale; no shear (nothing drawn for it)."""
    height, width = img.shape[-2:]
    angle = _uniform_one(generator, *spec.degrees)
    max_dx, max_dy = spec.translate * width, spec.translate * height
    tx = round(_uniform_one(generator, -max_dx, max_dx))  # Python rounding, an int
    ty = round(_uniform_one(generator, -max_dy, max_dy))
    scale = _uniform_one(generator, *spec.scale)
    return TF.affine(img, angle, [tx, ty], scale, [0.0, 0.0], interpolation=InterpolationMode.BILINEAR,
                     fill=[0.0] * img.shape[-3])


def augment(x: torch.Tensor, generator: torch.Generator, spec: AugmentationSpec = AUGMENTATION_A,
            rows: RowSpan | None = None) -> torch.Tensor:
    """Augmentation A (or A-) of a batch in [0, 1]; one parameter draw for the whole batch.

    ``rows``: ``x`` is part of a larger batch (data-parallel): every draw is the whole batch's (the
    noise is drawn for ``total`` rows and ``x`` takes its rows of it), so the parts augment as the
    whole would. A part with no row draws as one would and returns no row."""
    if x.shape[0] == 0:
        return augment(x.new_zeros((1, *x.shape[1:])), generator, spec, rows)[:0]
    first, total = rows if rows is not None else (0, x.shape[0])
    height, width = x.shape[-2:]
    img = x.clamp(0.0, 1.0)
    img = colour_jitter(img, generator, spec)
    pad = int(height / 2)
    img = TF.pad(img, [pad], padding_mode=spec.padding)
    img = random_affine(img, generator, spec)
    if spec.blur_and_noise:
        sigma = _uniform_one(generator, *spec.blur_sigma)
        img = TF.gaussian_blur(img, [spec.blur_kernel, spec.blur_kernel], [sigma, sigma])
    img = TF.center_crop(img, [height, width])
    if torch.rand(1, generator=generator) < 0.5:
        img = TF.hflip(img)
    if spec.blur_and_noise:
        noise = torch.randn((total, *img.shape[1:]), generator=generator)[first:first + img.shape[0]]
        img = img + (noise * spec.noise_std).to(img.device)
    return img.clamp(0.0, 1.0)


class Normalization:
    """The model's input normalisation, to augment in [0, 1] what arrives normalised."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def of(cls, model: nn.Module) -> Normalization:
        """Mean and std of the model's ``pretrained_cfg`` (timm's data config resolution)."""
        import timm.data

        config = timm.data.resolve_model_data_config(model)
        return cls(tuple(config["mean"]), tuple(config["std"]))

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """The [0, 1] image that normalises to ``x``, exactly for images decoded from 8 bits.

        ``x * std + mean`` alone is 1 ulp off in about 9% of the values (float32), which moves
        Adam's steps on near-zero gradients; the decoders make pixels k / 255 (``to_tensor``), so
        the nearest such value is taken wherever it normalises back to ``x`` bit for bit."""
        approx = x * self.std.to(x) + self.mean.to(x)
        snapped = (approx * 255).round() / 255
        return torch.where(self.from_unit(snapped) == x, snapped, approx)

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        # (x - mean) / std: the authors' in-model normaliser and torchvision's Normalize alike
        return (x - self.mean.to(x)) / self.std.to(x)

    def augment(self, x: torch.Tensor, generator: torch.Generator,
                spec: AugmentationSpec = AUGMENTATION_A, rows: RowSpan | None = None) -> torch.Tensor:
        """A(x) for a normalised batch: un-normalise, augment in [0, 1], normalise again (``rows``:
        ``augment``'s)."""
        dtype = x.dtype
        return self.from_unit(augment(self.to_unit(x.float()), generator, spec, rows)).to(dtype)
