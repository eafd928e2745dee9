"""methods/auto: what auto chooses per normalisation type, its BatchNorm choice, its guard."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import invoke, make_images, random_inputs, tiny_timm
from tta_cli.bench.online import EveryKth
from tta_cli.collapse_window import Thresholds
from tta_cli.methods import create_method
from tta_cli.methods.auto import DEFAULT_INNER, STREAM_MOMENTUM_IMAGES, EntropyWindow, model_norm_kind
from tta_cli.methods.auto.bn_choice import INPUT_SHIFT
from tta_cli.methods.auto.guard import HARM_POINTS, ChangeWindow, ensemble_with_source
from tta_cli.methods.base import StepResult, softmax_entropy
from tta_cli.methods.roid import prior_correction
from tta_cli.methods.selection import batchnorm_layers


@pytest.mark.parametrize(("arch", "kind", "inner"), [
    ("test_resnet", "batchnorm", "norm"),
    ("test_efficientnet_gn", "groupnorm", DEFAULT_INNER),
    ("test_vit", "layernorm", DEFAULT_INNER),
])
def test_choice_per_normalisation(arch: str, kind: str, inner: str) -> None:
    model = tiny_timm(arch)
    assert model_norm_kind(model) == kind
    method = create_method("auto", model, batch_size=8)
    info = method.describe()
    assert info["method"] == "auto" and info["inner"] == inner
    assert info["choice"]["norm"] == kind and info["choice"]["why"]
    for x in random_inputs(2):
        out = method.step(x)
        assert out.logits.shape == (8, 10) and torch.isfinite(out.logits).all()
    method.close()


@pytest.mark.parametrize("arch", ["test_efficientnet_gn", "test_vit"])
def test_batch_independent_models_run_roid_as_it_is_under_the_guard(arch: str) -> None:
    method = create_method("auto", tiny_timm(arch), batch_size=8, judge_first=False, source_ensemble=False)
    roid = create_method("roid", tiny_timm(arch), batch_size=8)
    assert method.describe()["inner"] == "roid" and "gained most" in method.describe()["choice"]["why"]
    for seed, x in enumerate(random_inputs(3)):
        for m in (method, roid):
            m.reseed(seed)
        assert torch.equal(method.step(x).logits, roid.step(x).logits)  # no fallback on these batches
    assert method.stats()["guard_fallbacks"] == []


@pytest.mark.parametrize("arch", ["test_efficientnet_gn", "test_vit"])
def test_the_guard_predicts_the_mean_of_roid_and_the_prior_corrected_source(arch: str) -> None:
    method = create_method("auto", tiny_timm(arch), batch_size=8, judge_first=False, few_classes=False)
    roid = create_method("roid", tiny_timm(arch), batch_size=8)
    source = tiny_timm(arch).eval()
    for seed, x in enumerate(random_inputs(3)):
        for m in (method, roid):
            m.reseed(seed)
        with torch.no_grad():
            source_probs = prior_correction(source(x)).softmax(1)
        expected = ((roid.step(x).logits.softmax(1) + source_probs) / 2).log()
        torch.testing.assert_close(method.step(x).logits, expected, rtol=1e-5, atol=1e-6)
    assert method.stats()["guard_fallbacks"] == []


def test_the_ensemble_takes_the_inner_methods_own_predictions() -> None:
    """A method without an output step (tent) is mixed with the plain source probabilities."""
    logits, source_logits = torch.randn(6, 10), torch.randn(6, 10)
    tent = create_method("tent", tiny_timm("test_vit"), batch_size=6)
    mixed = ensemble_with_source(tent, logits, source_logits)
    torch.testing.assert_close(mixed.exp(), (logits.softmax(1) + source_logits.softmax(1)) / 2)
    roid = create_method("roid", tiny_timm("test_vit"), batch_size=6)
    torch.testing.assert_close(ensemble_with_source(roid, logits, source_logits).exp(),
                               (logits.softmax(1) + prior_correction(source_logits).softmax(1)) / 2)


def test_inner_can_be_chosen() -> None:
    method = create_method("auto", tiny_timm("test_vit"), batch_size=8, inner="tent")
    assert method.describe()["inner"] == "tent"


def _source_and_batch_logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        source = model.eval()(x)
        batch = create_method("norm", copy.deepcopy(model), batch_size=8, bn_stats="batch").step(x).logits
    return source, batch


@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_batchnorm_choose_keeps_the_lower_entropy_prediction(shift: float) -> None:
    model = tiny_timm("test_resnet")
    x = random_inputs(1)[0] * 2 + shift
    source, batch = _source_and_batch_logits(model, x)
    method = create_method("auto", model, batch_size=8, bn_choice_temperature=0.0, bn_stream="off")
    assert method.config.bn_stats == "choose"
    logits = method.step(x).logits
    expected = batch if softmax_entropy(batch).mean() < softmax_entropy(source).mean() else source
    assert torch.allclose(logits, expected, atol=1e-5)
    assert method.stats()["batch_statistics_share"] == float(expected is batch)
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), tiny_timm("test_resnet").buffers(), strict=True))


@pytest.mark.parametrize("temperature", [0.005, 1.0])
def test_batchnorm_choose_mixes_near_ties(temperature: float) -> None:
    model = tiny_timm("test_resnet")
    x = random_inputs(1)[0] * 2 + 3.0
    source, batch = _source_and_batch_logits(model, x)
    method = create_method("auto", model, batch_size=8, bn_choice_temperature=temperature, bn_stream="off")
    lead = softmax_entropy(source).mean() - softmax_entropy(batch).mean()
    weight = torch.sigmoid(lead / (temperature * math.log(10)))
    expected = torch.lerp(source.softmax(1), batch.softmax(1), weight)
    assert torch.allclose(method.step(x).logits.softmax(1), expected, atol=1e-5)
    assert method.stats()["batch_statistics_share"] == pytest.approx(weight.item(), abs=1e-5)
    assert (0.0 < weight < 1.0) if temperature == 1.0 else True


def _first_bn_input_means(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-image channel means of the first BatchNorm's input (which depends on no statistics),
    from a copy of ``model`` in eval mode."""
    source = copy.deepcopy(model).eval()
    seen = []
    batchnorm_layers(source)[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        source(x)
    return seen[0].mean(dim=(2, 3))


def test_balanced_stream_statistics_count_unseen_classes_as_the_source() -> None:
    model = tiny_timm("test_resnet", num_classes=4)
    source_mean = batchnorm_layers(model)[0].running_mean.clone()
    pristine = copy.deepcopy(model)
    x = random_inputs(1)[0] * 2 + 3.0
    means = _first_bn_input_means(model, x)
    method = create_method("auto", model, batch_size=8, bn_stream="balanced", bn_stream_prior_images=0.0)
    method.bn_choice._stream_step(x, torch.zeros(8, dtype=torch.long))  # a batch of one class out of 4
    first = batchnorm_layers(method.stream_model)[0]
    assert torch.allclose(first.running_mean, (means.mean(0) + 3 * source_mean) / 4, atol=1e-5)
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), pristine.buffers(), strict=True))


