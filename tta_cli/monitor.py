"""Label-free collapse detection for every method, and the end-of-run health verdict.

A ``CollapseMonitor`` is a sink: it sees each batch's predictions and, when it has a
``SourceReference`` (a frozen copy of the source model in eval mode, one no-grad forward per batch),
the source model's predictions on the same images. Over a sliding window of recent images it
compares:

* the *effective number of predicted classes*, ``exp(H(histogram of predicted classes))``, of the
  adapted model against the source model's on the same images (a collapse onto one class gives 1
  where the source gives several; a class-by-class stream gives about 1 for both, which is not a
  collapse);
* the *agreement* with the source predictions;
* the mean prediction entropy of both, divided by ln C (a collapsing entropy minimiser drives its
  own entropy towards 0 while the source's stays where it was).

Without a reference only the adapted model's own diversity is seen, so the rule is stricter (one
class for almost every image of a long window, with near-zero entropy) and label-shift streams of a
confident model can still trigger it; the reference is on by default for methods that change the
model. Thresholds and their measurement: ``docs/METHODS.md`` ("Collapse detection").
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tta_cli.errors import TTAError
from tta_cli.outputs import BatchOutputs

OnCollapse = Literal["reset", "stop", "warn"]
ON_COLLAPSE_CHOICES: tuple[str, ...] = ("reset", "stop", "warn")


def effective_classes(pred: torch.Tensor, num_classes: int) -> float:
    """exp of the entropy of the predicted-class histogram: 1 for one class, C for uniform."""
    if pred.numel() == 0:
        return 0.0
    p = torch.bincount(pred.long(), minlength=num_classes).double() / pred.numel()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


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


class SourceReference:
    """A frozen copy of the source model in eval mode (source BatchNorm statistics): its
    predictions on each batch, one no-grad forward (the cost of a ``source`` run per batch)."""

    def __init__(self, model: nn.Module, device: torch.device | None = None) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for module in self.model.modules():  # a copy must not carry a method's BatchNorm hooks
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
        self.device = device or next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device)).float()


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


class CollapseStop(TTAError):
    """``--on-collapse stop``: the run ends at the first collapse event."""

    def __init__(self, batch: int) -> None:
        super().__init__(f"adaptation collapsed at batch {batch} (--on-collapse stop)",
                         "see collapse_events in run.json; try --method auto or --on-collapse reset",
                         exit_code=4)


@dataclass
class CollapseEvent:
    batch: int
    images_seen: int
    action: str
    signals: dict[str, float] = field(default_factory=dict)


class CollapseMonitor:
    """A sink that flags collapse without labels and resets, stops or warns (``on_collapse``).

    ``window`` images (default ``max(256, 2 B)``, at least ``8 C``) are compared; after an event the
    window starts afresh, so a reset model is judged on its own predictions only.
    """

    def __init__(self, method: Any, num_classes: int, reference: SourceReference | None = None,
                 on_collapse: OnCollapse = "reset", window: int | None = None, batch_size: int = 64,
                 thresholds: Thresholds | None = None) -> None:
        if on_collapse not in ON_COLLAPSE_CHOICES:
            raise TTAError(f"--on-collapse must be one of {', '.join(ON_COLLAPSE_CHOICES)}, got {on_collapse!r}")
        self.method = method
        self.num_classes = num_classes
        self.reference = reference
        self.on_collapse = on_collapse
        self.window = window or max(256, 2 * batch_size, 8 * num_classes)
        self.thresholds = thresholds or Thresholds()
        self.events: list[CollapseEvent] = []
        self.last_source_pred: torch.Tensor | None = None
        self._recent: deque[tuple[torch.Tensor, ...]] = deque()
        self._recent_n = 0
        self._batches = 0
        self._images = 0
        self.whole = _StreamCounts(num_classes)

    def on_batch(self, out: BatchOutputs) -> None:
        self.last_source_pred = None
        if not len(out.batch.items):
            return
        parts: tuple[torch.Tensor, ...] = (out.pred, out.entropy)
        if self.reference is not None:
            logits = self.reference.logits(out.batch.images)
            source_pred = torch.where(torch.isfinite(logits).all(1), logits.argmax(1), -1).cpu()
            source_entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).cpu()
            self.last_source_pred = source_pred
            parts = (*parts, source_pred, source_entropy)
        finite = out.pred >= 0  # -1: a prediction from non-finite logits (no class, no entropy)
        if len(parts) == 4:
            finite &= parts[2] >= 0
        self.whole.non_finite += int((~finite).sum())
        parts = tuple(part[finite] for part in parts)
        n = len(parts[0])
        if not n:
            return
        self.whole.add(*parts)
        self._recent.append(parts)
        self._recent_n += n
        while self._recent_n - len(self._recent[0][0]) >= self.window:
            self._recent_n -= len(self._recent.popleft()[0])
        self._batches += 1
        self._images += n
        if self._recent_n >= self.window:
            self._check()

    def state_for_resume(self) -> dict[str, Any]:
        """The window, the whole-stream counts and the events, for ``--resume`` (tensors, numbers, lists):
        the health of a resumed run covers the whole stream."""
        whole = self.whole
        return {"recent": [list(parts) for parts in self._recent], "recent_n": self._recent_n,
                "batches": self._batches, "images": self._images, "events": [asdict(e) for e in self.events],
                "whole": {"images": whole.images, "non_finite": whole.non_finite, "changed": whole.changed,
                          "hist": whole.hist, "source_hist": whole.source_hist, "entropy_sum": whole.entropy_sum,
                          "source_entropy_sum": whole.source_entropy_sum, "has_source": whole.has_source}}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self._recent = deque(tuple(parts) for parts in state["recent"])
        self._recent_n, self._batches, self._images = state["recent_n"], state["batches"], state["images"]
        self.events = [CollapseEvent(**event) for event in state["events"]]
        for name, value in state["whole"].items():
            setattr(self.whole, name, value)

    def signals(self) -> dict[str, float]:
        columns = [torch.cat(c) for c in zip(*self._recent, strict=True)]
        source = (columns[2], columns[3]) if len(columns) == 4 else (None, None)
        return window_signals(columns[0], columns[1], *source, self.num_classes)

    def _check(self) -> None:
        signals = self.signals()
        if not is_collapsed(signals, self.thresholds):
            return
        batch = self._batches - 1
        event = CollapseEvent(batch, self._images, self.on_collapse, {k: round(v, 4) for k, v in signals.items()})
        self.events.append(event)
        self._recent.clear()
        self._recent_n = 0
        if self.on_collapse == "reset":
            self.method.reset()
        elif self.on_collapse == "stop":
            raise CollapseStop(batch)

    def progress_text(self) -> str | None:
        """For the progress line: the number of events and the batch of the last one."""
        if not self.events:
            return None
        return f"collapse {len(self.events)} (batch {self.events[-1].batch}, {self.on_collapse})"

    def record(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.events]

    def health(self) -> dict[str, Any]:
        health = health_verdict(self.whole, self.events, self.on_collapse, self.reference is not None)
        if getattr(self.method, "name", "") == "source":  # its predictions are the source's by definition
            health.update(verdict="no-change", reasons=["the source model itself, not adapted"])
        return health


class _StreamCounts:
    """Whole-stream counts for the verdict: predicted-class histograms and agreement."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.images = 0
        self.non_finite = 0
        """Predictions from non-finite logits (of the method or the source): left out of the rest."""
        self.changed = 0
        self.hist = torch.zeros(num_classes, dtype=torch.long)
        self.source_hist = torch.zeros(num_classes, dtype=torch.long)
        self.entropy_sum = 0.0
        self.source_entropy_sum = 0.0
        self.has_source = False

    def add(self, pred: torch.Tensor, entropy: torch.Tensor, source_pred: torch.Tensor | None = None,
            source_entropy: torch.Tensor | None = None) -> None:
        self.images += pred.numel()
        self.hist += torch.bincount(pred.long(), minlength=self.num_classes)[: self.num_classes]
        self.entropy_sum += float(entropy.sum())
        if source_pred is not None and source_entropy is not None:
            self.has_source = True
            self.changed += int((pred != source_pred).sum())
            self.source_hist += torch.bincount(source_pred.long(), minlength=self.num_classes)[: self.num_classes]
            self.source_entropy_sum += float(source_entropy.sum())


