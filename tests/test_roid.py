"""``tta_cli.methods.roid`` at batch size 1: no update, and none flagged as non-finite."""

from __future__ import annotations

import timm
import torch

from tta_cli.methods import create_method
from tta_cli.methods.roid import min_max


def test_min_max_of_equal_values_is_zero() -> None:
    assert torch.equal(min_max(torch.tensor([0.3])), torch.tensor([0.0]))
    assert torch.allclose(min_max(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_a_batch_of_one_image_is_used_for_no_update_and_is_not_non_finite() -> None:
    """Issue #24.15: every update at -b 1 was flagged as non-finite and undone."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    method = create_method("roid", model, batch_size=1)
    before = [p.detach().clone() for p in method.params]
    for _ in range(3):
        result = method.step(torch.randn(1, 3, 32, 32))
        assert torch.isfinite(result.logits).all() and not result.used.any()
    method.settle()
    assert method.non_finite_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, method.params, strict=True))