def test_balanced_stream_statistics_of_a_batch_of_every_class_are_the_batch_statistics() -> None:
    model = tiny_timm("test_resnet", num_classes=4)
    x = random_inputs(1)[0] * 2 + 3.0
    _, batch = _source_and_batch_logits(model, x)
    method = create_method("auto", model, batch_size=8, bn_stream="balanced", bn_stream_prior_images=0.0)
    labels = torch.arange(8) % 4  # two images of each class: the class average is the batch's
    assert torch.allclose(method.bn_choice._stream_step(x, labels).logits, batch, atol=1e-4)


@pytest.mark.parametrize("labels", ["choice", "source"])
@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_balanced_stream_statistics_count_each_image_for_its_chosen_class(labels: str, shift: float) -> None:
    model = tiny_timm("test_resnet")
    x = random_inputs(1)[0] * 2 + shift
    source, batch = _source_and_batch_logits(model, x)
    method = create_method("auto", model, batch_size=8, bn_choice_temperature=0.0, bn_stream_labels=labels)
    seen = []
    original = method.bn_choice._stream_step
    method.bn_choice._stream_step = lambda x_, labels_: seen.append(labels_) or original(x_, labels_)  # type: ignore[method-assign]
    method.step(x)
    batch_wins = softmax_entropy(batch).mean() < softmax_entropy(source).mean()
    expected = batch if labels == "choice" and batch_wins else source
    assert torch.equal(seen[0], expected.argmax(1))


