"""methods/auto/few_classes: which batches LAME predicts under auto's guard, and how."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.helpers import random_inputs, tiny_timm
from tta_cli.methods import create_method
from tta_cli.methods.auto.few_classes import CONCENTRATION, FewClasses, add_to_ranges, lame_predictions
from tta_cli.methods.lame import LAMEConfig, lame_log_probs


def _stream(order: str, batches: int, batch_size: int, classes: int = 10, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if order == "shuffled":
        labels = torch.randint(0, classes, (batches * batch_size,), generator=g)
    elif order == "classes":  # each class for two batches, then the next
        labels = torch.arange(batches * batch_size) // (2 * batch_size) % classes
    else:  # the source predicts one class everywhere
        labels = torch.full((batches * batch_size,), 4)
    return list(labels.split(batch_size))


@pytest.mark.parametrize("batch_size", [2, 4, 16, 64])
def test_a_shuffled_stream_is_never_given_to_lame(batch_size: int) -> None:
    gate = FewClasses(10, 256)
    assert not any(gate.add(pred, i) for i, pred in enumerate(_stream("shuffled", 400 // batch_size + 8, batch_size)))
    assert gate.batches == []


def test_a_new_shift_that_makes_the_source_favour_other_classes_is_not_given_to_lame() -> None:
    # shuffled labels, but under each of five shifts the source predicts one favourite class for
    # 80% of the images (as a weak source does under noise or blur): every batch alike
    g = torch.Generator().manual_seed(0)
    gate, batch, given = FewClasses(10, 256), 0, []
    for favourite in range(5):
        for within in range(800 // 16):
            pred = torch.randint(0, 10, (16,), generator=g)
            pred[torch.rand(16, generator=g) < 0.8] = favourite
            if gate.add(pred, batch):
                given.append(within)
            batch += 1
    # only while the stretch still holds the previous shift's favourite (its first 256 images)
    assert all(within < 256 // 16 for within in given) and len(given) <= 8


def test_a_stream_predicted_as_one_class_everywhere_is_never_given_to_lame() -> None:
    gate = FewClasses(10, 256)
    assert not any(gate.add(pred, i) for i, pred in enumerate(_stream("one-class", 20, 16)))


def test_a_class_ordered_stream_is_given_to_lame_once_other_classes_were_seen() -> None:
    gate = FewClasses(10, 256)
    taken = [gate.add(pred, i) for i, pred in enumerate(_stream("classes", 20, 16))]
    assert not taken[0]  # the stream so far is this one class: nothing to compare with
    assert all(taken[6:])  # four classes seen: each batch holds a quarter of them or fewer
    assert gate.ratio is not None and gate.ratio >= CONCENTRATION
    assert gate.batches[-1][1] == 20


def test_batches_of_one_image_are_never_given_to_lame() -> None:
    gate = FewClasses(10, 256)
    assert not any(gate.add(pred, i) for i, pred in enumerate(_stream("classes", 50, 1)))


def test_the_gate_resumes_where_it_stopped(tmp_path: Path) -> None:
    batches = _stream("classes", 12, 8)
    whole, first = FewClasses(10, 256), FewClasses(10, 256)
    for i, pred in enumerate(batches[:6]):
        whole.add(pred, i)
        first.add(pred, i)
    torch.save(first.state(), tmp_path / "gate.pt")
    resumed = FewClasses(10, 256)
    resumed.load_state(torch.load(tmp_path / "gate.pt", weights_only=True))
    for i, pred in enumerate(batches[6:], start=6):
        assert resumed.add(pred, i) == whole.add(pred, i)
    assert resumed.state()["batches"] == whole.state()["batches"]


def test_lame_predictions_are_the_lame_methods() -> None:
    model = tiny_timm("test_vit")
    x = random_inputs(1)[0]
    lame = create_method("lame", copy.deepcopy(model), batch_size=8)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model.get_classifier()(features)
    assert torch.equal(lame_predictions(features, logits), lame.step(x).logits)
    assert torch.equal(lame_predictions(features, logits), lame_log_probs(features, logits, LAMEConfig()))


@pytest.mark.parametrize("arch", ["test_efficientnet_gn", "test_vit"])
def test_the_guard_gives_batches_of_few_classes_to_lame_on_the_source_copy(arch: str) -> None:
    model = tiny_timm(arch)
    method = create_method("auto", copy.deepcopy(model), batch_size=8, judge_first=False)
    off = create_method("auto", copy.deepcopy(model), batch_size=8, judge_first=False, few_classes=False)
    guard = method.guard
    assert guard is not None and guard.with_features
    x = random_inputs(1)[0]
    method.reseed(0)
    off.reseed(0)
    unchanged = method.step(x).logits
    assert torch.equal(unchanged, off.step(x).logits)  # the first batch: nothing to compare with
    assert guard.few_classes is not None
    guard.few_classes.add = lambda pred, batch: True  # type: ignore[method-assign]
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = lame_predictions(features, model.get_classifier()(features))
        source = model(x)
    out = method.step(x)
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.allclose(out.source_logits, source, atol=1e-5)  # the source copy's, through timm's split


def test_without_it_the_guard_computes_no_features() -> None:
    method = create_method("auto", tiny_timm("test_vit"), batch_size=8, few_classes=False)
    method.step(random_inputs(1)[0])
    assert method.guard is not None and method.guard.few_classes is None
    assert method.stats()["lame_batches"] == [] and method.stats()["lame_share"] == 0.0


def test_batches_are_recorded_as_ranges() -> None:
    ranges: list[list[int]] = []
    for batch in (3, 4, 5, 8, 10, 11):
        add_to_ranges(ranges, batch)
    assert ranges == [[3, 6], [8, 9], [10, 12]]


def test_a_model_without_timms_head_split_gets_no_lame() -> None:
    class Plain(torch.nn.Module):  # no forward_features / forward_head: the guard keeps its forward
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10),
                                           torch.nn.LayerNorm(10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    method = create_method("auto", Plain(), batch_size=8)
    assert method.guard is not None and not method.guard.with_features
    assert method.step(random_inputs(1)[0]).logits.shape == (8, 10)
