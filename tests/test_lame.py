"""LAME's affinities and Laplacian optimisation."""

from __future__ import annotations

import timm
import torch

from tta_cli.methods import create_method
from tta_cli.methods.lame import affinity_matrix


def test_knn_affinity_has_k_ones_per_row_and_none_on_the_diagonal() -> None:
    f = torch.nn.functional.normalize(torch.randn(12, 7), dim=-1)
    kernel = affinity_matrix(f, "knn", 5)
    assert torch.equal(kernel.sum(1), torch.full((12,), 5.0))
    assert not kernel.diagonal().any()


def test_without_the_laplacian_term_lame_returns_the_models_probabilities() -> None:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).softmax(1)
    method = create_method("lame", model, batch_size=6, bound_lambda=0.0)
    out = method(x)
    assert torch.allclose(out.softmax(1), expected, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(6), atol=1e-5)  # log-probabilities


def test_rbf_kernel_pulls_a_batch_towards_agreement() -> None:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        source = model(x).softmax(1)
    out = create_method("lame", model, batch_size=16, bound_lambda=5.0)(x).softmax(1)
    assert out.argmax(1).unique().numel() <= source.argmax(1).unique().numel()


def test_a_batch_of_one_image_is_predicted_as_the_model_predicts() -> None:
    """Issue #24.10/15: at -b 1 the rbf bandwidth was 0 / 0 and every prediction non-finite."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    method = create_method("lame", model, batch_size=1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).softmax(1)
    probs = method(x).softmax(1)
    assert torch.isfinite(probs).all() and torch.allclose(probs, expected, atol=1e-6)
    assert method.non_finite_updates == 0
    assert torch.isfinite(affinity_matrix(torch.ones(3, 4), "rbf", 5)).all()  # identical features