def test_balanced_stream_statistics_weigh_each_class_against_the_prior() -> None:
    model = tiny_timm("test_resnet", num_classes=4)
    source_mean = batchnorm_layers(model)[0].running_mean.clone()
    x = random_inputs(1)[0] * 2 + 3.0
    means = _first_bn_input_means(model, x)
    method = create_method("auto", model, batch_size=8, bn_stream_prior_images=96.0)  # 24 per class
    method.bn_choice._stream_step(x, torch.zeros(8, dtype=torch.long))  # 8 images of class 0: trust 8 / (8 + 24)
    trust = 8 / 32
    expected = (trust * means.mean(0) + (4 - trust) * source_mean) / 4
    assert torch.allclose(batchnorm_layers(method.stream_model)[0].running_mean, expected, atol=1e-5)


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_the_stream_statistics_prior_is_shared_by_the_classes(num_classes: int) -> None:
    model = tiny_timm("test_resnet", num_classes=num_classes)
    stats = create_method("auto", model, batch_size=8).bn_choice.stream_stats
    assert stats.prior == 320.0 / num_classes  # 32 per class on CIFAR-10, where it was chosen


def test_balanced_stream_statistics_move_each_class_by_its_momentum() -> None:
    model = tiny_timm("test_resnet", num_classes=4)
    source_mean = batchnorm_layers(model)[0].running_mean.clone()
    x1, x2 = (x * 2 + 3.0 for x in random_inputs(2))
    means1, means2 = (_first_bn_input_means(model, x) for x in (x1, x2))
    method = create_method("auto", model, batch_size=8, bn_stream="balanced", bn_stream_momentum=0.5,
                           bn_stream_prior_images=0.0)
    zeros = torch.zeros(8, dtype=torch.long)
    method.bn_choice._stream_step(x1, zeros)
    method.bn_choice._stream_step(x2, zeros)
    weight = 1 - 0.5 ** (8 * 4 / STREAM_MOMENTUM_IMAGES)  # 8 images of class 0, 4 classes
    class_mean = torch.lerp(means1.mean(0), means2.mean(0), weight)
    first = batchnorm_layers(method.stream_model)[0]
    assert torch.allclose(first.running_mean, (class_mean + 3 * source_mean) / 4, atol=1e-5)


def test_batchnorm_choose_at_one_image_never_takes_its_own_statistics() -> None:
    model = tiny_timm("test_resnet")
    x = random_inputs(1)[0][:1] * 2 + 3.0  # shifted: with a batch of 8 the batch statistics win
    with torch.no_grad():
        expected = model.eval()(x)
    method = create_method("auto", model, batch_size=1, bn_stream="off")
    assert torch.allclose(method.step(x).logits, expected, atol=1e-5)
    assert method.stats()["batch_statistics_share"] == 0.0
    balanced = create_method("auto", tiny_timm("test_resnet"), batch_size=1, bn_choice_temperature=1.0)
    for _ in range(3):
        balanced.step(x)
    shares = balanced.stats()
    assert shares["batch_statistics_share"] == 0.0 and 0.0 < shares["stream_statistics_share"] < 1.0


