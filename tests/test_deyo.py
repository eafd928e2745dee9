"""DeYO's augmentations, its seeded draws and the authors' layer name rule."""

from __future__ import annotations

import timm
import torch

from tta_cli.methods import create_method
from tta_cli.methods.deyo import occlude, shuffle_patches, shuffle_pixels
from tta_cli.methods.selection import authors_name_rule_modules, norm_modules


def _images(n: int = 3) -> torch.Tensor:
    return torch.arange(n * 3 * 8 * 8, dtype=torch.float32).reshape(n, 3, 8, 8)


def test_patch_shuffle_moves_patch_perm_j_to_j() -> None:
    x = _images()
    out = shuffle_patches(x, 4, torch.Generator().manual_seed(0))
    perm = torch.argsort(torch.rand(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    for i in range(3):
        for j in range(16):
            r, c = divmod(j, 4)
            pr, pc = divmod(int(perm[i, j]), 4)
            new = out[i, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2]
            assert torch.equal(new, x[i, :, 2 * pr:2 * pr + 2, 2 * pc:2 * pc + 2])


def test_pixel_shuffle_is_one_permutation_for_the_batch() -> None:
    x = _images()
    out = shuffle_pixels(x, torch.Generator().manual_seed(3))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, x.reshape(3, 3, 64)[:, :, perm].reshape(3, 3, 8, 8))


def test_occlusion_fills_the_square_with_each_images_channel_mean() -> None:
    x = _images()
    out = occlude(x.clone(), 4, 2, 2)
    mean = x.mean(dim=(2, 3))
    assert torch.equal(out[:, :, 2:6, 2:6], mean[:, :, None, None].expand(-1, -1, 4, 4))
    assert torch.equal(out[:, :, :2], x[:, :, :2])


def test_name_rule_skips_layer4_on_resnet_and_nothing_on_convnext() -> None:
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert authors_name_rule_modules(resnet) == {n for n, _ in norm_modules(resnet) if not n.startswith("layer4")}
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    assert authors_name_rule_modules(convnext) == {n for n, _ in norm_modules(convnext)}
    assert "head.norm" in authors_name_rule_modules(convnext)


def test_reseed_reproduces_the_run() -> None:
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
        method = create_method("deyo", model, batch_size=8, lr=0.05, margin_factor=10.0, plpd_threshold=-2.0)
        method.reseed(seed)
        for _ in range(2):
            method.step(x)
        return torch.cat([p.detach().flatten() for p in method.params])

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_shuffling_a_part_gives_that_part_of_the_whole() -> None:
    """Data-parallel: each part draws the whole batch's permutations and takes its rows."""
    x = torch.rand(5, 3, 8, 8)
    whole = shuffle_patches(x, 4, torch.Generator().manual_seed(0))
    parts = [shuffle_patches(x[a:b], 4, torch.Generator().manual_seed(0), rows=(a, 5)) for a, b in ((0, 2), (2, 5))]
    assert torch.equal(torch.cat(parts), whole)
