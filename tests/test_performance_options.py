"""Speed options and fast paths change how a method runs, never what it computes.

Every fast path is checked against the plain one on the CPU: the reliable-rows passes of SAR, the
decisions taken on the device (what a GPU run does, simulated here by declaring host reads
expensive), the skipped passes of a batch with nothing reliable, recovery with ``torch.where``;
and the options (precision, channels-last, compile) run and are recorded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tta_cli.methods.base as base_module
from tests.helpers import random_inputs, tiny_timm
from tta_cli.cli import app
from tta_cli.methods import create_method
from tta_cli.methods.base import TTAMethod, masked_mean, nan_if_empty, softmax_entropy

pytestmark = pytest.mark.usefixtures("one_thread")
_model = tiny_timm


def _stream(n_batches: int = 4, batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    return random_inputs(n_batches, batch, seed)


def _half_reliable_margin(arch: str, stream: list[torch.Tensor]) -> float:
    """A margin factor that makes about half of the samples reliable on the source model, so that
    the filters select some samples and not others (random models are uncertain everywhere)."""
    with torch.no_grad():
        entropy = torch.cat([softmax_entropy(_model(arch).eval()(x)) for x in stream])
    return float(entropy.median()) / math.log(10) + 1e-6


def _run(name: str, arch: str, stream: list[torch.Tensor], reads_free: bool = True,
         **settings: object) -> tuple[TTAMethod, list[torch.Tensor], list[torch.Tensor]]:
    method = create_method(name, _model(arch), batch_size=stream[0].shape[0], lr=0.05, **settings)
    if not reads_free:  # what a GPU run does: decide on the device, never read a count back
        method.reads_are_free = lambda tensor: False  # type: ignore[method-assign]
    logits, used = [], []
    for x in stream:
        result = method.step(x)
        logits.append(result.logits)
        used.append(result.used)
    return method, logits, used


def _max_param_diff(a: TTAMethod, b: TTAMethod) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.params, b.params, strict=True))


# --- building blocks ------------------------------------------------------------------------------


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


def test_reset_snapshot_holds_only_the_adapted_tensors() -> None:
    method = create_method("sar", _model("test_resnet"), batch_size=8)
    snapshot = sum(t.numel() for t in method._source_params)
    assert snapshot == method.describe()["adapted_values"]
    assert snapshot < sum(p.numel() for p in method.model.parameters()) / 10
    assert method._source_buffers == {}  # BN statistics are never written outside ``ema``


def test_reset_where_is_reset_or_nothing() -> None:
    method, _, _ = _run("sar", "test_vit", _stream(2), margin_factor=10.0)
    adapted = [p.clone() for p in method.params]
    momentum = [b.clone() for b in method._momentum_buffers()]
    method.reset_where(torch.tensor(False), momentum=True)
    assert all(torch.equal(p, a) for p, a in zip(method.params, adapted, strict=True))
    assert all(torch.equal(b, m) for b, m in zip(method._momentum_buffers(), momentum, strict=True))
    method.reset_where(torch.tensor(True), momentum=True)
    assert all(torch.equal(p, s) for p, s in zip(method.params, method._source_params, strict=True))
    assert all(not b.any() for b in method._momentum_buffers())


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


# --- SAR's fast paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "settings", "rows"), [
    ("test_vit", {}, "reliable only"),
    ("test_efficientnet_gn", {}, "reliable only"),
    ("test_resnet", {}, "full batch"),
    ("test_resnet", {"bn_stats": "source"}, "reliable only"),
    ("test_vit", {"reliable_rows": "off"}, "full batch"),
])
def test_reliable_rows_is_chosen_only_for_batch_independent_models(arch: str, settings: dict, rows: str) -> None:
    method = create_method("sar", _model(arch), batch_size=8, **settings)
    assert method.describe()["gradient_rows"] == rows


def test_reliable_rows_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="reliable_rows"):
        create_method("sar", _model("test_vit"), batch_size=8, reliable_rows="maybe")


@pytest.mark.parametrize("arch", ["test_vit", "test_efficientnet_gn"])
@pytest.mark.parametrize(("name", "no_grad_first"), [("sar", False), ("sar", True), ("eta", True)])
def test_reliable_rows_give_the_full_batch_result(name: str, arch: str, no_grad_first: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _stream(5)
    margin = _half_reliable_margin(arch, stream)
    monkeypatch.setattr(base_module, "NO_GRAD_FIRST_BELOW", 1.1 if no_grad_first else 0.0)
    fast, fast_logits, fast_used = _run(name, arch, stream, margin_factor=margin)
    plain, plain_logits, plain_used = _run(name, arch, stream, margin_factor=margin, reliable_rows="off")
    if name == "sar":
        assert fast.plans["no-grad first"] > 0 if no_grad_first else fast.plans["no-grad first"] == 0
        assert plain.plans["full"] == len(stream)
        assert fast.ema_history == pytest.approx(plain.ema_history, abs=1e-6)
    for a, b in zip(fast_logits, plain_logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.equal(a.argmax(1), b.argmax(1))
    assert all(torch.equal(a, b) for a, b in zip(fast_used, plain_used, strict=True))
    assert _max_param_diff(fast, plain) < 1e-6


@pytest.mark.parametrize(("name", "arch", "settings"), [
    ("sar", "test_resnet", {}),
    ("sar", "test_vit", {"reliable_rows": "off"}),
    ("sar", "test_vit", {"reliable_rows": "off", "skip_empty": True}),
    ("sar", "test_vit", {"reset_threshold": 2.2}),
    ("eta", "test_vit", {}),
    ("eta", "test_vit", {"reliable_rows": "off"}),
    ("eata", "test_resnet", {}),
    ("tent", "test_resnet", {}),
])
def test_decisions_on_the_device_match_decisions_on_the_host(name: str, arch: str, settings: dict) -> None:
    stream = _stream(5)
    settings = {"margin_factor": _half_reliable_margin(arch, stream), **settings} if name != "tent" else settings
    host, host_logits, host_used = _run(name, arch, stream, **settings)
    device, device_logits, device_used = _run(name, arch, stream, reads_free=False, **settings)
    for a, b in zip(host_logits, device_logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(host_used, device_used, strict=True))
    assert _max_param_diff(host, device) < 1e-6
    assert host.resets == device.resets


def test_a_batch_with_nothing_reliable_still_moves_the_weights_by_momentum() -> None:
    """The skipped passes (host) and the full passes (device) agree: only the momentum step is left."""
    stream = _stream(3)
    runs = []
    for reads_free in (True, False):
        method = create_method("sar", _model("test_resnet"), batch_size=8, lr=0.05, margin_factor=10.0)
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
    assert _max_param_diff(*runs) < 1e-7


def test_recovery_on_the_device_is_recorded() -> None:
    method, _, _ = _run("sar", "test_vit", _stream(4), margin_factor=10.0, reset_threshold=100.0)
    assert method.resets == [0, 1, 2, 3]  # every EMA is below 100
    assert method.ema is None  # cleared by the last recovery
    assert len(method.ema_history) == 4
    assert all(torch.equal(p, s) for p, s in zip(method.params, method._source_params, strict=True))


# --- options --------------------------------------------------------------------------------------


def test_unknown_precision_is_refused() -> None:
    method = create_method("tent", _model("test_vit"), batch_size=8)
    with pytest.raises(ValueError, match="precision"):
        method.configure_performance(precision="fp64")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["tent", "sar", "eta", "source"])
def test_reduced_precision_adapts_in_fp32(name: str, precision: str) -> None:
    model = _model("test_resnet")
    # eta weights samples by exp(E0 - E): a margin far above every entropy would overflow fp16
    margins = {"sar": 10.0, "eta": 1.0}
    settings = {"lr": 0.05, "margin_factor": margins[name]} if name in margins else {}
    method = create_method(name, model, batch_size=8, **settings)
    method.configure_performance(precision=precision)
    before = [p.clone() for p in method.params]
    for x in _stream(2):
        logits = method.step(x).logits
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if method.params:
        assert any(not torch.equal(p, b) for p, b in zip(method.params, before, strict=True))
    assert (method.scaler is not None) == (precision == "fp16" and bool(method.params))
    assert method.describe()["performance"]["precision"] == precision


def test_bf16_predictions_stay_close_to_fp32() -> None:
    x = _stream(1)[0]
    fp32 = create_method("source", _model("test_vit"), batch_size=8)
    bf16 = create_method("source", _model("test_vit"), batch_size=8)
    bf16.configure_performance(precision="bf16")
    assert torch.allclose(bf16(x), fp32(x), atol=0.1)


def test_channels_last_gives_the_same_adaptation() -> None:
    stream = _stream(3)
    plain, plain_logits, _ = _run("tent", "test_resnet", stream)
    method = create_method("tent", _model("test_resnet"), batch_size=8, lr=0.05)
    method.configure_performance(channels_last=True)
    conv = next(m for m in method.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for x, expected in zip(stream, plain_logits, strict=True):
        assert torch.allclose(method.step(x).logits, expected, atol=1e-4)
    assert _max_param_diff(method, plain) < 1e-5
    assert all(t.is_contiguous() for t in method.adapted_state_dict().values())


def test_compile_keeps_names_and_results() -> None:
    stream = _stream(2)
    plain, plain_logits, _ = _run("tent", "test_vit", stream)
    method = create_method("tent", _model("test_vit"), batch_size=8, lr=0.05)
    method.configure_performance(compile="eager")  # dynamo tracing without a C++ toolchain
    for x, expected in zip(stream, plain_logits, strict=True):
        assert torch.allclose(method.step(x).logits, expected, atol=1e-5)
    assert set(method.adapted_state_dict()) == set(plain.adapted_state_dict())
    assert method.param_names == plain.param_names


def test_cli_precision_and_channels_last_are_applied_and_recorded(tiny_model_dir: Path, image_folder: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["adapt", str(image_folder), "--model", f"local-dir:{tiny_model_dir}", "--method", "sar",
            "--batch-size", "4", "--precision", "bf16", "--channels-last", "on", "--workers", "0",
            "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["method"]["performance"] == {"precision": "bf16", "channels_last": True, "compile": False}
    assert record["method"]["gradient_rows"] == "reliable only"
    assert 0 <= record["timing"]["batches_waiting_for_data"] <= record["counts"]["batches"] == 3
    assert record["config"]["precision"] == "bf16"


def test_cli_refuses_an_unknown_precision(tiny_model_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    args = ["adapt", str(image_folder), "--model", f"local-dir:{tiny_model_dir}", "--precision", "fp64",
            "--out", str(tmp_path / "run"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "precision" in result.output + str(result.exception)