def test_guard_resets_then_falls_back_to_source() -> None:
    model = tiny_timm("test_vit")
    x = random_inputs(1)[0]
    with torch.no_grad():
        expected = model.eval()(x)
    method = create_method("auto", model, batch_size=8, inner="tent", window=8, max_collapses=2)
    method.guard.thresholds = Thresholds(diversity_ratio=1e9, max_agreement=1.0)  # every full window collapses
    method.step(x)
    method.step(x)
    assert [e["action"] for e in method.collapse_events] == ["reset", "source"]
    assert method.frozen_at == 1
    assert torch.allclose(method.step(x).logits, expected, atol=1e-5)  # the source model now


def _confident_vit() -> torch.nn.Module:
    """A tiny ViT whose source predictions are confident, so that flipping them costs accuracy."""
    model = tiny_timm("test_vit")
    with torch.no_grad():
        model.head.weight.mul_(50.0)
    return model


def _stub_step(method: Any, model: torch.nn.Module, sign: float) -> Any:
    """Makes the inner method predict (and learn nothing) with the source logits times ``sign``:
    1 agrees with the source, -1 predicts each image's least likely source class."""
    reference = copy.deepcopy(model).eval()

    def step(x: torch.Tensor) -> StepResult:
        with torch.no_grad():
            logits = reference(x)
        return StepResult(logits=sign * logits, used=torch.ones(len(x), dtype=torch.bool))

    method.inner.step = step
    return step


def test_change_window_estimates_harm_over_the_latest_images() -> None:
    model = _confident_vit()
    batches = random_inputs(6)
    window = ChangeWindow(10, size=16)
    with torch.no_grad():
        logits = [model.eval()(x) for x in batches]
    assert window.add(logits[0], logits[0].argmax(1)) is None  # 8 of 16 images
    assert window.add(logits[1], logits[1].argmax(1)) == 0.0  # agreeing predictions change nothing
    assert window.add(logits[2], logits[2].argmin(1)) <= -HARM_POINTS  # flipped confident predictions
    assert window.add(logits[3], logits[3].argmin(1)) <= -HARM_POINTS
    assert window.add(logits[4], logits[4].argmax(1)) <= -HARM_POINTS  # one harmful batch still in the window
    assert window.add(logits[5], logits[5].argmax(1)) == 0.0  # the harmful batches have left it


def test_guard_predicts_with_the_source_while_the_window_looks_harmful() -> None:
    model = _confident_vit()
    batches = random_inputs(5)
    with torch.no_grad():
        expected = [model.eval()(x) for x in batches]
    method = create_method("auto", model, batch_size=8, inner="tent", window=16)
    method.guard.thresholds = Thresholds(diversity_ratio=0.0, entropy_drop=math.inf)  # no collapse
    _stub_step(method, model, -1.0)
    outputs = [method.step(x).logits for x in batches]
    for out, source in zip(outputs, expected, strict=True):  # batch 0: not judged yet; then harmful
        assert torch.allclose(out, source, atol=1e-5)
    stats = method.stats()
    assert stats["guard_fallbacks"] == [[0, 5]] and stats["source_share"] == 1.0
    assert [r["batch"] for r in stats["guard_harm_resets"]] == [2, 4]  # a whole window of harm resets
    assert method.collapse_events == [] and method.frozen_at is None
    off = create_method("auto", copy.deepcopy(model), batch_size=8, inner="tent", window=16, harm_points=0.0,
                        source_ensemble=False)
    _stub_step(off, model, -1.0)
    assert all(torch.allclose(off.step(x).logits, -e, atol=1e-5) for x, e in zip(batches, expected, strict=True))


