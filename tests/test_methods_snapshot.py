"""The source snapshot: only the adapted tensors, restored bit for bit, on the host or the device."""

from __future__ import annotations

import torch

from tests.helpers import random_inputs, run_method, tiny_timm
from tta_cli.methods import create_method
from tta_cli.methods.snapshot import all_finite


def test_reset_snapshot_holds_only_the_adapted_tensors() -> None:
    method = create_method("sar", tiny_timm("test_resnet"), batch_size=8)
    snapshot = sum(t.numel() for t in method.source.params)
    assert snapshot == method.describe()["adapted_values"]
    assert snapshot < sum(p.numel() for p in method.model.parameters()) / 10
    assert method.source.buffers == {}  # BN statistics are never written outside ``ema``


def test_ema_statistics_are_in_the_snapshot_and_restored() -> None:
    method, _, _ = run_method("tent", "test_resnet", random_inputs(2), bn_stats="ema")
    assert method.source.buffers
    buffers = dict(method.model.named_buffers())
    assert any(not torch.equal(buffers[n], b) for n, b in method.source.buffers.items())
    method.reset()
    assert all(torch.equal(buffers[n], b) for n, b in method.source.buffers.items())


def test_reset_where_is_reset_or_nothing() -> None:
    method, _, _ = run_method("sar", "test_vit", random_inputs(2), margin_factor=10.0)
    adapted = [p.clone() for p in method.params]
    momentum = [b.clone() for b in method.momentum_buffers()]
    assert any(not torch.equal(p, s) for p, s in zip(adapted, method.source.params, strict=True))
    assert any(m.any() for m in momentum)
    method.reset_where(torch.tensor(False), momentum=True)
    assert all(torch.equal(p, a) for p, a in zip(method.params, adapted, strict=True))
    assert all(torch.equal(b, m) for b, m in zip(method.momentum_buffers(), momentum, strict=True))
    method.reset_where(torch.tensor(True), momentum=True)
    assert all(torch.equal(p, s) for p, s in zip(method.params, method.source.params, strict=True))
    assert all(not b.any() for b in method.momentum_buffers())


def test_primed_momentum_gives_torch_sgd_arithmetic() -> None:
    """Zero buffers from the start: 0.9 * 0 + g = g, exactly torch's lazily created buffer."""
    param = torch.nn.Parameter(torch.randn(5))
    lazy = torch.nn.Parameter(param.detach().clone())
    primed_opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    primed_opt.state[param]["momentum_buffer"] = torch.zeros(5)
    lazy_opt = torch.optim.SGD([lazy], lr=0.1, momentum=0.9)
    for _ in range(3):
        grad = torch.randn(5)
        param.grad, lazy.grad = grad.clone(), grad.clone()
        primed_opt.step()
        lazy_opt.step()
    assert torch.equal(param, lazy)


def test_all_finite_finds_nan_and_infinity_in_any_tensor() -> None:
    tensors = [torch.randn(4), torch.randn(3, dtype=torch.bfloat16), torch.tensor(2.0),
               torch.zeros(0), torch.tensor([7], dtype=torch.long)]
    assert bool(all_finite(tensors))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for index in (0, 1):
            broken = [t.clone() for t in tensors]
            broken[index][-1] = bad
            assert not bool(all_finite(broken))
    assert bool(all_finite([torch.full((2,), 3e38)]))  # large but finite: no overflow
