"""Every speed path in ``tta_cli.methods.fastpaths`` gives the plain path's result.

First each helper on its own (bit for bit where the helper says so, else within 1e-6, on tiny
LayerNorm / GroupNorm models), then the methods that use them: SAR's and ETA's fast plans against
their plain passes, and decisions taken on the device (what a GPU run does, simulated by declaring
host reads expensive) against decisions taken on the host.
"""

from __future__ import annotations

import math

import pytest
import torch

import tta_cli.methods.fastpaths as fastpaths
from tests.helpers import half_reliable_margin, max_param_diff, random_inputs, run_method, tiny_timm
from tta_cli.methods import create_method
from tta_cli.methods.base import softmax_entropy
from tta_cli.methods.fastpaths import (
    DeviceLog,
    FullBatch,
    ReliableRows,
    backward_or_zero,
    gradient_rows,
    masked_mean,
    nan_aware_ema,
    nan_if_empty,
    step_if,
    update_if_any,
)

BATCH_INDEPENDENT = ["test_vit", "test_efficientnet_gn"]  # LayerNorm, GroupNorm


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # tiny models: one thread avoids OpenMP barriers stalling on a busy machine (100x slower)
    torch.set_num_threads(1)


class TinyUpdatable:
    """The part of a method the update helpers use: two parameters, SGD with primed momentum."""

    def __init__(self, reads_free: bool) -> None:
        g = torch.Generator().manual_seed(3)
        self.params = [torch.nn.Parameter(torch.randn(4, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]
        self.optimizer = torch.optim.SGD(self.params, lr=0.1, momentum=0.9)
        for p in self.params:
            self.optimizer.state[p]["momentum_buffer"] = torch.randn(p.shape, generator=g)
        self._reads_free = reads_free

    def loss(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.cat([self.params[0] ** 2, self.params[1].exp()])
        return masked_mean(values, mask)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def optimizer_tensors(self) -> list[torch.Tensor]:
        return [*self.params, *(self.optimizer.state[p]["momentum_buffer"] for p in self.params)]

    def reads_are_free(self, tensor: torch.Tensor) -> bool:
        return self._reads_free

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.optimizer_tensors()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- no host sync ---------------------------------------------------------------------------------


def test_masked_mean_gradient_equals_the_indexed_mean() -> None:
    values = torch.randn(16, requires_grad=True)
    mask = values.detach() > 0.3
    values[mask].mean().backward()
    expected = values.grad.clone()
    values.grad = None
    mean, count = masked_mean(values, mask)
    mean.backward()
    assert torch.equal(values.grad, expected)
    assert int(count) == int(mask.sum())


def test_masked_mean_of_nothing_gives_zero_gradients_and_a_nan_value() -> None:
    values = torch.randn(8, requires_grad=True)
    mean, count = masked_mean(values, torch.zeros(8, dtype=torch.bool))
    mean.backward()
    assert torch.equal(values.grad, torch.zeros(8))
    assert math.isnan(float(nan_if_empty(mean, count)))


@pytest.mark.parametrize("apply", [True, False])
def test_step_if_on_the_device_is_the_step_or_nothing(apply: bool) -> None:
    runs = []
    for reads_free in (True, False):
        method = TinyUpdatable(reads_free)
        before = method.snapshot()
        method.backward(method.loss(torch.ones(7, dtype=torch.bool))[0])
        step_if(method, torch.tensor(apply))
        runs.append(method.snapshot())
        assert _equal(runs[-1], before) != apply
    assert _equal(*runs)


@pytest.mark.parametrize("selected", [0, 3])
def test_update_if_any_on_the_device_equals_the_host(selected: int) -> None:
    mask = torch.arange(7) < selected
    runs = []
    for reads_free in (True, False):
        method = TinyUpdatable(reads_free)
        before = method.snapshot()
        loss, count = method.loss(mask)
        update_if_any(method, loss, count)
        runs.append(method.snapshot())
        assert _equal(runs[-1], before) == (selected == 0)
    assert _equal(*runs)


def test_backward_or_zero_gives_the_gradients_of_the_empty_backward() -> None:
    empty = torch.zeros(7, dtype=torch.bool)
    grads = []
    for reads_free in (True, False):  # host: set to zero; device: the real backward
        method = TinyUpdatable(reads_free)
        backward_or_zero(method, *method.loss(empty))
        grads.append([p.grad.clone() for p in method.params])
    assert _equal(*grads)
    assert all(not g.any() for g in grads[0])


def test_nan_aware_ema_equals_the_authors_python_float() -> None:
    losses = [0.7, math.nan, 0.55, 0.61, math.nan, 0.3]
    expected: float | None = None
    ema: torch.Tensor | None = None
    for loss in losses:
        value = torch.tensor(loss, dtype=torch.float32)
        if not math.isnan(loss):  # the authors skip a NaN loss
            loss32 = float(value)
            expected = loss32 if expected is None else 0.9 * expected + 0.1 * loss32
        ema = nan_aware_ema(ema, value, 0.9)
        assert float(ema) == expected


def test_device_log_reads_in_batch_order_and_bounds_memory() -> None:
    log = DeviceLog(limit=3)
    log.add(0, torch.tensor(True))
    log.add(1, False)
    log.add(2, torch.tensor(False))
    assert len(log._pending) == 2
    log.add(3, torch.tensor(True))  # the third pending value: all are read at once
    assert not log._pending
    assert log.entries() == [(0, True), (1, False), (2, False), (3, True)]


# --- fewer rows -----------------------------------------------------------------------------------


def _entropy_grads(model: torch.nn.Module, x: torch.Tensor, plan: FullBatch,
                   margin: float) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, bool]:
    """Gradients of the mean entropy over the reliable rows, the predictions, the used mask and
    whether the first forward had autograd."""
    model.zero_grad()
    with torch.enable_grad():
        logits = plan.first_forward(model, x)
        entropy = softmax_entropy(logits)
        rows = plan.rows(x, entropy < margin, host=True)
        loss, _ = masked_mean(rows.with_grad(entropy, lambda r: softmax_entropy(model(r))), rows.selected)
        loss.backward()
    used = rows.to_batch(rows.selected)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return grads, logits.detach(), used, logits.requires_grad


@pytest.mark.parametrize("arch", BATCH_INDEPENDENT)
@pytest.mark.parametrize("no_grad_first", [False, True])
def test_reliable_rows_give_the_full_batch_gradients(arch: str, no_grad_first: bool) -> None:
    x = random_inputs(1)[0]
    margin = half_reliable_margin(arch, [x]) * math.log(10)
    model = tiny_timm(arch).eval()
    plain_grads, plain_logits, plain_used, plain_autograd = _entropy_grads(model, x, FullBatch(),
                                                                           margin)
    fast = ReliableRows()
    fast.share = 0.0 if no_grad_first else 1.0
    fast_grads, fast_logits, fast_used, fast_autograd = _entropy_grads(model, x, fast, margin)
    assert plain_autograd and fast_autograd != no_grad_first
    assert 0 < int(plain_used.sum()) < x.shape[0]
    assert torch.equal(fast_used, plain_used)
    assert torch.allclose(fast_logits, plain_logits, atol=1e-6)
    assert len(fast_grads) == len(plain_grads)
    assert max(float((a - b).abs().max()) for a, b in zip(fast_grads, plain_grads, strict=True)) < 1e-6
    expected_plan = "no-grad first" if no_grad_first else "reliable rows"
    assert fast.rows(x, plain_used, host=True).plan == expected_plan


def test_the_full_batch_plan_keeps_every_row() -> None:
    x = random_inputs(1)[0]
    selected = torch.arange(8) < 3
    plan = FullBatch()
    plan.first_forward(lambda t: t, x)
    on_device = plan.rows(x, selected, host=False)
    assert on_device.x is x and on_device.count is None and on_device.plan == "full"
    assert plan.rows(x, selected, host=True).count == 3
    assert not hasattr(plan, "share")  # no running share: nothing is ever read to choose a plan
    assert isinstance(gradient_rows(False), FullBatch) and not gradient_rows(False).enabled
    assert isinstance(gradient_rows(True), ReliableRows) and gradient_rows(True, after_grad_forward=False).enabled


def test_no_grad_first_is_chosen_below_the_share(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = ReliableRows(after_grad_forward=False)
    x = torch.randn(8, 3, requires_grad=True)
    with torch.enable_grad():
        assert plan.first_forward(lambda t: t * 2, x).requires_grad  # no share yet
        assert plan.rows(x, torch.arange(8) < 2, host=True).plan == "full"  # ETA: no rows cut
        assert plan.share == pytest.approx(0.25)
        assert not plan.first_forward(lambda t: t * 2, x).requires_grad
        monkeypatch.setattr(fastpaths, "NO_GRAD_FIRST_BELOW", 0.1)
        assert plan.first_forward(lambda t: t * 2, x).requires_grad


# --- the methods that use them --------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "config", "rows"), [
    ("test_vit", {}, "reliable only"),
    ("test_efficientnet_gn", {}, "reliable only"),
    ("test_resnet", {}, "full batch"),
    ("test_resnet", {"bn_stats": "source"}, "reliable only"),
    ("test_vit", {"reliable_rows": "off"}, "full batch"),
])
def test_reliable_rows_is_chosen_only_for_batch_independent_models(arch: str, config: dict, rows: str) -> None:
    method = create_method("sar", tiny_timm(arch), batch_size=8, **config)
    assert method.describe()["gradient_rows"] == rows


@pytest.mark.parametrize("arch", BATCH_INDEPENDENT)
@pytest.mark.parametrize(("name", "no_grad_first"), [("sar", False), ("sar", True), ("eta", True)])
def test_methods_on_reliable_rows_give_the_full_batch_result(name: str, arch: str, no_grad_first: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    stream = random_inputs(5)
    margin = half_reliable_margin(arch, stream)
    monkeypatch.setattr(fastpaths, "NO_GRAD_FIRST_BELOW", 1.1 if no_grad_first else 0.0)
    # ETA: no redundancy filter (|cos| < 2 always), or the random model's similar predictions
    # leave nothing to adapt on after the first batch
    config = {"margin_factor": margin, **({"d_margin": 2.0} if name == "eta" else {})}
    fast, fast_logits, fast_used = run_method(name, arch, stream, **config)
    plain, plain_logits, plain_used = run_method(name, arch, stream, reliable_rows="off", **config)
    assert sum(0 < int(u.sum()) < u.numel() for u in plain_used) >= 3  # the filter selects some rows
    assert (fast.plans["no-grad first"] > 0) == no_grad_first
    assert plain.plans["full"] == len(stream)
    if name == "sar":
        assert fast.ema_history == pytest.approx(plain.ema_history, abs=1e-6)
    for a, b in zip(fast_logits, plain_logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.equal(a.argmax(1), b.argmax(1))
    assert all(torch.equal(a, b) for a, b in zip(fast_used, plain_used, strict=True))
    assert max_param_diff(fast, plain) < 1e-6


@pytest.mark.parametrize(("name", "arch", "config"), [
    ("sar", "test_resnet", {}),
    ("sar", "test_vit", {"reliable_rows": "off"}),
    ("sar", "test_vit", {"reliable_rows": "off", "skip_empty": True}),
    ("sar", "test_vit", {"reset_threshold": 2.2}),
    ("eta", "test_vit", {}),
    ("eta", "test_vit", {"reliable_rows": "off"}),
    ("eata", "test_resnet", {}),
    ("tent", "test_resnet", {}),
])
def test_decisions_on_the_device_match_decisions_on_the_host(name: str, arch: str, config: dict) -> None:
    stream = random_inputs(5)
    config = {"margin_factor": half_reliable_margin(arch, stream), **config} if name != "tent" else config
    host, host_logits, host_used = run_method(name, arch, stream, **config)
    device, device_logits, device_used = run_method(name, arch, stream, reads_free=False, **config)
    for a, b in zip(host_logits, device_logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(host_used, device_used, strict=True))
    assert max_param_diff(host, device) < 1e-6
    assert host.resets == device.resets


def test_a_batch_with_nothing_reliable_still_moves_the_weights_by_momentum() -> None:
    """The skipped passes (host) and the full passes (device) agree: only the momentum step is left."""
    stream = random_inputs(3)
    runs = []
    for reads_free in (True, False):
        method = create_method("sar", tiny_timm("test_resnet"), batch_size=8, lr=0.05, margin_factor=10.0)
        if not reads_free:
            method.reads_are_free = lambda tensor: False  # type: ignore[method-assign]
        method.step(stream[0])  # builds momentum
        method.config.margin_factor = 0.0  # nothing is reliable from now on
        moved = [p.clone() for p in method.params]
        for x in stream[1:]:
            assert not method.step(x).used.any()
        assert any(not torch.equal(p, m) for p, m in zip(method.params, moved, strict=True))
        runs.append(method)
    assert runs[0].plans["nothing reliable"] == 2 and runs[1].plans["nothing reliable"] == 0
    assert max_param_diff(*runs) < 1e-7


def test_recovery_on_the_device_is_recorded() -> None:
    method, _, _ = run_method("sar", "test_vit", random_inputs(4), margin_factor=10.0, reset_threshold=100.0)
    assert method.resets == [0, 1, 2, 3]  # every EMA is below 100
    assert method.ema is None  # cleared by the last recovery
    assert len(method.ema_history) == 4
    assert all(torch.equal(p, s) for p, s in zip(method.params, method.source.params, strict=True))


# --- micro-batches --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", BATCH_INDEPENDENT)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_micro_batched_backward_gives_the_full_batch_gradient(arch: str, rows: int) -> None:
    from tta_cli.methods.fastpaths import micro_batched_backward

    x = random_inputs(1, 8)[0]
    margin = half_reliable_margin(arch, [x]) * math.log(10)
    model = tiny_timm(arch).eval()
    params = list(model.parameters())

    def row_losses(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(chunk)
        ent = softmax_entropy(logits)
        return logits, torch.where(ent.detach() < margin, ent, torch.zeros_like(ent))

    logits = model(x)
    ent = softmax_entropy(logits)
    keep = ent.detach() < margin
    ent[keep].mean().backward()
    full = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    micro_logits, loss = micro_batched_backward(row_losses, x, rows, params, count=keep.sum())
    # Convolutions on a smaller batch sum in another order (float32 rounding: logits within a few
    # 1e-6 relative, convolution weight gradients within 1e-4 of their scale); a row selected
    # differently would move a gradient by its whole size.
    assert torch.allclose(micro_logits, logits.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(loss, ent[keep].mean().detach(), rtol=1e-5, atol=1e-6)
    scale = max(float(g.abs().max()) for g in full)
    assert max(float((p.grad - g).abs().max()) for p, g in zip(params, full, strict=True)) < 1e-4 * scale
    assert any(float(g.abs().max()) > 0 for g in full)  # a gradient that can differ