@pytest.mark.parametrize("judge_first", [True, False])
def test_guard_predicts_with_the_source_until_its_first_window_is_judged(judge_first: bool) -> None:
    model = _confident_vit()
    batches = random_inputs(3)
    with torch.no_grad():
        expected = [model.eval()(x) for x in batches]
    method = create_method("auto", model, batch_size=8, inner="tent", window=16, judge_first=judge_first,
                           source_ensemble=False)
    agreeing = _stub_step(method, model, 1.0)
    method.inner.step = lambda x: StepResult(logits=agreeing(x).logits + 1e-3, used=torch.ones(8, dtype=torch.bool))
    outputs = [method.step(x).logits for x in batches]
    assert torch.allclose(outputs[0], expected[0], atol=1e-5) == judge_first  # 8 of 16 images: not judged
    assert all(torch.allclose(o, e + 1e-3, atol=1e-5) for o, e in zip(outputs[1:], expected[1:], strict=True))
    assert method.stats()["guard_fallbacks"] == ([[0, 1]] if judge_first else [])


def test_guard_hands_back_to_the_inner_method_once_the_harm_has_left_the_window() -> None:
    model = _confident_vit()
    method = create_method("auto", model, batch_size=8, inner="tent", window=16)
    method.guard.thresholds = Thresholds(diversity_ratio=0.0, entropy_drop=math.inf)
    agreeing, flipping = _stub_step(method, model, 1.0), _stub_step(method, model, -1.0)
    for i, x in enumerate(random_inputs(6)):
        method.inner.step = flipping if i in (1, 2) else agreeing
        method.step(x)
    # batch 0: not judged yet; batches 1-2 flip: the window of 16 images (two batches) is harmful
    # from batch 1 until batch 2 has left it
    assert method.stats()["guard_fallbacks"] == [[0, 4]]
    assert [r["batch"] for r in method.stats()["guard_harm_resets"]] == [2]


def test_resume_restores_the_guard(tmp_path: Path) -> None:
    model = _confident_vit()
    batches = random_inputs(5)
    uninterrupted = create_method("auto", copy.deepcopy(model), batch_size=8, inner="tent", window=16)
    first = create_method("auto", copy.deepcopy(model), batch_size=8, inner="tent", window=16)
    for i, x in enumerate(batches[:3]):
        for m in (uninterrupted, first):
            _stub_step(m, model, -1.0 if i == 1 else 1.0)
            m.step(x)
    torch.save(first.state_for_resume(), tmp_path / "state.pt")
    resumed = create_method("auto", copy.deepcopy(model), batch_size=8, inner="tent", window=16)
    resumed.load_resume_state(torch.load(tmp_path / "state.pt", weights_only=True))
    _stub_step(uninterrupted, model, 2.0)  # agrees with the source, with other logits
    _stub_step(resumed, model, 2.0)
    for x in batches[3:]:  # judged, and batch 1's harm has left the window: the inner method's
        assert torch.equal(resumed.step(x).logits, uninterrupted.step(x).logits)
    assert resumed.stats() == uninterrupted.stats()
    assert resumed.stats()["guard_fallbacks"] == [[0, 3]] and resumed.batches_seen == 5


def test_auto_predicts_without_adapting_in_the_online_view() -> None:
    model = tiny_timm("test_vit")
    method = create_method("auto", model, batch_size=8, inner="roid")
    online = EveryKth(method, 2)
    for x in random_inputs(3):
        assert online.step(x).logits.shape == (8, 10)
    assert method.guard.change.estimate.images == 24  # the predicted batch is watched too
    method.guard.frozen_at = 0  # once frozen, the batches in between are the source's too
    x = random_inputs(1)[0]
    with torch.no_grad():
        assert torch.allclose(method.predict(x), method.guard.reference(x), atol=1e-5)


