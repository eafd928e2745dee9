"""auto's guard on batch-independent models: "never worse than the source".

A frozen source copy predicts every batch next to the inner method. Two label-free signals judge
the inner method's predictions over a window of recent images:

* **collapse** (``tta_cli.collapse_window``, the signals the run's monitor uses: diversity against
  the source's, agreement, entropy drop in units of ln C): the inner method is reset, and after
  ``max_collapses`` events the source copy predicts for the rest of the stream;
* **harm** (``ChangeWindow``: ``tta_cli.trust.ChangeEstimate``'s estimate of the accuracy change
  against the source, over the window): while the window's estimate is at or below
  ``-harm_points``, the batch is predicted by the source copy (a *fallback*, per batch: the inner
  method goes on adapting and takes over again once its window no longer looks harmful); harm for
  a whole window of batches in a row resets the inner method. With ``judge_first`` the source copy
  also predicts until the first window is full: the inner method's predictions are used only once
  a window of them has been judged.

With ``source_ensemble``, the batches the inner method predicts are predicted by the mean of its
probabilities and those of the source copy's logits turned into the inner method's predictions
(``TTAMethod.predictions_from``: ROID's prior correction): an output ensemble of the adapted and
the source model, which keeps the source's confident predictions where the adapted model is unsure
of its own, on streams where neither signal can tell whether adapting helps.

With ``few_classes``, the batches that the source's predictions show to hold few classes compared
with the stretch of stream around them are predicted by LAME on the source copy's features
(``few_classes``), whichever model the guard chose for them; the inner method goes on adapting.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn

from tta_cli.collapse_window import CollapseWindow, Thresholds, default_window
from tta_cli.methods.auto.domain_change import DomainChange
from tta_cli.methods.auto.few_classes import FewClasses, add_to_ranges, lame_predictions
from tta_cli.methods.base import StepResult, TTAMethod, softmax_entropy
from tta_cli.methods.collectives import world
from tta_cli.trust import ChangeEstimate, flip_auc

HARM_POINTS = 1.0
"""A window whose estimated accuracy change is at or below minus this many points is harmful
(``tta_cli.trust.HURT_POINTS`` for a whole run)."""


def _global_rows(logits: torch.Tensor, source_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's rows of both (data-parallel: every process's, in stream order, on every
    process, so that the guard judges the global batch and decides alike everywhere; one gather)."""
    if not world().active:
        return logits, source_logits
    both = world().gather_rows(torch.cat([logits, source_logits.to(logits.dtype)], 1))
    return both[:, :logits.shape[1]], both[:, logits.shape[1]:]


class _Counts(NamedTuple):
    """A ``ChangeEstimate``'s running sums at one moment (a window is the difference of two)."""

    images: int
    flips: int
    source_view: float
    flipped_hist: torch.Tensor
    kept_hist: torch.Tensor