def _hist_effective(hist: torch.Tensor) -> float:
    total = int(hist.sum())
    if not total:
        return 0.0
    p = hist.double() / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


NO_CHANGE_SHARE = 0.01
"""Below this share of predictions differing from the source, adaptation changed nothing."""
LOW_DIVERSITY_RATIO = 0.7
"""Whole-stream diversity below this share of the source's is evidence of harm (suspect)."""


def health_verdict(counts: _StreamCounts, events: list[CollapseEvent], on_collapse: str,
                   has_reference: bool) -> dict[str, Any]:
    """``ok``, ``no-change``, ``suspect`` or ``collapsed``, with the reasons, without labels."""
    reasons: list[str] = []
    log_c = math.log(max(counts.num_classes, 2))
    health: dict[str, Any] = {"images": counts.images, "collapse_events": len(events),
                              "effective_classes": round(_hist_effective(counts.hist), 3)}
    if counts.images:
        health["mean_entropy"] = round(counts.entropy_sum / counts.images / log_c, 4)
    verdict = "ok"
    if has_reference and counts.has_source and counts.images:
        share = counts.changed / counts.images
        source_div = _hist_effective(counts.source_hist)
        health.update(changed_share=round(share, 4), source_effective_classes=round(source_div, 3),
                      source_mean_entropy=round(counts.source_entropy_sum / counts.images / log_c, 4))
        reasons.append(f"{100 * share:.1f}% of predictions differ from the source model's")
        if share < NO_CHANGE_SHARE:
            verdict = "no-change"
        elif source_div and _hist_effective(counts.hist) < LOW_DIVERSITY_RATIO * source_div:
            verdict = "suspect"
            reasons.append(f"prediction diversity {_hist_effective(counts.hist):.2f} classes against the "
                           f"source's {source_div:.2f}")
    else:
        reasons.append("no source reference: whether predictions changed is unknown")
    if counts.non_finite:
        health["non_finite_predictions"] = counts.non_finite
        reasons.append(f"{counts.non_finite} predictions from non-finite logits (pred -1)")
        verdict = "suspect" if verdict in ("ok", "no-change") else verdict
    if events:
        reasons.append(f"{len(events)} collapse events (first at batch {events[0].batch}, action {on_collapse})")
        verdict = "collapsed" if on_collapse != "reset" else ("suspect" if verdict != "collapsed" else verdict)
    health["verdict"] = verdict
    health["reasons"] = reasons
    return health


def source_reference_for(method_name: str, enabled: bool, model: nn.Module) -> SourceReference | None:
    """The frozen source copy, made before the method wraps (and changes) ``model``; none for
    ``source`` itself, whose predictions are the source's."""
    if not enabled or method_name.strip().lower() in ("source", "none"):
        return None
    return SourceReference(model)


def monitor_for(method: Any, num_classes: int, reference: SourceReference | None, on_collapse: str,
                batch_size: int) -> CollapseMonitor:
    return CollapseMonitor(method, num_classes, reference, on_collapse, batch_size=batch_size)  # type: ignore[arg-type]
