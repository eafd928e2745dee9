"""RDumb: ETA with Adam and a periodic full reset."""

from __future__ import annotations

import timm
import torch

from tta_cli.methods import create_method


def _method(**settings: object):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    return create_method("rdumb", model, batch_size=8, margin_factor=10.0, **settings)


def test_margin_follows_mds_configs_and_optimiser_is_adam() -> None:
    method = _method()
    assert method.config.d_margin == 0.4 and method.lr == 1e-3
    assert isinstance(method.optimizer, torch.optim.Adam)


def test_reset_after_every_n_batches_restores_model_adam_and_ema() -> None:
    method = _method(reset_every=2, lr=0.01)
    source = [p.detach().clone() for p in method.params]
    batches = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    first = method.step(batches[0])
    assert not first.reset and method.optimizer.state
    second = method.step(batches[1])
    assert second.reset and method.resets == [1]
    assert all(torch.equal(p, s) for p, s in zip(method.params, source, strict=True))
    assert not method.optimizer.state and method.model_probs is None
    method.step(batches[2])
    assert method.resets == [1]
