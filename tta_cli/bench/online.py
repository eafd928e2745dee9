"""The online view of a benchmark (Alfarra et al., "Evaluation of Test-Time Adaptation Under
Computational Time Constraints", ICML 2024).

The stream does not wait for a slow method: a method k times slower than the source model (k from
the measured images per second of both, on the same stream, rounded up) is still adapting when
the next k - 1 batches arrive. It adapts on batches 0, k, 2k, ... and predicts the batches in
between with its current model, without adapting on them. ``tta bench`` re-runs each slower
method in this mode on the identical stream (a faithful re-run, not a simulation from the
offline run's predictions, which came from a model adapted on every batch).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tta_cli.methods.base import StepResult, TTAMethod


def online_k(source_images_per_second: float | None, images_per_second: float | None) -> int:
    """How many batches pass while the method adapts on one: ceil(source speed / its speed)."""
    if not source_images_per_second or not images_per_second:
        return 1
    return max(1, math.ceil(source_images_per_second / images_per_second - 1e-9))


class EveryKth:
    """A method that adapts on every k-th batch only; the others are predicted by the model it
    holds (``predict`` where the method defines one, e.g. a teacher model, else ``run_model``)."""

    def __init__(self, method: TTAMethod, k: int) -> None:
        self.method = method
        self.k = k
        self.batches = 0

    def step(self, x: torch.Tensor) -> StepResult:
        index, self.batches = self.batches, self.batches + 1
        if index % self.k == 0:
            return self.method.step(x)
        predict = getattr(self.method, "predict", None)
        with torch.no_grad():
            logits = predict(x) if callable(predict) else self.method.run_model(x)
        return StepResult(logits=logits.float(), used=torch.zeros(len(x), dtype=torch.bool, device=x.device))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.method, name)
