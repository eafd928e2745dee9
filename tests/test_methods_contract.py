"""The contract every registered method keeps, checked on every method and several model families."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import timm
import torch

from tests.helpers import random_inputs, tiny_timm
from tta_cli.methods import create_method, get_method_class, list_methods
from tta_cli.models import LoadedModel, export_model, load_model

ARCHS = ["test_vit", "test_resnet", "test_efficientnet_gn"]


_model = tiny_timm


def _stream(n_batches: int = 3, batch: int = 8) -> list[torch.Tensor]:
    return random_inputs(n_batches, batch)


def _build(name: str, arch: str, batch: int = 8, **config: object):
    model = _model(arch)
    # a large lr and no entropy filter so that every adapting method really moves
    fields = {f.name for f in dataclasses.fields(get_method_class(name).config_class)}
    if "margin_factor" in fields:
        config.setdefault("margin_factor", 10.0)
    if "plpd_threshold" in fields:
        config.setdefault("plpd_threshold", -2.0)
    if "lr" in fields:
        config.setdefault("lr", 0.01)
    if name == "rotta":  # an update every 8 samples, so that 3 batches of 8 update
        config.setdefault("memory_size", 8)
        config.setdefault("update_every", 8)
    if name == "auto":  # its default inner method (eta) filters out every sample of a random model
        config.setdefault("inner", "tent")
    if name == "cotta":  # 2 augmented views instead of 32: the same code paths, faster
        config.setdefault("augmentations", 2)
    return model, create_method(name, model, batch_size=batch, **config)


def _adapt(name: str, arch: str, batch: int = 8, **config: object):
    model, method = _build(name, arch, batch, **config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outputs = [method.step(x) for x in _stream(batch=batch)]
    return model, method, before, outputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list_methods())
def test_logits_shape_and_only_selected_parameters_change(name: str, arch: str) -> None:
    model, method, before, outputs = _adapt(name, arch)
    for out in outputs:
        assert out.logits.shape == (8, 10)
        assert out.used.shape == (8,) and out.used.dtype == torch.bool
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    if method.bn_mode == "ema":  # test-time BN statistics are part of the adaptation
        changed -= {k for k in after if k.endswith(("running_mean", "running_var"))}
    assert changed <= set(method.param_names), changed - set(method.param_names)
    if method.updates_parameters:
        assert changed, f"{name} adapted nothing on {arch}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list_methods())
def test_reset_restores_bit_for_bit(name: str, arch: str) -> None:
    model, method, before, _ = _adapt(name, arch)
    if method.updates_parameters:
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    method.reset()
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("name", list_methods())
def test_resume_state_keeps_every_changed_tensor_and_resumes_bit_for_bit(name: str, arch: str) -> None:
    _, method = _build(name, arch)
    holder = getattr(method, "inner", method)  # a wrapper keeps its inner method's tensors
    built = {k: v.clone() for k, v in holder.state_dict().items()}
    method.mark_initial_tensors()
    batches = _stream(n_batches=4)
    for x in batches[:3]:
        method.step(x)
    buffer = io.BytesIO()
    torch.save(method.state_for_resume(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    now = holder.state_dict()
    if state["modules"] is not None:
        changed = {k for k in now if not torch.equal(now[k], built[k])}
        assert changed <= set(state["modules"]), changed - set(state["modules"])
        frozen = {k for k, p in holder.named_parameters() if not p.requires_grad}
        if method.updates_parameters and frozen:  # what never changes is left out
            assert set(state["modules"]) < set(now)
    _, resumed = _build(name, arch)
    resumed.mark_initial_tensors()
    resumed.load_resume_state(state)
    assert all(torch.equal(v, now[k]) for k, v in getattr(resumed, "inner", resumed).state_dict().items())
    assert torch.equal(resumed.step(batches[3]).logits, method.step(batches[3]).logits)


@pytest.mark.parametrize("name", list_methods())
def test_predictions_are_the_first_forward(name: str) -> None:
    if not getattr(get_method_class(name), "predicts_first_forward", True):
        pytest.skip(f"{name} predicts otherwise (its docstring says how)")
    model = _model("test_vit")
    x = _stream(1)[0]
    with torch.no_grad():
        expected = model.eval()(x)
    fields = {f.name for f in dataclasses.fields(get_method_class(name).config_class)}
    method = create_method(name, model, batch_size=8, **({"lr": 0.05} if "lr" in fields else {}))
    assert torch.allclose(method(x), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list_methods())
def test_exported_model_loads_strictly_into_timm(name: str, arch: str, tmp_path: Path) -> None:
    model, method, before, _ = _adapt(name, arch)
    loaded = LoadedModel(model=model, spec=arch, architecture=arch, source="registry", tag=None,
                         class_names=[str(i) for i in range(10)], data_config={}, weights_sha256="")
    export_model(loaded, method.adapted_state_dict(), tmp_path / "model")
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True)
    state = reloaded.state_dict()
    assert set(state) == set(before)
    expected = method.adapted_state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    if method.bn_mode != "ema":  # the source BN statistics are written back (trap 3)
        buffers = [k for k in state if k.endswith(("running_mean", "running_var"))]
        assert all(torch.equal(state[k], before[k]) for k in buffers)
    method.close()
    x = _stream(1)[0]
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(x), model.eval()(x), atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("name", ["tent", "sar", "eta", "norm"])
def test_batchnorm_model_at_batch_size_one_does_not_crash(name: str) -> None:
    _, method, _, outputs = _adapt(name, "test_resnet", batch=1)
    assert method.bn_mode == ("mix" if name != "norm" else "batch")
    assert all(torch.isfinite(o.logits).all() for o in outputs)


def test_episodic_resets_before_every_batch() -> None:
    _, method, _, _ = _adapt("tent", "test_vit", episodic=True)
    x = _stream(1)[0]
    first = create_method("tent", _model("test_vit"), batch_size=8, lr=0.05, episodic=True).step(x).logits
    assert torch.allclose(method.step(x).logits, first, atol=1e-5)


def test_eata_fisher_regulariser_pulls_towards_source() -> None:
    def run(with_fisher: bool) -> float:
        model = _model("test_vit")
        source = {n: p.detach().clone() for n, p in model.named_parameters()}
        # keep every sample (no entropy or redundancy filter) so that several updates happen
        method = create_method("eata", model, batch_size=8, lr=0.05, margin_factor=10.0, d_margin=2.0)
        if with_fisher:
            method.compute_fisher(_stream(2))
            assert method.fishers and set(method.fishers) == set(method.param_names)
        for x in _stream(6):
            method.step(x)
        with torch.no_grad():
            return sum(float((p - source[n]).abs().sum()) for n, p in model.named_parameters())

    assert run(True) < run(False)


def test_sar_recovers_when_entropy_ema_drops() -> None:
    _, method, _, _ = _adapt("sar", "test_vit", reset_threshold=100.0)
    assert method.resets, "an EMA below a huge threshold must trigger model recovery"
    assert method.ema_history and method.ema_history[-1] < 100.0


def test_sar_skip_empty_does_not_move_weights() -> None:
    model = _model("test_vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = create_method("sar", model, batch_size=8, lr=0.05, margin_factor=0.0, skip_empty=True)
    for x in _stream():
        out = method.step(x)
        assert not out.used.any()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sar_original_empty_selection_keeps_stepping_with_momentum() -> None:
    model = _model("test_vit")
    method = create_method("sar", model, batch_size=8, lr=0.05, margin_factor=10.0)
    method.step(_stream(1)[0])  # builds momentum
    method.config.margin_factor = 0.0  # nothing passes any more
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    method.step(_stream(1)[0])
    assert any(not torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_load_model_then_method_on_local_dir(tiny_model_dir: Path) -> None:
    loaded = load_model(f"local-dir:{tiny_model_dir}")
    method = create_method("sar", loaded.model, batch_size=4)
    assert method.lr == pytest.approx(0.001 / 64 * 4)  # ViT rule
    assert method.step(torch.randn(4, 3, 32, 32)).logits.shape == (4, 10)
