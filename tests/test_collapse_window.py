"""The collapse window shared by the run's monitor and auto's guard (``tta_cli.collapse_window``)."""

from __future__ import annotations

import torch

from tta_cli.collapse_window import (
    CollapseWindow,
    Thresholds,
    default_window,
    effective_classes,
    frozen_copy,
    histogram_effective_classes,
)


def test_effective_classes_of_one_class_uniform_and_none() -> None:
    assert effective_classes(torch.zeros(6, dtype=torch.long), 10) == 1.0
    assert abs(effective_classes(torch.arange(10), 10) - 10.0) < 1e-9
    assert effective_classes(torch.zeros(0, dtype=torch.long), 10) == 0.0
    assert histogram_effective_classes(torch.zeros(4)) == 0.0


def test_window_keeps_the_latest_batches_that_hold_its_size() -> None:
    window = CollapseWindow(10, size=8)
    varied = (torch.arange(4), torch.ones(4))
    window.add(*varied)
    assert not window.full and window.collapse() is None
    window.add(*varied)
    window.add(*varied)
    assert window.full and window._images == 8  # the first batch left: the other two hold 8


def test_a_collapse_clears_the_window() -> None:
    window = CollapseWindow(10, size=4)
    one_class = (torch.zeros(4, dtype=torch.long), torch.zeros(4))
    window.add(*one_class)  # no source copy: one class with near-zero entropy is a collapse
    signals = window.collapse()
    assert signals is not None and signals["top_share"] == 1.0
    assert not window.full and window.collapse() is None
    lenient = CollapseWindow(10, size=4, thresholds=Thresholds(lone_class_share=1.1))
    lenient.add(*one_class)
    assert lenient.collapse() is None and lenient.full


def test_default_window_and_frozen_copy() -> None:
    assert default_window(64, 10) == 256 and default_window(512, 10) == 1024 and default_window(8, 100) == 800
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    model.register_forward_hook(lambda *args: None)
    frozen = frozen_copy(model)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert not frozen._forward_hooks and model._forward_hooks
