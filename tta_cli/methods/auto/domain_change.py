"""auto on batch-independent models: resetting the inner method where the input domain changes.

On a continual stream (one corruption after another) the inner method drifts: what it learnt on
one corruption it carries into the next, and its flips of the source's predictions grow along the
stream. Resetting it where the corruption changes removes most of the loss (GroupNorm ResNet-18,
CIFAR-10-C, B = 16: ROID -4.4 -> -0.9, -4.5 -> +0.2 and -2.9 -> +1.5 against the source with the
changes given; docs/BENCHMARKS.md). This module finds the changes without labels.

What it watches is the input of the source copy's first normalisation layer (after the stem): per
image, each channel's mean and log-variance: texture, contrast, noise and colour statistics, which a
corruption moves and which the class of the image moves much less than deeper features do (the
pooled features move more with the class mix than with the corruption). What remains of the class is
taken out: each image's statistics minus the mean of its class (the source's prediction) in the
current *segment* of the stream (since the last change). The test of a batch (or of the latest
batches, until they hold ``MIN_TEST_IMAGES``) is

    z = n ||mean of its residuals||^2 / (sum over dimensions of the segment's residual variance)

about 1 while the domain stays (the residuals' mean then has the variance of a mean of n draws),
growing with n and the shift when it changes. Above ``Z_CHANGE`` the inner method is reset and a new
segment starts; its statistics gather over ``WARM_IMAGES`` images before it is tested again.

A class-ordered stream also moves these statistics (a run of ships is bluer than a run of cats), and
is sometimes taken for a change; a reset there was measured to cost nothing (ROID gained from it on
those streams too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tta_cli.methods.collectives import world
from tta_cli.methods.selection import norm_modules

Z_CHANGE = 5.0
"""A change: the residual mean of the tested images at least this many times its sampling noise."""
WARM_IMAGES = 64
"""A new segment gathers this many images before it is tested."""
MIN_TEST_IMAGES = 16
"""Batches smaller than this are tested together."""
MIN_CLASS_IMAGES = 4
"""An image counts in a test once its class holds this many images in the segment."""


def first_norm_statistics(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 2 channels): each image's channel means and log-variances at ``module``'s input."""
    x = x.detach().float()
    if x.dim() == 2:  # (B, features): one value per channel
        x = x.unsqueeze(-1)
    elif isinstance(module, nn.LayerNorm) and x.shape[-1] == module.normalized_shape[0] \
            and not (x.dim() == 4 and x.shape[1] == module.normalized_shape[0]):
        x = x.movedim(-1, 1)  # channels last (a transformer's tokens) to channels first
    flat = x.flatten(2)  # (B, channels, values)
    return torch.cat([flat.mean(2), flat.var(2, unbiased=False).clamp_min(1e-6).log()], 1)


class DomainChange:
    """Watches the source copy's first normalisation layer; ``add`` says where the domain changed."""

    def __init__(self, reference: nn.Module) -> None:
        norms = norm_modules(reference)
        self.num_classes = 0
        self.changes: list[int] = []
        """The batches where a change was found (the inner method was reset before their step)."""
        self._latest: torch.Tensor | None = None
        self._handle = norms[0][1].register_forward_pre_hook(self._hook) if norms else None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._segment: dict[str, torch.Tensor] | None = None

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.observe(first_norm_statistics(module, args[0]))

    def observe(self, statistics: torch.Tensor) -> None:
        """The next ``add``'s batch statistics (``first_norm_statistics``), as the hook records them
        on each forward of the watched model (a replay feeds recorded ones)."""
        self._latest = statistics

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()

    def add(self, source_pred: torch.Tensor, num_classes: int, batch: int) -> bool:
        """The latest source forward's batch and ``source_pred``, the source's predictions of this
        process's rows (data-parallel, both are gathered into the global batch's in one call):
        whether the domain changed with it."""
        if self._latest is None:
            return False
        self.num_classes = num_classes
        both = world().gather_rows(torch.cat([self._latest, source_pred[:, None].to(self._latest)], 1))
        self._latest = None
        self._pending.append((both[:, :-1].double().cpu(), both[:, -1].long().cpu()))
        if sum(len(p) for _, p in self._pending) < MIN_TEST_IMAGES:
            return False
        statistics = torch.cat([s for s, _ in self._pending])
        pred = torch.cat([p for _, p in self._pending])
        self._pending.clear()
        if self._segment is None:
            self._segment = self._empty(statistics.shape[1])
        known, residuals = self._residuals(statistics, pred)
        changed = self._changed(known, residuals)
        if changed:
            self.changes.append(batch)
            self._segment = self._empty(statistics.shape[1])
            known, residuals = self._residuals(statistics, pred)  # none: the new segment knows no class yet
        self._gather(statistics, pred, known, residuals)
        return changed

    def _empty(self, dims: int) -> dict[str, torch.Tensor]:
        return {"count": torch.zeros(self.num_classes, dtype=torch.float64),
                "sum": torch.zeros(self.num_classes, dims, dtype=torch.float64),
                "residual_squares": torch.zeros(dims, dtype=torch.float64),
                "residuals": torch.zeros((), dtype=torch.float64)}

    def _residuals(self, statistics: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(which images' classes the segment knows, their statistics minus their class's mean)."""
        segment = self._segment
        assert segment is not None
        known = segment["count"][pred] >= MIN_CLASS_IMAGES
        return known, statistics[known] - segment["sum"][pred[known]] / segment["count"][pred[known], None]

    def _changed(self, known: torch.Tensor, residuals: torch.Tensor) -> bool:
        segment = self._segment
        assert segment is not None
        if float(segment["residuals"]) < WARM_IMAGES or int(known.sum()) < 2:
            return False
        noise = (segment["residual_squares"] / segment["residuals"]).sum().clamp_min(1e-12)
        return float(len(residuals) * residuals.mean(0).pow(2).sum() / noise) > Z_CHANGE

    def _gather(self, statistics: torch.Tensor, pred: torch.Tensor, known: torch.Tensor,
                residuals: torch.Tensor) -> None:
        """The batch into the segment: its residuals (against the class means before it), then the means."""
        segment = self._segment
        assert segment is not None
        segment["residual_squares"] += residuals.pow(2).sum(0)
        segment["residuals"] += float(known.sum())
        segment["count"].index_add_(0, pred, torch.ones(len(pred), dtype=torch.float64))
        segment["sum"].index_add_(0, pred, statistics)

    def state(self) -> dict[str, Any]:
        return {"changes": self.changes, "segment": self._segment, "num_classes": self.num_classes,
                "pending": [[s, p] for s, p in self._pending]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.changes, self._segment = list(state["changes"]), state["segment"]
        self.num_classes = int(state["num_classes"])
        self._pending = [(s, p) for s, p in state["pending"]]