class ChangeWindow:
    """The estimated accuracy change (points, adapted minus source) over the latest ``size`` or more
    images: the mean of ``ChangeEstimate``'s source view and selectivity view, from the difference
    of its running sums, so that the label-shift adjustment keeps the whole stream's class prior."""

    def __init__(self, num_classes: int, size: int) -> None:
        self.estimate = ChangeEstimate(num_classes)
        self.size = size
        self._marks: deque[_Counts] = deque()

    def _counts(self) -> _Counts:
        e = self.estimate
        return _Counts(e.images, e.flips, e.source_view, e.flipped_hist.clone(), e.kept_hist.clone())

    def add(self, source_logits: torch.Tensor, pred: torch.Tensor) -> float | None:
        """One batch; the window's estimate once it holds ``size`` images, else None."""
        self._marks.append(self._counts())
        self.estimate.add(source_logits, pred)
        while len(self._marks) > 1 and self.estimate.images - self._marks[1].images >= self.size:
            self._marks.popleft()
        return self.change() if self.estimate.images - self._marks[0].images >= self.size else None

    def change(self) -> float:
        start, e = self._marks[0], self.estimate
        images = max(e.images - start.images, 1)
        source_view = 100 * (e.source_view - start.source_view) / images
        auc = flip_auc(e.flipped_hist - start.flipped_hist, e.kept_hist - start.kept_hist)
        selectivity_view = 100 * (e.flips - start.flips) / images * (2 * auc - 1)
        return (source_view + selectivity_view) / 2


    def state(self) -> dict[str, Any]:
        return {"estimate": self.estimate.state(), "marks": [list(mark) for mark in self._marks]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.estimate.load_state(state["estimate"])
        self._marks = deque(_Counts(*mark) for mark in state["marks"])


class Guard:
    """Runs ``inner`` on each batch and watches it against ``reference`` (a frozen source copy)."""

    def __init__(self, reference: nn.Module, max_collapses: int, window: int = 0, batch_size: int = 64,
                 thresholds: Thresholds | None = None, harm_points: float = HARM_POINTS,
                 judge_first: bool = True, few_classes: bool = True, source_ensemble: bool = True,
                 domain_change: bool = True) -> None:
        """``window``: images per window, 0 for ``collapse_window.default_window``; ``harm_points``:
        0 turns the harm fallback off (and ``judge_first`` with it); ``few_classes``: LAME predicts
        the batches of few classes (where the model has timm's feature and head split);
        ``source_ensemble``: the inner method's predictions are mixed with the source copy's;
        ``domain_change``: the inner method restarts where the input's domain changes."""
        self.reference = reference
        self.max_collapses = max_collapses
        self.size = window
        self.batch_size = batch_size
        self.thresholds = thresholds or Thresholds()
        self.harm_points = harm_points
        self.judge_first = judge_first
        self.source_ensemble = source_ensemble
        self.window: CollapseWindow | None = None
        self.change: ChangeWindow | None = None
        self.events: list[dict[str, Any]] = []
        self.frozen_at: int | None = None
        """The batch from which the source copy predicts (after ``max_collapses`` events)."""
        self.harm_resets: list[dict[str, Any]] = []
        """The batches where a whole window of harm reset the inner method, with the estimate."""
        self.fallbacks: list[list[int]] = []
        """The batches the source copy predicted because the window looked harmful, was not judged
        yet (``judge_first``) or collapsed (the batch that showed it), as ``[first, last + 1)`` ranges."""
        self._harmful_images = 0
        self.batches = 0
        self.with_features = few_classes and _splits_head(reference)
        self.few_classes: FewClasses | None = None
        self.domain = DomainChange(reference) if domain_change else None

    def step(self, inner: TTAMethod, x: torch.Tensor, batch: int) -> StepResult:
        """Batch number ``batch`` (0-based) through ``inner``, or through the source copy once frozen
        or while the inner method's window looks harmful."""
        self.batches = batch + 1
        if self.frozen_at is not None:
            return self._frozen(inner, x, batch)
        outputs = self._source_outputs(inner, x)
        self._on_domain_change(inner, outputs[1], batch)
        return self._watch(inner, x, inner.step(x), batch, outputs)

    @torch.no_grad()
    def predict(self, inner: TTAMethod, x: torch.Tensor, batch: int) -> torch.Tensor:
        """Batch number ``batch`` predicted without an update (the online view's batches in
        between), watched as ``step``'s are: the inner model's logits, or the source copy's."""
        self.batches = batch + 1
        if self.frozen_at is not None:
            return self._frozen(inner, x, batch).logits
        used = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        outputs = self._source_outputs(inner, x)
        self._on_domain_change(inner, outputs[1], batch)
        logits = inner.run_model(x)
        first, _ = world().row_span(logits.shape[0])
        logits = inner.predictions_from(world().gather_rows(logits))[first:first + logits.shape[0]]
        return self._watch(inner, x, StepResult(logits=logits, used=used), batch, outputs).logits

    def close(self) -> None:
        """Remove the hook the domain-change watch put on the source copy."""
        if self.domain is not None:
            self.domain.remove()

    def _on_domain_change(self, inner: TTAMethod, source_logits: torch.Tensor, batch: int) -> None:
        """Reset ``inner`` before this batch where its input's domain changed (``domain_change``)."""
        if self.domain is None:
            return
        if self.domain.add(source_logits.argmax(1), source_logits.shape[1], batch):
            inner.reset()

    def _watch(self, inner: TTAMethod, x: torch.Tensor, result: StepResult, batch: int,
               outputs: tuple[torch.Tensor | None, torch.Tensor]) -> StepResult:
        """``result`` (the inner method's on ``x``) into the windows; it, or the source copy's logits
        where a window collapsed, looks harmful or is not judged yet. Data-parallel, the windows
        take the global batch's rows and every process returns its own. ``outputs``: the source
        copy's features and logits of ``x``."""
        features, source_logits = outputs
        if self.window is None or self.change is None:
            num_classes = source_logits.shape[1]
            size = self.size or default_window(self.batch_size, num_classes)
            self.window = CollapseWindow(num_classes, size, self.thresholds)
            self.change = ChangeWindow(num_classes, size)
            self.few_classes = FewClasses(num_classes, size) if self.with_features else None
        logits, seen_source = _global_rows(result.logits.detach().float(), source_logits)
        pred, source_pred = logits.argmax(1).cpu(), seen_source.argmax(1).cpu()
        self.window.add(pred, softmax_entropy(logits).cpu(), source_pred, softmax_entropy(seen_source).cpu())
        signals = self.window.collapse()
        if signals is not None:
            self._on_collapse(inner, signals, batch)
        finite_pred = torch.where(torch.isfinite(logits).all(1).cpu(), pred, -1)
        if signals is not None or self._harmful(inner, seen_source.cpu(), finite_pred, batch):
            if self.frozen_at is None:
                add_to_ranges(self.fallbacks, batch)
            result = StepResult(logits=source_logits, used=result.used, source_logits=source_logits)
        elif self.source_ensemble:
            mixed = ensemble_with_source(inner, logits, seen_source)
            first, _ = world().row_span(x.shape[0])
            result = replace(result, logits=mixed[first:first + x.shape[0]], source_logits=source_logits)
        else:
            result = replace(result, source_logits=source_logits)
        return self._few_classes_lame(result, features, seen_source, batch)

    def _frozen(self, inner: TTAMethod, x: torch.Tensor, batch: int) -> StepResult:
        """The source copy's prediction of a batch once frozen (LAME's for a batch of few classes)."""
        features, source_logits = self._source_outputs(inner, x)
        result = StepResult(logits=source_logits, used=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device),
                            source_logits=source_logits)
        if self.few_classes is None:
            return result
        return self._few_classes_lame(result, features, world().gather_rows(source_logits), batch)

    def _few_classes_lame(self, result: StepResult, features: torch.Tensor | None, every_source_logit: torch.Tensor,
                          batch: int) -> StepResult:
        """``result``, or LAME's prediction (on the source copy's features and the global batch's
        source logits) where the global batch's source predictions show few classes
        (``few_classes.FewClasses``)."""
        if self.few_classes is None or features is None:
            return result
        if not self.few_classes.add(every_source_logit.argmax(1).cpu(), batch):
            return result
        first, _ = world().row_span(features.shape[0])
        lame = lame_predictions(world().gather_rows(features), every_source_logit)
        return replace(result, logits=lame[first:first + features.shape[0]])

    def _harmful(self, inner: TTAMethod, source_logits: torch.Tensor, pred: torch.Tensor, batch: int) -> bool:
        """Whether the window's estimated change is at or below ``-harm_points`` (with
        ``judge_first``: or the first window is not full yet); harm for a whole window in a row
        resets ``inner``."""
        assert self.change is not None and self.window is not None
        if not self.harm_points:
            return False
        change = self.change.add(source_logits, pred)
        if change is None:
            return self.judge_first
        if change > -self.harm_points:
            self._harmful_images = 0
            return False
        self._harmful_images += len(pred)
        if self._harmful_images >= self.change.size:
            self.harm_resets.append({"batch": batch, "estimated_change": round(change, 2)})
            self._restart(inner)
        return True

    def _on_collapse(self, inner: TTAMethod, signals: dict[str, float], batch: int) -> None:
        frozen = len(self.events) + 1 >= self.max_collapses
        self.events.append({"batch": batch, "action": "source" if frozen else "reset",
                            "signals": {k: round(v, 4) for k, v in signals.items()}})
        self._restart(inner)
        if frozen:
            self.frozen_at = batch

    def _restart(self, inner: TTAMethod) -> None:
        """Reset ``inner``. The collapse window starts afresh (``CollapseWindow.collapse``); the
        change window keeps the harm it saw, so the source predicts until that has left it (the
        reset model predicts as the source does meanwhile) and the next harm reset needs a whole
        new window of harm."""
        inner.reset()
        self._harmful_images = 0

    def stats(self) -> dict[str, Any]:
        fallback = sum(last - first for first, last in self.fallbacks)
        lame = self.few_classes.batches if self.few_classes is not None else []
        return {"guard_fallbacks": self.fallbacks, "guard_harm_resets": self.harm_resets,
                "source_share": (fallback + (self.batches - self.frozen_at if self.frozen_at is not None else 0))
                / max(self.batches, 1),
                "lame_batches": lame, "lame_share": sum(last - first for first, last in lame) / max(self.batches, 1),
                "domain_changes": self.domain.changes if self.domain is not None else []}

    def state(self) -> dict[str, Any]:
        """Everything the next batch depends on, as plain data (``--resume``)."""
        return {"collapse": self.window.state() if self.window is not None else None,
                "change": self.change.state() if self.change is not None else None,
                "events": self.events, "frozen_at": self.frozen_at, "harm_resets": self.harm_resets,
                "fallbacks": self.fallbacks, "harmful_images": self._harmful_images, "batches": self.batches,
                "few_classes": self.few_classes.state() if self.few_classes is not None else None,
                "domain": self.domain.state() if self.domain is not None else None}

    def load_state(self, state: dict[str, Any]) -> None:
        if state["change"] is not None:
            num_classes = int(state["change"]["estimate"]["num_classes"])
            size = self.size or default_window(self.batch_size, num_classes)
            self.window = CollapseWindow(num_classes, size, self.thresholds)
            self.window.load_state(state["collapse"])
            self.change = ChangeWindow(num_classes, size)
            self.change.load_state(state["change"])
            if self.with_features and state.get("few_classes") is not None:
                self.few_classes = FewClasses(num_classes, size)
                self.few_classes.load_state(state["few_classes"])
        self.events, self.frozen_at, self.harm_resets = state["events"], state["frozen_at"], state["harm_resets"]
        self.fallbacks, self.batches = state["fallbacks"], state["batches"]
        self._harmful_images = state["harmful_images"]
        if self.domain is not None and state.get("domain") is not None:
            self.domain.load_state(state["domain"])

    @torch.no_grad()
    def _source_outputs(self, inner: TTAMethod, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The source copy's pooled features (where ``few_classes`` needs them) and logits."""
        with inner.autocast():
            x = inner.prepare_input(x)
            if not self.with_features:
                return None, self.reference(x).float()
            features = self.reference.forward_head(self.reference.forward_features(x), pre_logits=True)
            return features.float(), self.reference.get_classifier()(features).float()


def ensemble_with_source(inner: TTAMethod, logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
    """log of the mean of softmax(``logits``) (the inner method's predictions of a global batch) and
    of the inner method's predictions from the source model's ``source_logits`` of the same batch."""
    source_predictions = inner.predictions_from(source_logits)
    return torch.logaddexp(logits.log_softmax(1), source_predictions.log_softmax(1)) - math.log(2)


def _splits_head(model: nn.Module) -> bool:
    """Whether ``model`` has timm's split into pooled features (``forward_head(..., pre_logits=True)``)
    and a classifier module."""
    if not all(callable(getattr(model, name, None)) for name in ("forward_features", "forward_head", "get_classifier")):
        return False
    try:
        takes_pre_logits = "pre_logits" in inspect.signature(model.forward_head).parameters
    except (TypeError, ValueError):
        return False
    return takes_pre_logits and isinstance(model.get_classifier(), nn.Module)
