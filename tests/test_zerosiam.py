"""ZeroSiam's predictor, its two learning rates, its loss and its reset."""

from __future__ import annotations

import torch

from tests.helpers import random_inputs, tiny_timm
from tta_cli.methods import create_method
from tta_cli.methods.zerosiam import PREDICTOR, symmetric_kl


def test_predictor_starts_as_identity_on_the_classifier_input() -> None:
    method = create_method("zerosiam", tiny_timm("test_resnet"), batch_size=8)
    weight = method.predictor.weight
    assert torch.equal(weight, torch.eye(weight.shape[0]))
    assert method.param_names[-1] == PREDICTOR


def test_learning_rates_follow_the_authors_table() -> None:
    conv = create_method("zerosiam", tiny_timm("test_resnet"), batch_size=16, lr=0.001)
    assert [g["lr"] for g in conv.optimizer.param_groups] == [0.001 * 10, 0.001 * 100]
    vit = create_method("zerosiam", tiny_timm("test_vit"), batch_size=16, lr=0.001, lr_p=7.0)
    assert [g["lr"] for g in vit.optimizer.param_groups] == [0.001 * 5, 0.001 * 7.0]


def test_symmetric_kl_is_zero_on_equal_and_symmetric() -> None:
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    assert torch.allclose(symmetric_kl(a, a), torch.zeros(4), atol=1e-6)
    assert torch.allclose(symmetric_kl(a, b), symmetric_kl(b, a), atol=1e-6)


def test_adapts_the_predictor_and_reset_restores_it() -> None:
    method = create_method("zerosiam", tiny_timm("test_resnet"), batch_size=8, lr=0.01)
    source = [p.detach().clone() for p in method.params]
    for x in random_inputs(2, 8):
        method.step(x)
    assert not torch.equal(method.predictor.weight, source[-1])
    method.reset()
    assert all(torch.equal(p, s) for p, s in zip(method.params, source, strict=True))


def test_predictions_are_the_models_own_before_the_update() -> None:
    model = tiny_timm("test_resnet")
    x = random_inputs(1, 8)[0]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    method = create_method("zerosiam", model, batch_size=8, lr=0.01, bn_stats="source")
    assert torch.allclose(method.step(x).logits, expected, atol=1e-5)


def test_batchnorm_runs_on_batch_statistics_as_in_the_norm_method() -> None:
    """The backbone pass goes through the model's forward, where the BatchNorm hooks act."""
    x = random_inputs(1, 8)[0]
    zerosiam = create_method("zerosiam", tiny_timm("test_resnet"), batch_size=8, lr=0.01)
    norm = create_method("norm", tiny_timm("test_resnet"), batch_size=8)
    assert zerosiam.bn_mode == "batch"
    assert torch.allclose(zerosiam.step(x).logits, norm.step(x).logits, atol=1e-5)
