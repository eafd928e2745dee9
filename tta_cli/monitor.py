"""Label-free collapse detection for every method, and the end-of-run health verdict.

A ``CollapseMonitor`` is a sink: it sees each batch's predictions and, when the run has a source
reference (``tta_cli.reference``: a frozen copy of the source model the engine runs on all or a
sample of the rows), the source model's logits on those rows. Over a sliding window of recent
referenced images it compares:

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

from tta_cli.choices import ON_COLLAPSE
from tta_cli.collapse_window import (
    CollapseWindow,
    Thresholds,
    default_window,
    histogram_effective_classes,
)
from tta_cli.errors import TTAError
from tta_cli.outputs import BatchOutputs
from tta_cli.trust import ChangeEstimate, Judgement

OnCollapse = Literal["reset", "stop", "warn"]


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

    ``window`` images (default ``max(256, 2 B)``, at least ``8 C``) are compared; with a sampled
    reference these are referenced images (the same statistics, from a longer stretch of the
    stream). After an event the window starts afresh, so a reset model is judged on its own
    predictions only. ``referenced``: the run has a source reference (its outputs in each batch).
    """

    def __init__(self, method: Any, num_classes: int, referenced: bool = True,
                 on_collapse: OnCollapse = "reset", window: int | None = None, batch_size: int = 64,
                 thresholds: Thresholds | None = None) -> None:
        if on_collapse not in ON_COLLAPSE:
            raise TTAError(f"--on-collapse must be one of {', '.join(ON_COLLAPSE)}, got {on_collapse!r}")
        self.method = method
        self.num_classes = num_classes
        self.referenced = referenced
        self.on_collapse = on_collapse
        self.window = window or default_window(batch_size, num_classes)
        self.thresholds = thresholds or Thresholds()
        self.events: list[CollapseEvent] = []
        self.pending: CollapseEvent | None = None
        self._recent = CollapseWindow(num_classes, self.window, self.thresholds)
        self._batches = 0
        self._images = 0
        self.whole = _StreamCounts(num_classes)
        self.change = ChangeEstimate(num_classes) if referenced else None

    def on_batch(self, out: BatchOutputs) -> None:
        if not len(out.batch.items):
            return
        finite = out.pred >= 0  # -1: a prediction from non-finite logits (no class, no entropy)
        self.whole.non_finite += int((~finite).sum())
        self.whole.add(out.pred[finite], out.entropy[finite])
        self._batches += 1
        self._images += int(finite.sum())
        columns = self._compared(out)
        if columns is None or not len(columns[0]):
            return
        self._recent.add(*columns)
        signals = self._recent.collapse()
        if signals is not None:
            self._on_collapse(signals)

    def _compared(self, out: BatchOutputs) -> tuple[torch.Tensor, ...] | None:
        """The window's columns for this batch: every row without a reference; with one, the
        referenced rows, adapted and source side by side (rows non-finite on either side left out)."""
        if not self.referenced:
            finite = out.pred >= 0
            return out.pred[finite], out.entropy[finite]
        rows, logits, source_pred = out.source_rows, out.source_logits, out.source_pred()
        if rows is None or logits is None or source_pred is None or not len(rows):
            return None
        if self.change is not None:
            self.change.add(logits, out.pred[rows], stream_images=len(out.batch.items))
        pred, entropy = out.pred[rows], out.entropy[rows]
        source_entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
        finite = (pred >= 0) & (source_pred >= 0)
        self.whole.non_finite += int(((pred >= 0) & (source_pred < 0)).sum())
        self.whole.add_source(source_entropy[finite])
        return pred[finite], entropy[finite], source_pred[finite], source_entropy[finite]

    def state_for_resume(self) -> dict[str, Any]:
        """The window, the whole-stream counts and the events, for ``--resume`` (tensors, numbers, lists):
        the health of a resumed run covers the whole stream."""
        whole = self.whole
        return {"recent": self._recent.state(), "change": self.change.state() if self.change else None,
                "batches": self._batches, "images": self._images, "events": [asdict(e) for e in self.events],
                "whole": {"images": whole.images, "non_finite": whole.non_finite, "hist": whole.hist,
                          "entropy_sum": whole.entropy_sum, "source_images": whole.source_images,
                          "source_entropy_sum": whole.source_entropy_sum}}

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
        self.source_images = 0
        """Referenced images with finite predictions on both sides."""
        self.source_entropy_sum = 0.0

    def add(self, pred: torch.Tensor, entropy: torch.Tensor) -> None:
        self.images += pred.numel()
        self.hist += torch.bincount(pred.long(), minlength=self.num_classes)[: self.num_classes]
        self.entropy_sum += float(entropy.sum())

    def add_source(self, source_entropy: torch.Tensor) -> None:
        self.source_images += source_entropy.numel()
        self.source_entropy_sum += float(source_entropy.sum())


MANY_CLASSES = ("the estimate is validated on 10-class models; on a 1,000-class ImageNet model it missed most "
                "losses of test-batch statistics (docs/TRUST.md), so ok is weak evidence here")
UNVALIDATED_ADVICE = ("check a few hundred labelled images (--labels; a run with labels shows its accuracy) "
                      "before trusting this ok, or keep the default --method auto, which stayed within about 1 "
                      "point of the source on every ImageNet stream measured (docs/TRUST.md)")
HARM_ADVICE = ("the adapted model probably hurt here: use the source model's predictions (tta predict, or "
               "--method source; predictions.csv column source_pred has them for every image the run compared, "
               "all of them with --source-reference all)")


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
                      source_mean_entropy_nats=round(counts.source_entropy_sum / max(counts.source_images, 1), 4),
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
    if verdict == "ok" and judgement is not None and not judgement.validated:
        reasons.append(MANY_CLASSES)
        health["advice"] = UNVALIDATED_ADVICE
    health["verdict"] = verdict
    health["reasons"] = reasons
    if verdict in ("suspect", "hurt", "collapsed"):
        health["advice"] = HARM_ADVICE
    return health


def monitor_for(method: Any, num_classes: int, referenced: bool, on_collapse: str,
                batch_size: int) -> CollapseMonitor:
    return CollapseMonitor(method, num_classes, referenced, on_collapse, batch_size=batch_size)  # type: ignore[arg-type]
