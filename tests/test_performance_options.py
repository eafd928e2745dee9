"""Speed options change how a method runs, never what it computes.

The options (precision, channels-last, compile) run, give the fp32 result where they should, and
are recorded. The fast paths are tested in ``test_methods_fastpaths.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import max_param_diff as _max_param_diff
from tests.helpers import random_inputs as _stream
from tests.helpers import run_method as _run
from tests.helpers import tiny_timm as _model
from tta_cli.cli import app
from tta_cli.methods import create_method

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert record["method"]["performance"] == {"precision": "bf16", "channels_last": True, "compile": False,
                                                "requested": "bf16", "reason": "requested"}
    assert record["method"]["gradient_rows"] == "reliable only"
    assert 0 <= record["timing"]["batches_waiting_for_data"] <= record["counts"]["batches"] == 3
    assert record["config"]["precision"] == "bf16"


def test_cli_refuses_an_unknown_precision(tiny_model_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    args = ["adapt", str(image_folder), "--model", f"local-dir:{tiny_model_dir}", "--precision", "fp64",
            "--out", str(tmp_path / "run"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "precision" in result.output + str(result.exception)


# --- --precision auto -----------------------------------------------------------------------------


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    return path


def test_cpu_bf16_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    from tta_cli.methods.precision import cpu_bf16_flags

    assert cpu_bf16_flags(_cpuinfo(tmp_path, "avx2 amx_bf16 amx_tile")) == ["amx_bf16"]
    assert cpu_bf16_flags(_cpuinfo(tmp_path, "avx2 avx512f")) == []


@pytest.mark.parametrize(("flags", "family", "pixels", "expected"), [
    ("avx512_bf16", "ln", 224 * 224, "bf16"),
    ("avx512_bf16", "gn", 32 * 32, "fp32"),  # tiny inputs: faster in fp32
    ("", "ln", 224 * 224, "fp32"),  # no bf16 units: emulated bf16 is slower
])
def test_auto_precision_follows_the_hardware_and_the_input_size(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: str, family: str, pixels: int,
        expected: str) -> None:
    from tta_cli.methods import precision

    info = _cpuinfo(tmp_path, flags)
    real = precision.cpu_bf16_flags
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: real(info))
    chosen, reason = precision.resolve_precision("auto", torch.device("cpu"), family, "sar", pixels)
    assert chosen == expected and reason


def test_auto_precision_falls_back_where_bf16_was_measured_not_to_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    from tta_cli.methods import precision

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["amx_bf16"])
    monkeypatch.setitem(precision.BF16_FALLBACKS, ("ln", "tent"), "tent on LayerNorm lost 1 point in bf16")
    cpu = torch.device("cpu")
    assert precision.resolve_precision("auto", cpu, "ln", "tent", 224 * 224) == (
        "fp32", "CPU bf16 units: amx_bf16; tent on LayerNorm lost 1 point in bf16")
    assert precision.resolve_precision("auto", cpu, "ln", "sar", 224 * 224)[0] == "bf16"
    assert precision.resolve_precision("fp16", cpu, "ln", "tent", 224 * 224) == ("fp16", "requested")


def test_cli_default_precision_is_auto_and_recorded(tiny_model_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    from tta_cli.methods.precision import native_bf16

    out = tmp_path / "run"
    args = ["adapt", str(image_folder), "--model", f"local-dir:{tiny_model_dir}", "--method", "tent",
            "--batch-size", "4", "--workers", "0", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    performance = json.loads((out / "run.json").read_text())["method"]["performance"]
    assert performance["requested"] == "auto" and performance["reason"]
    if not native_bf16(torch.device("cpu"))[0]:
        assert performance["precision"] == "fp32"
