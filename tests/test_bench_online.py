"""The online view: k from the measured speeds, and adapting on every k-th batch only."""

from __future__ import annotations

import torch
from torch import nn

from tta_cli.bench.online import EveryKth, online_k
from tta_cli.methods.base import StepResult


class Counting:
    """A stand-in method: counts its adapting steps; its model's output says how many there were."""

    def __init__(self) -> None:
        self.adapted = 0
        self.model = nn.Identity()

    def step(self, x: torch.Tensor) -> StepResult:
        self.adapted += 1
        return StepResult(logits=self.run_model(x), used=torch.ones(len(x), dtype=torch.bool))

    def run_model(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 2), float(self.adapted))

    def settle(self) -> None:
        self.settled = True


def test_k_is_the_rounded_up_speed_ratio() -> None:
    assert online_k(100.0, 100.0) == 1
    assert online_k(100.0, 99.0) == 2
    assert online_k(100.0, 25.0) == 4 and online_k(100.0, 24.0) == 5
    assert online_k(100.0, 300.0) == 1
    assert online_k(None, 10.0) == 1 and online_k(10.0, None) == 1


def test_adapts_on_every_kth_batch_and_predicts_the_rest_with_the_current_model() -> None:
    method = Counting()
    wrapped = EveryKth(method, 3)  # type: ignore[arg-type]
    x = torch.zeros(4, 2)
    outputs = [wrapped.step(x) for _ in range(7)]
    assert method.adapted == 3  # batches 0, 3 and 6
    assert [int(o.logits[0, 0]) for o in outputs] == [1, 1, 1, 2, 2, 2, 3]
    assert [bool(o.used.any()) for o in outputs] == [True, False, False, True, False, False, True]
    wrapped.settle()  # everything else is the method's
    assert method.settled


def test_predict_is_preferred_when_the_method_has_one() -> None:
    method = Counting()
    method.predict = lambda x: torch.full((len(x), 2), -1.0)  # type: ignore[attr-defined]
    wrapped = EveryKth(method, 2)  # type: ignore[arg-type]
    wrapped.step(torch.zeros(1, 2))
    assert float(wrapped.step(torch.zeros(1, 2)).logits[0, 0]) == -1.0
