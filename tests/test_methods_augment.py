"""Augmentation A / A-: seeded, in [0, 1], and drawing exactly what torchvision's transforms draw."""

from __future__ import annotations

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from tta_cli.methods.augment import AUGMENTATION_A, AUGMENTATION_A_MINUS, Normalization, augment


def _batch(seed: int = 3) -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _reference(x: torch.Tensor, seed: int, padding: str, blur_and_noise: bool) -> torch.Tensor:
    """The same pipeline written as torchvision transforms on torch's global generator."""
    torch.manual_seed(seed)
    img = x.clamp(0, 1)
    colour = [
        lambda im, f: TF.adjust_brightness(im, f), lambda im, f: TF.adjust_contrast(im, f),
        lambda im, f: TF.adjust_saturation(im, f), lambda im, f: TF.adjust_hue(im, f),
        lambda im, f: TF.adjust_gamma(im.clamp(1e-8, 1.0), f),
    ]
    ranges = [(0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3)]
    for i in torch.randperm(5).tolist():
        img = colour[i](img, torch.tensor(1.0).uniform_(*ranges[i]).item())
    img = T.Pad(16, padding_mode=padding)(img)
    img = T.RandomAffine(degrees=(-15, 15), translate=(1 / 16, 1 / 16), scale=(0.9, 1.1),
                         interpolation=T.InterpolationMode.BILINEAR, fill=0)(img)
    if blur_and_noise:
        img = T.GaussianBlur(5, sigma=(0.001, 0.5))(img)
    img = T.CenterCrop(32)(img)
    img = T.RandomHorizontalFlip(0.5)(img)
    if blur_and_noise:
        img = img + torch.randn(img.size()) * 0.005
    return img.clamp(0, 1)


def test_reproduces_torchvision_draw_order_bit_for_bit() -> None:
    x = _batch()
    for seed in range(4):
        ours = augment(x, torch.Generator().manual_seed(seed), AUGMENTATION_A)
        assert torch.equal(ours, _reference(x, seed, "edge", True)), seed
        ours_minus = augment(x, torch.Generator().manual_seed(seed), AUGMENTATION_A_MINUS)
        assert torch.equal(ours_minus, _reference(x, seed, "reflect", False)), seed


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    x = _batch()
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_output_in_unit_range_with_input_shape() -> None:
    x = _batch() * 3 - 1  # out-of-range input is clipped first
    for spec in (AUGMENTATION_A, AUGMENTATION_A_MINUS):
        out = augment(x, torch.Generator().manual_seed(0), spec)
        assert out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 1


def test_draw_count_per_call() -> None:
    """A: randperm(5), 5 factors, angle, tx, ty, scale, sigma, flip, B*3*H*W noise; A-: no sigma, no noise."""
    x = _batch()
    for spec, extra in ((AUGMENTATION_A, 1), (AUGMENTATION_A_MINUS, 0)):
        g = torch.Generator().manual_seed(5)
        augment(x, g, spec)
        if spec.blur_and_noise:
            torch.randn(x.shape, generator=g)  # the noise draw must be the last thing drawn: skip past it
        expected = torch.Generator().manual_seed(5)
        torch.randperm(5, generator=expected)
        for _ in range(5 + 4 + extra + 1):
            torch.empty(1).uniform_(generator=expected)
        if spec.blur_and_noise:
            torch.randn(x.shape, generator=expected)
            torch.randn(x.shape, generator=expected)
        assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=expected))


def test_normalisation_round_trip() -> None:
    norm = Normalization((0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616))
    x = _batch()
    assert torch.allclose(norm.to_unit(norm.from_unit(x)), x, atol=1e-6)
    assert norm.augment(norm.from_unit(x), torch.Generator().manual_seed(0)).shape == x.shape


def test_augmenting_a_part_gives_that_part_of_the_whole() -> None:
    """Data-parallel: a batch's parts augmented with their row spans equal the rows of the whole
    batch augmented (the noise is the whole batch's), and a part with no row draws as the others do."""
    x = _batch()
    whole_generator = torch.Generator().manual_seed(3)
    whole = augment(x, whole_generator)
    parts = []
    for first, stop in ((0, 3), (3, 4), (4, 4)):
        generator = torch.Generator().manual_seed(3)
        parts.append(augment(x[first:stop], generator, rows=(first, 4)))
        assert torch.equal(generator.get_state(), whole_generator.get_state())
    assert torch.equal(torch.cat(parts), whole)
