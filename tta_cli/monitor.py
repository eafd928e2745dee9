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

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tta_cli.collapse_window import (
    CollapseWindow,
    Thresholds,
    default_window,
    frozen_copy,
    histogram_effective_classes,
)
from tta_cli.errors import TTAError
from tta_cli.outputs import BatchOutputs
from tta_cli.trust import ChangeEstimate, Judgement

OnCollapse = Literal["reset", "stop", "warn"]
ON_COLLAPSE_CHOICES: tuple[str, ...] = ("reset", "stop", "warn")


class SourceReference:
    """A frozen copy of the source model in eval mode (source BatchNorm statistics): its
    predictions on each batch, one no-grad forward (the cost of a ``source`` run per batch)."""

    def __init__(self, model: nn.Module, device: torch.device | None = None) -> None:
        self.model = frozen_copy(model)  # without a method's BatchNorm hooks
        self.device = device or next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device)).float()


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
        self.window = window or default_window(batch_size, num_classes)
        self.thresholds = thresholds or Thresholds()
        self.events: list[CollapseEvent] = []
        self.pending: CollapseEvent | None = None
        self.last_source_pred: torch.Tensor | None = None
        self._recent = CollapseWindow(num_classes, self.window, self.thresholds)
        self._batches = 0
        self._images = 0
        self.whole = _StreamCounts(num_classes)
        self.change = ChangeEstimate(num_classes) if reference is not None else None

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
            if self.change is not None:
                self.change.add(logits.cpu(), out.pred)
        finite = out.pred >= 0  # -1: a prediction from non-finite logits (no class, no entropy)
        if len(parts) == 4:
            finite &= parts[2] >= 0
        self.whole.non_finite += int((~finite).sum())
        parts = tuple(part[finite] for part in parts)
        n = len(parts[0])
        if not n:
            return
        self.whole.add(*parts)
        self._recent.add(*parts)
        self._batches += 1
        self._images += n
        signals = self._recent.collapse()
        if signals is not None:
            self._on_collapse(signals)

    def state_for_resume(self) -> dict[str, Any]:
        """The window, the whole-stream counts and the events, for ``--resume`` (tensors, numbers, lists):
        the health of a resumed run covers the whole stream."""
        whole = self.whole
        return {"recent": self._recent.state(), "change": self.change.state() if self.change else None,
                "batches": self._batches, "images": self._images, "events": [asdict(e) for e in self.events],
                "whole": {"images": whole.images, "non_finite": whole.non_finite, "hist": whole.hist,
                          "entropy_sum": whole.entropy_sum, "source_entropy_sum": whole.source_entropy_sum}}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self._recent.load_state(state["recent"])
        if self.change is not None and state.get("change") is not None:
            self.change.load_state(state["change"])
        self._batches, self._images = state["batches"], state["images"]
        self.events = [CollapseEvent(**event) for event in state["events"]]
        for name, value in state["whole"].items():
            setattr(self.whole, name, value)

    def signals(self) -> dict[str, float]:
        return self._recent.signals()

    def _on_collapse(self, signals: dict[str, float]) -> None:
        batch = self._batches - 1
        event = CollapseEvent(batch, self._images, self.on_collapse, {k: round(v, 4) for k, v in signals.items()})
        self.events.append(event)
        self.pending = event

    def take_event(self) -> CollapseEvent | None:
        """The collapse found by the last batch, once, for the run to act on (reset, stop or warn)
        before the next batch: the monitor itself never touches the method."""
        event, self.pending = self.pending, None
        return event

    def progress_text(self) -> str | None:
        """For the progress line: the number of events and the batch of the last one."""
        if not self.events:
            return None
        return f"collapse {len(self.events)} (batch {self.events[-1].batch}, {self.on_collapse})"

    def record(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.events]

    def health(self) -> dict[str, Any]:
        judgement = self.change.judgement() if self.change is not None else None
        health = health_verdict(self.whole, self.events, self.on_collapse, judgement)
        if not getattr(self.method, "changes_predictions", True):  # the source model's predictions
            health.update(verdict="no-change", reasons=["the model as it is: predicts without adapting"])
        return health


class _StreamCounts:
    """Whole-stream counts for the health record: the adapted predictions' classes and entropies (the
    comparison with the source model is ``tta_cli.trust.ChangeEstimate``'s)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.images = 0
        self.non_finite = 0
        """Predictions from non-finite logits (of the method or the source): left out of the rest."""
        self.hist = torch.zeros(num_classes, dtype=torch.long)
        self.entropy_sum = 0.0
        self.source_entropy_sum = 0.0

    def add(self, pred: torch.Tensor, entropy: torch.Tensor, source_pred: torch.Tensor | None = None,
            source_entropy: torch.Tensor | None = None) -> None:
        self.images += pred.numel()
        self.hist += torch.bincount(pred.long(), minlength=self.num_classes)[: self.num_classes]
        self.entropy_sum += float(entropy.sum())
        if source_pred is not None and source_entropy is not None:
            self.source_entropy_sum += float(source_entropy.sum())


HARM_ADVICE = ("the adapted model probably hurt here: use the source model's predictions (predictions.csv "
               "column source_pred) or run with --method source")


def health_verdict(counts: _StreamCounts, events: list[CollapseEvent], on_collapse: str,
                   judgement: Judgement | None) -> dict[str, Any]:
    """``ok``, ``no-change``, ``suspect``, ``hurt`` or ``collapsed``, with the reasons, without labels
    (``judgement``: the change estimate against the source reference, ``tta_cli.trust``)."""
    health: dict[str, Any] = {"images": counts.images, "collapse_events": len(events),
                              "effective_classes": round(histogram_effective_classes(counts.hist), 3)}
    if counts.images:
        health["mean_entropy_nats"] = round(counts.entropy_sum / counts.images, 4)
    verdict, reasons = "ok", ["no source reference: whether predictions changed is unknown"]
    if judgement is not None and counts.images:
        verdict, reasons = judgement.verdict, list(judgement.reasons)
        health.update(changed_share=judgement.changed_share,
                      source_effective_classes=judgement.source_effective_classes,
                      source_mean_entropy_nats=round(counts.source_entropy_sum / counts.images, 4),
                      estimated_accuracy_change={"points": judgement.estimated_change, "low": judgement.low,
                                                 "high": judgement.high},
                      harm_signals=judgement.signals)
    if counts.non_finite:
        health["non_finite_predictions"] = counts.non_finite
        reasons.append(f"{counts.non_finite} predictions from non-finite logits (pred -1)")
        verdict = "suspect" if verdict in ("ok", "no-change") else verdict
    if events:
        reasons.append(f"{len(events)} collapse events (first at batch {events[0].batch}, action {on_collapse})")
        verdict = "collapsed" if on_collapse != "reset" else ("suspect" if verdict in ("ok", "no-change") else verdict)
    health["verdict"] = verdict
    health["reasons"] = reasons
    if verdict in ("suspect", "hurt", "collapsed"):
        health["advice"] = HARM_ADVICE
    return health


def source_reference_for(changes_predictions: bool, enabled: bool, model: nn.Module) -> SourceReference | None:
    """The frozen source copy, made before the method wraps (and changes) ``model``; none for a
    method whose predictions are the source's (``TTAMethod.changes_predictions``)."""
    if not enabled or not changes_predictions:
        return None
    return SourceReference(model)


def monitor_for(method: Any, num_classes: int, reference: SourceReference | None, on_collapse: str,
                batch_size: int) -> CollapseMonitor:
    return CollapseMonitor(method, num_classes, reference, on_collapse, batch_size=batch_size)  # type: ignore[arg-type]
