"""COME's opinion entropy: the subjective opinion's masses, its bounds, its gradient, its K."""

from __future__ import annotations

import math

import torch

from tests.helpers import tiny_timm
from tta_cli.methods import create_method
from tta_cli.methods.come import opinion_entropy


def test_opinion_is_beliefs_plus_uncertainty_from_exp_evidence() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    evidence = logits.exp()
    strength = evidence.sum() + 3.0
    masses = torch.cat([evidence[0] / strength, torch.tensor([3.0]) / strength]) + 1e-7
    expected = -(masses * masses.log()).sum()
    assert torch.allclose(opinion_entropy(logits, 3.0), expected.unsqueeze(0))


def test_a_sample_with_no_evidence_is_all_uncertainty_not_uniform() -> None:
    """Very negative logits put the mass on u: entropy near 0, where softmax entropy is ln C."""
    logits = torch.full((1, 10), -30.0)
    assert float(opinion_entropy(logits, 10.0)) < 1e-4
    assert math.isclose(float(-(logits.softmax(1) * logits.log_softmax(1)).sum()), math.log(10), rel_tol=1e-6)


def test_gradient_has_no_component_along_the_logits() -> None:
    """The authors' norm rescaling: the loss cannot be lowered by scaling all logits up."""
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5]], requires_grad=True)
    opinion_entropy(logits, 4.0).sum().backward()
    assert abs(float((logits.grad * logits.detach()).sum())) < 1e-6


def test_prior_mass_defaults_to_the_number_of_classes() -> None:
    model = tiny_timm("test_resnet", num_classes=10)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    default = create_method("come", model, batch_size=4, lr=0.01)
    assert default.prior_mass(10) == 10.0
    authors = create_method("come", tiny_timm("test_resnet", num_classes=10), batch_size=4, lr=0.01, prior_mass=1000)
    assert authors.prior_mass(10) == 1000.0
    default.step(x)
    authors.step(x)
    moved = [float((a - b).abs().max()) for a, b in zip(default.params, authors.params, strict=True)]
    assert max(moved) > 0
