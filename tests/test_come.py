"""COME's opinion entropy: the subjective opinion's masses, its bounds, its gradient, its K."""

from __future__ import annotations

import math

import torch

from tests.helpers import random_inputs, tiny_timm
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
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    default = create_method("come", tiny_timm("test_resnet", num_classes=10), batch_size=4, lr=0.01)
    authors = create_method("come", tiny_timm("test_resnet", num_classes=10), batch_size=4, lr=0.01, prior_mass=1000)
    assert torch.equal(default.sample_entropy(logits), opinion_entropy(logits, 10.0))
    assert torch.equal(authors.sample_entropy(logits), opinion_entropy(logits, 1000.0))


def test_bases_adapt_their_own_layers_and_keep_the_lr_undoubled_at_batch_size_1() -> None:
    tent = create_method("come", tiny_timm("test_resnet"), batch_size=1)
    sar = create_method("come", tiny_timm("test_resnet"), batch_size=1, base="sar")
    assert len(sar.params) < len(tent.params)
    assert tent.lr == sar.lr == 0.00025 / 64 * 2


def _recoveries(recovery_ema: str) -> list[int]:
    """Batch 0: every sample reliable, EMA below the threshold: recovery. Batch 1: nothing reliable,
    so no second loss and no EMA update: a kept EMA recovers again, a cleared one cannot."""
    method = create_method("come", tiny_timm("test_resnet"), batch_size=8, lr=0.01, base="sar",
                           margin_factor=100.0, reset_threshold=100.0, recovery_ema=recovery_ema)
    first, second = random_inputs(2, 8)
    method.step(first)
    method.config.margin_factor = 0.0
    method.step(second)
    method.settle()
    return method.resets


def test_recovery_keeps_the_collapsed_ema_as_the_authors_code() -> None:
    assert _recoveries("keep") == [0, 1]
    assert _recoveries("clear") == [0]