def test_adapt_default_is_auto_and_records_the_choice(tmp_path: Path, tiny_model_dir: Path) -> None:
    make_images(tmp_path / "images", 8)
    out = tmp_path / "out"
    result = invoke("adapt", tmp_path / "images", "--model", f"local-dir:{tiny_model_dir}", "-b", "4",
                    "--out", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "auto chose" in result.output
    record = json.loads((out / "run.json").read_text())
    assert record["method"]["method"] == "auto" and record["method"]["choice"]["method"] == DEFAULT_INNER


def test_entropy_window_covers_at_least_the_window_images() -> None:
    window = EntropyWindow(images=4)
    assert torch.equal(window.add(torch.tensor([2.0, 4.0]), 2), torch.tensor([1.0, 2.0]))
    assert torch.equal(window.add(torch.tensor([0.0, 0.0]), 2), torch.tensor([0.5, 1.0]))
    # a third batch of 2: the first falls out, the latest 4 images remain
    assert torch.equal(window.add(torch.tensor([4.0, 4.0]), 2), torch.tensor([1.0, 1.0]))
    assert torch.equal(EntropyWindow(images=4).add(torch.tensor([8.0]), 8), torch.tensor([1.0]))


def _calibrated_model(num_classes: int = 4, scale: float = 50.0) -> torch.nn.Module:
    """A tiny BatchNorm model with the source statistics of ``random_inputs``' images (as a trained
    model has its training data's) and its classifier scaled by ``scale`` (50: it predicts
    confidently)."""
    model = tiny_timm("test_resnet", num_classes=num_classes)
    for layer in batchnorm_layers(model):
        layer.reset_running_stats()
        layer.momentum = None  # the plain mean over the batches below
    model.train()
    with torch.no_grad():
        for x in random_inputs(8, batch=16, seed=7):
            model(x)
        model.get_classifier().weight.mul_(scale)
    return model.eval()


def _one_class_batch() -> torch.Tensor:
    """16 near copies of one image: a batch of one class, whose own statistics normalise it away."""
    image = random_inputs(1, batch=1, seed=3)[0]
    return image + 0.3 * torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def test_batchnorm_choice_falls_back_to_the_source_where_batch_statistics_flip_its_sure_predictions() -> None:
    x = _one_class_batch()
    with torch.no_grad():
        source = _calibrated_model().eval()(x)
    unchecked = create_method("auto", _calibrated_model(), batch_size=16, bn_stream="off",
                              bn_source_check=False)
    assert not torch.equal(unchecked.step(x).logits.argmax(1), source.argmax(1))  # the batch statistics won
    method = create_method("auto", _calibrated_model(), batch_size=16, bn_stream="off")
    assert torch.allclose(method.step(x).logits.softmax(1), source.softmax(1), atol=1e-5)
    stats = method.stats()
    assert [f["batch"] for f in stats["fallback_batches"]] == [0] and stats["fallback_share"] == 1.0
    assert stats["fallback_batches"][0]["left_out"] == ["batch_statistics"]
    assert "flips" in stats["fallback_batches"][0]["reason"] and stats["batch_statistics_share"] == 0.0


@pytest.mark.parametrize("stream", ["off", "balanced"])
def test_batchnorm_choice_keeps_its_predictions_where_nothing_is_ruled_out(stream: str) -> None:
    # a source unsure of its predictions: flips of them are within what its probabilities allow
    checked = create_method("auto", _calibrated_model(scale=1.0), batch_size=16, bn_stream=stream)
    unchecked = create_method("auto", _calibrated_model(scale=1.0), batch_size=16, bn_stream=stream,
                              bn_source_check=False)
    for x in random_inputs(3, batch=16, seed=11):  # varied images of the source's own kind
        assert torch.equal(checked.step(x).logits, unchecked.step(x).logits)
        assert checked.bn_choice.check.input_shift < INPUT_SHIFT
    assert checked.stats()["fallback_batches"] == [] and checked.stats()["batch_statistics_share"] > 0.0


def test_source_check_trusts_no_confidence_under_a_strong_input_shift() -> None:
    x = _one_class_batch()
    method = create_method("auto", _calibrated_model(), batch_size=16, bn_stream="off")
    method.step(x * 0.2)  # a fifth of the contrast: the first layer's input variance 25 times lower
    assert method.bn_choice.check.input_shift > INPUT_SHIFT
    assert method.stats()["fallback_batches"] == []
