"""Label-free collapse signals over a sliding window of recent images: one implementation for the
run's collapse monitor (``tta_cli.monitor``) and auto's guard (``tta_cli.methods.auto.guard``).

Over the window, the adapted model's predictions are compared with a frozen source copy's on the
same images: the *effective number of predicted classes*, ``exp(H(histogram))``, against the
source's (a collapse onto one class gives 1 where the source gives several; a class-by-class stream
gives about 1 for both, which is not a collapse), the *agreement* with the source predictions, and
the mean prediction entropies in units of ln C (a collapsing entropy minimiser drives its own
towards 0 while the source's stays). Without a source copy only the adapted model's own diversity
is seen, so the rule is stricter. Thresholds and their measurement: ``docs/METHODS.md`` ("Collapse
detection").
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn


def histogram_effective_classes(hist: torch.Tensor) -> float:
    """exp of the entropy of a class histogram: 1 for one class, C for uniform, 0 when empty."""
    total = float(hist.sum())
    if not total:
        return 0.0
    p = hist.double() / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def effective_classes(pred: torch.Tensor, num_classes: int) -> float:
    """The effective number of classes among the predicted classes ``pred``."""
    if pred.numel() == 0:
        return 0.0
    return histogram_effective_classes(torch.bincount(pred.long(), minlength=num_classes))


@dataclass(frozen=True)
class Thresholds:
    """When a window counts as collapsed (see ``docs/METHODS.md`` for how these were chosen)."""

    diversity_ratio: float = 0.5
    """Adapted effective classes at most this share of the source's on the same images ..."""
    max_agreement: float = 0.6
    """... and at most this share of the predictions agrees with the source's, or one class has
    ``one_class_share`` of the window (a collapse onto the class the source itself predicts most
    keeps the agreement at that class's share of the source's predictions) ..."""
    one_class_share: float = 0.95
    entropy_drop: float = 0.25
    """... or the mean entropy fell this much (in units of ln C) below the source's with the
    diversity at most ``1.5 * diversity_ratio`` of the source's."""
    lone_class_share: float = 0.95
    """Without a reference: one class for this share of the window ..."""
    lone_entropy: float = 0.05
    """... with a mean entropy below this (units of ln C)."""


def window_signals(pred: torch.Tensor, entropy: torch.Tensor, source_pred: torch.Tensor | None,
                   source_entropy: torch.Tensor | None, num_classes: int) -> dict[str, float]:
    """The window's diversity, agreement and entropies (entropies in units of ln C)."""
    log_c = math.log(max(num_classes, 2))
    signals = {"effective_classes": effective_classes(pred, num_classes),
               "top_share": float(torch.bincount(pred.long()).max()) / max(pred.numel(), 1),
               "entropy": float(entropy.mean()) / log_c}
    if source_pred is not None and source_entropy is not None:
        signals["source_effective_classes"] = effective_classes(source_pred, num_classes)
        signals["agreement"] = float((pred == source_pred).double().mean())
        signals["source_entropy"] = float(source_entropy.mean()) / log_c
    return signals


def is_collapsed(signals: dict[str, float], thresholds: Thresholds) -> bool:
    if "source_effective_classes" not in signals:
        return (signals["top_share"] >= thresholds.lone_class_share
                and signals["entropy"] <= thresholds.lone_entropy)
    ratio = signals["effective_classes"] / max(signals["source_effective_classes"], 1e-9)
    if ratio <= thresholds.diversity_ratio and (signals["agreement"] <= thresholds.max_agreement
                                                or signals["top_share"] >= thresholds.one_class_share):
        return True
    dropped = signals["source_entropy"] - signals["entropy"] >= thresholds.entropy_drop
    return dropped and ratio <= 1.5 * thresholds.diversity_ratio


def default_window(batch_size: int, num_classes: int) -> int:
    """Images a window holds: at least 256, two batches and eight images per class."""
    return max(256, 2 * batch_size, 8 * num_classes)


class CollapseWindow:
    """The latest ``size`` or more images' predictions (whole batches), judged when full.

    Each batch adds its per-image columns: predicted class and entropy, and with a source copy the
    source's predicted class and entropy. The oldest batches leave while the rest still hold
    ``size`` images; after a collapse the window starts afresh, so a reset model is judged on its
    own predictions only."""

    def __init__(self, num_classes: int, size: int, thresholds: Thresholds | None = None) -> None:
        self.num_classes = num_classes
        self.size = size
        self.thresholds = thresholds or Thresholds()
        self._batches: deque[tuple[torch.Tensor, ...]] = deque()
        self._images = 0

    def add(self, *columns: torch.Tensor) -> None:
        """One batch: ``pred, entropy`` or ``pred, entropy, source_pred, source_entropy``."""
        self._batches.append(columns)
        self._images += len(columns[0])
        while self._images - len(self._batches[0][0]) >= self.size:
            self._images -= len(self._batches.popleft()[0])

    @property
    def full(self) -> bool:
        return self._images >= self.size

    def signals(self) -> dict[str, float]:
        columns = [torch.cat(c) for c in zip(*self._batches, strict=True)]
        source = (columns[2], columns[3]) if len(columns) == 4 else (None, None)
        return window_signals(columns[0], columns[1], *source, self.num_classes)

    def collapse(self) -> dict[str, float] | None:
        """The signals when the full window shows a collapse (the window then starts afresh)."""
        if not self.full:
            return None
        signals = self.signals()
        if not is_collapsed(signals, self.thresholds):
            return None
        self.clear()
        return signals

    def clear(self) -> None:
        self._batches.clear()
        self._images = 0

    def state(self) -> list[list[torch.Tensor]]:
        """The window's batches, for ``--resume``."""
        return [list(columns) for columns in self._batches]

    def load_state(self, state: list[list[torch.Tensor]]) -> None:
        self._batches = deque(tuple(columns) for columns in state)
        self._images = sum(len(columns[0]) for columns in self._batches)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode without gradients or hooks (a method's BatchNorm hooks must
    not follow it): the source model, frozen."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    for module in frozen.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    return frozen


__all__ = ["CollapseWindow", "Thresholds", "default_window", "effective_classes", "frozen_copy",
           "histogram_effective_classes", "is_collapsed", "window_signals"]
