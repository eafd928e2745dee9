"""foa_shift: the shift towards the source mean, its running test mean, and no source statistics."""

from __future__ import annotations

import torch

from tests.helpers import random_inputs, tiny_timm
from tta_cli.methods import create_method


def _pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def test_shift_uses_the_test_mean_of_the_batches_before() -> None:
    model = tiny_timm("test_resnet")
    clean, first, second = random_inputs(3, 8)
    method = create_method("foa_shift", model, batch_size=8)
    assert method.compute_source_statistics([clean]) == 8
    model.eval()
    source_mean = _pooled(model, clean).mean(0)
    with torch.no_grad():
        assert torch.allclose(method(first), model(first), atol=1e-5)  # nothing seen yet: no shift
    shift = source_mean - _pooled(model, first).mean(0)
    expected = model.get_classifier()(_pooled(model, second) + shift)
    assert torch.allclose(method(second), expected, atol=1e-5)
    running = 0.9 * _pooled(model, first).mean(0) + 0.1 * _pooled(model, second).mean(0)
    assert torch.allclose(method.test_mean, running, atol=1e-6)


def test_without_source_statistics_it_predicts_as_the_source_model() -> None:
    model = tiny_timm("test_resnet")
    method = create_method("foa_shift", model, batch_size=8)
    model.eval()
    for x in random_inputs(3, 8):
        with torch.no_grad():
            assert torch.allclose(method(x), model(x), atol=1e-5)
    assert method.describe()["source_images"] == 0


def test_learns_nothing_keeps_source_batchnorm_and_reset_forgets_the_test_mean() -> None:
    model = tiny_timm("test_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = create_method("foa_shift", model, batch_size=8)
    assert method.bn_mode == "source" and method.params == []
    method.compute_source_statistics(random_inputs(1, 8, seed=5))
    for x in random_inputs(2, 8):
        method(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    method.reset()
    assert method.test_mean is None and method.source_mean is not None


def test_batch_statistics_when_asked_go_through_the_models_forward() -> None:
    x = random_inputs(1, 8)[0]
    shift = create_method("foa_shift", tiny_timm("test_resnet"), batch_size=8, bn_stats="batch")
    norm = create_method("norm", tiny_timm("test_resnet"), batch_size=8)
    assert torch.allclose(shift.step(x).logits, norm.step(x).logits, atol=1e-5)


def test_tta_adapt_learns_the_source_mean_from_clean_images_and_runs_source_without(tmp_path) -> None:
    import json

    from tests.helpers import invoke, make_images, tiny_model_folder

    model = tiny_model_folder(tmp_path / "model", arch="test_resnet")
    make_images(tmp_path / "clean", 8)
    make_images(tmp_path / "images", 8, seed=1)
    common = ["adapt", tmp_path / "images", "--model", f"local-dir:{tmp_path / 'model'}", "--method", "foa_shift",
              "--batch-size", "4", "--quiet"]
    result = invoke(*common, "--out", tmp_path / "with", "--clean", tmp_path / "clean")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "with" / "run.json").read_text())
    assert record["method"]["method"] == "foa_shift"
    assert record["method"]["source_images"] == 8
    result = invoke(*common, "--out", tmp_path / "without")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "without" / "run.json").read_text())["method"]["method"] == "source"
    assert model.is_dir()
