"""auto's guard on batch-independent models: "never worse than the source".

A frozen source copy predicts every batch next to the inner method; over a window of recent images
the collapse signals of ``tta_cli.collapse_window`` (the ones the run's monitor uses: diversity
against the source's, agreement, entropy drop in units of ln C) flag a collapse; the inner method is
then reset, and after ``max_collapses`` events the source copy predicts for the rest of the stream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tta_cli.collapse_window import CollapseWindow, Thresholds, default_window
from tta_cli.methods.base import StepResult, TTAMethod, softmax_entropy


class Guard:
    """Runs ``inner`` on each batch and watches it against ``reference`` (a frozen source copy)."""

    def __init__(self, reference: nn.Module, max_collapses: int, window: int = 0, batch_size: int = 64,
                 thresholds: Thresholds | None = None) -> None:
        """``window``: images per window, 0 for ``collapse_window.default_window``."""
        self.reference = reference
        self.max_collapses = max_collapses
        self.size = window
        self.batch_size = batch_size
        self.thresholds = thresholds or Thresholds()
        self.window: CollapseWindow | None = None
        self.events: list[dict[str, Any]] = []
        self.frozen_at: int | None = None
        """The batch from which the source copy predicts (after ``max_collapses`` events)."""

    def step(self, inner: TTAMethod, x: torch.Tensor, batch: int) -> StepResult:
        """Batch number ``batch`` (0-based) through ``inner``, or through the source copy once frozen."""
        if self.frozen_at is not None:
            return StepResult(logits=self._source_logits(inner, x),
                              used=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        result = inner.step(x)
        source_logits = self._source_logits(inner, x)
        if self.window is None:
            num_classes = source_logits.shape[1]
            self.window = CollapseWindow(num_classes, self.size or default_window(self.batch_size, num_classes),
                                         self.thresholds)
        logits = result.logits.detach().float()
        self.window.add(logits.argmax(1).cpu(), softmax_entropy(logits).cpu(),
                        source_logits.argmax(1).cpu(), softmax_entropy(source_logits).cpu())
        signals = self.window.collapse()
        if signals is not None:
            self._on_collapse(inner, signals, batch)
        return result

    def _on_collapse(self, inner: TTAMethod, signals: dict[str, float], batch: int) -> None:
        frozen = len(self.events) + 1 >= self.max_collapses
        self.events.append({"batch": batch, "action": "source" if frozen else "reset",
                            "signals": {k: round(v, 4) for k, v in signals.items()}})
        inner.reset()
        if frozen:
            self.frozen_at = batch

    @torch.no_grad()
    def _source_logits(self, inner: TTAMethod, x: torch.Tensor) -> torch.Tensor:
        with inner.autocast():
            return self.reference(inner.prepare_input(x)).float()
