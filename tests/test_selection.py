"""Norm-layer discovery, SAR's structural layer rule and BatchNorm statistics modes."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from tta_cli.methods.selection import (
    BatchNormStats,
    affine_parameters,
    block_layout,
    norm_modules,
    resolve_bn_stats,
    sar_norm_modules,
    skipped_top_blocks,
)


def _create(name: str, **kwargs: object) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "test_resnet"])
def test_sar_rule_on_resnets_is_all_but_layer4(name: str) -> None:
    model = _create(name)
    selected = sar_norm_modules(model)
    norms = {n for n, _ in norm_modules(model)}
    assert selected == {n for n in norms if not n.startswith("layer4")}


def test_sar_rule_on_resnet_gn_matches_authors_names() -> None:
    model = _create("resnet18", norm_layer="groupnorm")
    selected = sar_norm_modules(model)
    assert selected and all(isinstance(dict(model.named_modules())[n], nn.GroupNorm) for n in selected)
    assert not any(n.startswith("layer4") for n in selected)
    assert {"bn1", "layer1.0.bn1", "layer3.1.bn2"} <= selected


def test_sar_rule_on_12_block_vit_skips_blocks_9_to_11_and_final_norm() -> None:
    model = _create("vit_tiny_patch16_224")
    selected = sar_norm_modules(model)
    norms = {n for n, _ in norm_modules(model)}
    frozen = norms - selected
    assert frozen == {n for n in norms if n.startswith(("blocks.9.", "blocks.10.", "blocks.11.")) or n == "norm"}
    assert "blocks.8.norm2" in selected and "blocks.0.norm1" in selected


@pytest.mark.parametrize(
    ("name", "kwargs", "norm_type"),
    [
        ("convnext_atto", {}, "LayerNorm2d"),
        ("test_convnext", {}, "LayerNorm2d"),
        ("efficientnet_b0", {}, "BatchNormAct2d"),
        ("test_efficientnet_gn", {}, "GroupNormAct"),
        ("test_efficientnet_ln", {}, "LayerNormAct2d"),
        ("test_vit", {}, "LayerNorm"),
        ("resnet18", {"norm_layer": "groupnorm1"}, "GroupNorm1"),
    ],
)
def test_sar_rule_gives_sensible_selection(name: str, kwargs: dict, norm_type: str) -> None:
    model = _create(name, **kwargs)
    norms = norm_modules(model)
    assert any(type(m).__name__ == norm_type for _, m in norms), [type(m).__name__ for _, m in norms][:5]
    selected = sar_norm_modules(model)
    layout = block_layout(model)
    assert selected, "SAR must adapt something"
    assert len(selected) < len(norms), "SAR must leave the top blocks frozen"
    last_block = set(layout.blocks[-1])
    assert not (selected & last_block) and not (selected & set(layout.final))
    first_block = {n for n, _ in norms if n in set(layout.blocks[0])}
    assert first_block <= selected


def test_convnext_final_norm_is_frozen() -> None:
    model = _create("convnext_atto")
    assert "head.norm" in {n for n, _ in norm_modules(model)}
    assert "head.norm" not in sar_norm_modules(model)
    assert not any(n.startswith("stages.3.") for n in sar_norm_modules(model))


@pytest.mark.parametrize(("n", "skipped"), [(0, 0), (1, 1), (4, 1), (6, 2), (7, 2), (12, 3), (16, 4)])
def test_last_quarter_of_blocks(n: int, skipped: int) -> None:
    assert skipped_top_blocks(n) == skipped


def test_models_without_group_matcher_fall_back_to_children() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4)
    )
    layout = block_layout(model)
    assert len(layout.blocks) == 5
    assert sar_norm_modules(model) == {"1"}  # the last child (a quarter of 5, rounded) stays frozen


def test_affine_parameters_names_and_subset() -> None:
    model = _create("test_resnet")
    named = affine_parameters(model)
    assert all(n.endswith((".weight", ".bias")) for n, _ in named)
    assert len(affine_parameters(model, {"bn1"})) == 0 or all(
        n.startswith("bn1.") for n, _ in affine_parameters(model, {"bn1"})
    )


def test_resolve_bn_stats() -> None:
    assert resolve_bn_stats("auto", 64) == "batch"
    assert resolve_bn_stats("auto", 1) == "mix"
    assert resolve_bn_stats("source", 1) == "source"
    with pytest.raises(ValueError):
        resolve_bn_stats("bogus", 4)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def test_batch_mode_equals_train_mode_batchnorm_and_keeps_buffers() -> None:
    model = _bn_model()
    x = torch.randn(8, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn = model[1]
    reference = nn.functional.batch_norm(model[0](x), None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    hooks = BatchNormStats(model, "batch")
    assert torch.equal(model(x), reference)
    hooks.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_batch_mode_at_one_value_per_channel_uses_source_stats() -> None:
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4)).eval()
    hooks = BatchNormStats(model, "batch")
    x = torch.randn(1, 4)
    assert torch.allclose(model(x), x / (1 + 1e-5) ** 0.5)  # source stats: mean 0, var 1
    hooks.remove()


def test_batch_mode_hooks_the_model_once_not_each_layer() -> None:
    model = _bn_model()
    hooks = BatchNormStats(model, "batch")
    assert len(model._forward_pre_hooks) == 1 and not model[1]._forward_pre_hooks
    model(torch.randn(1, 3, 8, 8))  # one sample: per-layer hooks for this forward only
    assert not model[1]._forward_pre_hooks and not model[1]._forward_hooks
    hooks.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_batch_mode_puts_the_buffers_back_when_the_forward_fails() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(5, 1, 1)).eval()
    BatchNormStats(model, "batch")
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 3, 8, 8))
    assert model[1].running_mean is not None and model[1].running_var is not None


def test_batch_mode_single_sample_falls_back_per_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(1), nn.Linear(144, 4),
                          nn.BatchNorm1d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        feats = model[0](x)
        normed = nn.functional.batch_norm(feats, None, None, model[1].weight, model[1].bias, True, 0.0, 1e-5)
        expected = model[4](model[3](model[2](normed)))  # the 2-d layer: batch; the 1-d: source
        BatchNormStats(model, "batch")
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_mix_mode_interpolates_statistics() -> None:
    model = _bn_model()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        feats = model[0](x)
    var_b, mean_b = torch.var_mean(feats, dim=(0, 2, 3), correction=0)
    bn = model[1]
    mean = 0.9 * bn.running_mean + 0.1 * mean_b
    var = 0.9 * bn.running_var + 0.1 * var_b
    expected = nn.functional.batch_norm(feats, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
    BatchNormStats(model, "mix", alpha=0.1)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_ema_mode_updates_running_stats() -> None:
    model = _bn_model()
    before = model[1].running_mean.clone()
    BatchNormStats(model, "ema", alpha=0.1)
    model(torch.randn(4, 3, 8, 8) + 3)
    assert not torch.equal(model[1].running_mean, before)


@pytest.mark.parametrize("mode", ["batch", "mix"])
def test_stream_statistics_make_the_eval_model_normalise_as_the_run(mode: str) -> None:
    model = _bn_model()
    x = torch.randn(8, 3, 8, 8) + 2
    hooks = BatchNormStats(model, mode, alpha=0.3)  # type: ignore[arg-type]
    hooks.track_stream(model, momentum=0.5)
    with torch.no_grad():
        during = model(x)
    stream = hooks.stream_running_stats(model)
    hooks.remove()
    assert set(stream) == {"1.running_mean", "1.running_var"}
    model.load_state_dict(stream, strict=False)
    with torch.no_grad():
        assert torch.allclose(model(x), during, atol=1e-5)  # one batch: the EMA is its statistics


def test_stream_statistics_are_an_ema_over_forwards() -> None:
    model = _bn_model()
    hooks = BatchNormStats(model, "batch")
    hooks.track_stream(model, momentum=0.25)
    feats = []
    with torch.no_grad():
        for shift in range(6):
            x = torch.randn(4, 3, 8, 8) + shift
            feats.append(model[0](x).mean(dim=(0, 2, 3)))
            model(x)
    expected = feats[0]
    for k, mean in enumerate(feats[1:], start=2):  # a plain mean until 1/k < momentum
        expected = torch.lerp(expected, mean, max(0.25, 1 / k))
    assert torch.allclose(hooks.stream_running_stats(model)["1.running_mean"], expected, atol=1e-5)


def test_stream_statistics_are_not_tracked_for_source_or_ema() -> None:
    model = _bn_model()
    for mode in ("source", "ema"):
        hooks = BatchNormStats(model, mode)  # type: ignore[arg-type]
        hooks.track_stream(model, momentum=0.5)
        model(torch.randn(4, 3, 8, 8))
        assert hooks.stream_running_stats(model) == {}
        hooks.remove()


def test_linear_classifier_or_a_user_error_naming_the_method() -> None:
    from tests.helpers import tiny_timm
    from tta_cli.errors import TTAError
    from tta_cli.methods.selection import linear_classifier

    model = tiny_timm("test_resnet")
    assert linear_classifier(model, "foa_shift") is model.get_classifier()
    model.reset_classifier(0)  # timm's Identity head
    with pytest.raises(TTAError, match="zerosiam needs a timm model whose classifier is one linear layer"):
        linear_classifier(model, "zerosiam")
