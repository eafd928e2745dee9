"""The label-free change estimate and harm verdict (tta_cli.trust) on streams whose truth is built in."""

from __future__ import annotations

import math

import pytest
import torch

from tta_cli.collapse_window import effective_classes
from tta_cli.trust import ChangeEstimate, flip_auc, judge, prior_shift

C = 10


def source_logits(labels: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Logits that predict ``labels`` with the given margin over the runner-up (label + 1)."""
    logits = torch.zeros(len(labels), C)
    logits[torch.arange(len(labels)), labels] = margin
    logits[torch.arange(len(labels)), (labels + 1) % C] = 0.5
    return logits


def one_hot_logits(pred: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, C).float() * 10


def test_same_predictions_are_no_change() -> None:
    labels = torch.arange(256) % C
    logits = source_logits(labels, torch.full((256,), 3.0))
    j = judge(logits, logits.clone())
    assert j.verdict == "no-change"
    assert j.estimated_change == 0.0 and j.changed_share == 0.0


def test_flipping_the_least_confident_predictions_reads_as_a_gain() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, C, (512,), generator=g)
    margin = 0.6 + torch.rand(512, generator=g) * 4
    source = source_logits(labels, margin)
    adapted_pred = labels.clone()
    unsure = margin < 1.4  # the source's least confident fifth moves to its runner-up class
    adapted_pred[unsure] = (labels[unsure] + 1) % C
    j = judge(source, one_hot_logits(adapted_pred))
    assert j.signals["flip_auc"] > 0.9
    assert j.estimated_change > 0 and j.verdict == "ok"


def _least_confident_flipped(classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source logits over ``classes`` and adapted logits that move the least confident fifth of the
    source's predictions to its runner-up class (a gain as the estimate reads it)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (512,), generator=g)
    margin = 0.6 + torch.rand(512, generator=g) * 4
    source = torch.zeros(512, classes)
    source[torch.arange(512), labels] = margin
    source[torch.arange(512), (labels + 1) % classes] = 0.5
    pred = torch.where(margin < 1.4, (labels + 1) % classes, labels)
    return source, torch.nn.functional.one_hot(pred, classes).float() * 10


def test_a_judgement_beyond_the_validated_classes_is_marked() -> None:
    for classes, validated in ((C, True), (100, False)):
        j = judge(*_least_confident_flipped(classes))
        assert j.verdict == "ok" and j.validated is validated


def test_random_flips_of_confident_predictions_read_as_harm() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, C, (512,), generator=g)
    source = source_logits(labels, torch.full((512,), 4.0) + torch.rand(512, generator=g))
    adapted_pred = labels.clone()
    chosen = torch.rand(512, generator=g) < 0.4
    adapted_pred[chosen] = torch.randint(0, C, (int(chosen.sum()),), generator=g)
    j = judge(source, one_hot_logits(adapted_pred))
    assert j.estimated_change < 0
    assert j.verdict == "hurt" and j.flags_harm


def test_scrambled_class_ordered_batches_are_flagged() -> None:
    """Batch statistics on a class-by-class stream: the source predicts each batch's one class, the
    adapted model spreads every batch over many classes while the stream keeps all ten."""
    labels = torch.arange(C).repeat_interleave(64)
    source = source_logits(labels, torch.full((len(labels),), 5.0))
    g = torch.Generator().manual_seed(2)
    adapted_pred = torch.where(torch.rand(len(labels), generator=g) < 0.5, labels,
                               torch.randint(0, C, (len(labels),), generator=g))
    j = judge(source, one_hot_logits(adapted_pred), batch_size=64)
    assert j.signals["scramble"] > math.log(1.25)
    assert j.flags_harm


def test_prior_shift_leaves_an_unshifted_window_alone_and_follows_a_shifted_one() -> None:
    probs = torch.full((8, C), 1.0 / C, dtype=torch.float64)
    probs[:, 0] += 0.05
    probs /= probs.sum(1, keepdim=True)
    stream = probs.mean(0)
    assert torch.allclose(prior_shift(probs, probs, stream), probs)
    skewed = torch.zeros(8, C, dtype=torch.float64)
    skewed[:, 3] = 0.6
    skewed[:, 4] = 0.4
    uniform = torch.full((C,), 1.0 / C, dtype=torch.float64)
    adjusted = prior_shift(skewed, skewed, uniform)
    assert float(adjusted[0, 3]) > 0.6  # the recent prior (mostly class 3) sharpens the source's belief


@pytest.mark.parametrize(("flipped", "kept", "expected"), [
    ([0, 1, 0, 0], [0, 0, 0, 1], 1.0),   # every flip below every kept image
    ([0, 0, 0, 1], [1, 0, 0, 0], 0.0),   # every flip above
    ([0, 1, 0, 0], [0, 1, 0, 0], 0.5),   # ties count half
])
def test_flip_auc(flipped: list[int], kept: list[int], expected: float) -> None:
    assert flip_auc(torch.tensor(flipped), torch.tensor(kept)) == pytest.approx(expected)


def test_non_finite_rows_are_left_out() -> None:
    estimate = ChangeEstimate(C)
    logits = source_logits(torch.arange(4), torch.full((4,), 3.0))
    logits[1] = float("nan")
    estimate.add(logits, torch.tensor([0, -1, 2, 3]))
    j = estimate.judgement()
    assert j.changed_share == 0.0 and math.isfinite(j.estimated_change)


def test_effective_classes() -> None:
    assert effective_classes(torch.zeros(5, dtype=torch.long), C) == pytest.approx(1.0)
    assert effective_classes(torch.arange(C), C) == pytest.approx(C)


def test_a_checkpoint_without_image_counts_in_the_prior_window_loads() -> None:
    """Checkpoints written before the sampled reference kept the window's probabilities alone."""
    estimate = ChangeEstimate(3)
    estimate.add(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 1]))
    state = estimate.state()
    state["recent"] = [probs for probs, _ in state["recent"]]
    restored = ChangeEstimate(3)
    restored.load_state(state)
    assert [images for _, images in restored.recent] == [2]
    restored.add(torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([2]))
    assert restored.images == 3
