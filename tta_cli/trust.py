"""A label-free estimate of how much adaptation changed accuracy, and whether it hurt.

Every run keeps a frozen copy of the source model beside the adapted one (``tta_cli.monitor``), so
for each image there are two predictions. Where they agree, adaptation changed nothing. Where they
differ (a *flip*), one of them may be right. Two views of the flips, each from the source model's
probabilities and the adapted model's predicted class only (the adapted model's own confidence is
not used: entropy minimisation inflates it, LAME outputs near one-hot assignments, ROID rescales
its logits):

* **the source's view**: each flip changes the expected accuracy by ``p(adapted class) - p(source
  class)`` under the source model's probabilities, after those are adjusted to the *label shift
  inside the stream*: the class prior of the recent images against the stream's (both estimated
  from the source's probabilities, Saerens et al. 2002). On a class-by-class stream the recent
  images are nearly all one class, so a flip away from it costs almost a whole image, which is
  the harm of test-batch statistics under label shift. This view never credits a flip unless the
  adjustment itself prefers the new class: it is the pessimistic end.
* **the selectivity view**: adaptation that fixes errors flips the source's *least confident*
  predictions, where its errors are; adaptation that damages flips predictions regardless of the
  source's confidence. With ``a`` the probability that a flipped image had a lower source
  confidence than an unflipped one (an AUC: 1/2 when flips ignore the source's uncertainty), the
  flips' net effect is estimated as ``changed share * (2a - 1)``: the optimistic end.

The estimate is the mean of the two views; the interval spans them. Two further signals describe
known ways adaptation hurts: *scrambling* (the adapted predictions are more diverse within each
batch than over the stream, relative to the source's: batch statistics mixing a class-ordered
batch), and *lost diversity* over the stream (a collapse onto fewer classes). How well all this
works, measured against labels the estimate never sees: docs/TRUST.md.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from tta_cli.collapse_window import effective_classes, histogram_effective_classes
from tta_cli.reference import referenced_rows

PRIOR_WINDOW = 64
"""Stream images that estimate the recent class prior (the last batches covering at least this
many; with a sampled reference, their referenced rows)."""
CONFIDENCE_BINS = 200
HURT_POINTS = 1.0
"""An estimated change at or below minus this many points is called ``hurt``."""
SCRAMBLE = math.log(1.25)
"""Batch-scale diversity this much (log ratio) above the stream-scale one, against the source: suspect."""
LOW_DIVERSITY = math.log(0.7)
"""Stream diversity this far (log ratio) below the source's: suspect."""
VALIDATED_CLASSES = 10
"""The estimate and the verdict hold on models of this many classes (docs/TRUST.md); with more the
run's health says an ``ok`` is weak evidence (``tta_cli.monitor``), since on a 1,000-class ImageNet
model they missed most losses."""


def prior_shift(probs: torch.Tensor, window: torch.Tensor, stream_prior: torch.Tensor,
                iterations: int = 10) -> torch.Tensor:
    """``probs`` re-weighted by the recent class prior over the stream's (EM of Saerens et al.:
    the prior that the re-weighted probabilities of ``window`` average to)."""
    base = stream_prior.clamp_min(1e-12)
    prior = base
    for _ in range(iterations):
        reweighted = window * (prior / base)
        prior = (reweighted / reweighted.sum(1, keepdim=True)).mean(0)
    adjusted = probs * (prior / base)
    return adjusted / adjusted.sum(1, keepdim=True)


def flip_auc(flipped: torch.Tensor, kept: torch.Tensor) -> float:
    """P(a flipped image's source confidence < a kept image's), ties counted half, from histograms."""
    n_flipped, n_kept = float(flipped.sum()), float(kept.sum())
    if not n_flipped or not n_kept:
        return 0.5
    kept_above = n_kept - torch.cumsum(kept.double(), 0)
    return float((flipped.double() * (kept_above + kept.double() / 2)).sum()) / (n_flipped * n_kept)


@dataclass
class Judgement:
    """The estimate (points of accuracy, adapted minus source), its interval, the signals and the verdict."""

    estimated_change: float
    low: float
    high: float
    changed_share: float
    source_effective_classes: float = 0.0
    signals: dict[str, float] = field(default_factory=dict)
    verdict: str = "ok"
    reasons: list[str] = field(default_factory=list)
    validated: bool = True
    """The model has the classes the verdict was validated on (``VALIDATED_CLASSES``)."""

    @property
    def flags_harm(self) -> bool:
        return self.verdict in ("suspect", "hurt", "collapsed")


class ChangeEstimate:
    """Fed each batch's source logits and adapted predictions, in stream order."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.images = 0
        self.flips = 0
        self.source_view = 0.0
        self.prior_sum = torch.zeros(num_classes, dtype=torch.float64)
        self.recent: deque[tuple[torch.Tensor, int]] = deque()
        """The latest batches' source probabilities, each with the stream images it covers."""
        self.flipped_hist = torch.zeros(CONFIDENCE_BINS, dtype=torch.long)
        self.kept_hist = torch.zeros(CONFIDENCE_BINS, dtype=torch.long)
        self.hist = torch.zeros(num_classes, dtype=torch.long)
        self.source_hist = torch.zeros(num_classes, dtype=torch.long)
        self.batch_diversity = 0.0
        """Sum over batches of images * log(adapted / source effective classes in the batch)."""

    def add(self, source_logits: torch.Tensor, pred: torch.Tensor, stream_images: int | None = None) -> None:
        """One batch's referenced rows: the source logits and the adapted classes; ``stream_images``:
        the images of the batch they were sampled from (default: these rows are all of it)."""
        n = len(pred)
        if not n:
            return
        finite = torch.isfinite(source_logits).all(1) & (pred >= 0)
        if not finite.any():
            return
        probs = source_logits.double().softmax(1)
        self._remember(probs[finite], n if stream_images is None else stream_images)
        window = torch.cat([p for p, _ in self.recent])
        adjusted = prior_shift(probs, window, self.prior_sum / max(self.images + int(finite.sum()), 1))
        source_pred = probs.argmax(1)
        flipped = (source_pred != pred) & finite
        rows = torch.arange(n)
        gain = adjusted[rows, pred.clamp_min(0)] - adjusted[rows, source_pred]
        self.source_view += float(gain[flipped].sum())
        confidence_bin = (probs[rows, source_pred] * CONFIDENCE_BINS).long().clamp(0, CONFIDENCE_BINS - 1)
        self.flipped_hist += torch.bincount(confidence_bin[flipped], minlength=CONFIDENCE_BINS)
        self.kept_hist += torch.bincount(confidence_bin[~flipped & finite], minlength=CONFIDENCE_BINS)
        self.flips += int(flipped.sum())
        self.images += int(finite.sum())  # non-finite rows are counted by the monitor, apart
        valid_pred = pred[finite].long()
        self.hist += torch.bincount(valid_pred, minlength=self.num_classes)[: self.num_classes]
        self.source_hist += torch.bincount(source_pred[finite], minlength=self.num_classes)[: self.num_classes]
        if len(valid_pred):
            ratio = effective_classes(valid_pred, self.num_classes) / effective_classes(source_pred[finite],
                                                                                        self.num_classes)
            self.batch_diversity += len(valid_pred) * math.log(ratio)

    def state(self) -> dict[str, object]:
        """Everything the estimate has counted, for ``--resume``."""
        state = dict(vars(self))
        state["recent"] = [[probs, images] for probs, images in self.recent]
        return state

    def load_state(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            if name == "recent":  # a bare tensor: a checkpoint that kept no image counts (every row referenced)
                value = deque((entry, len(entry)) if isinstance(entry, torch.Tensor) else (entry[0], int(entry[1]))
                              for entry in value)  # type: ignore[attr-defined]
            setattr(self, name, value)

    def _remember(self, probs: torch.Tensor, stream_images: int) -> None:
        self.prior_sum += probs.sum(0)
        self.recent.append((probs, stream_images))
        while sum(images for _, images in self.recent) - self.recent[0][1] >= PRIOR_WINDOW:
            self.recent.popleft()

    def judgement(self) -> Judgement:
        if not self.images:
            return Judgement(0.0, 0.0, 0.0, 0.0, verdict="no-change", reasons=["no images"])
        share = self.flips / self.images
        source_view = 100 * self.source_view / self.images
        auc = flip_auc(self.flipped_hist, self.kept_hist)
        selectivity_view = 100 * share * (2 * auc - 1)
        stream_diversity = math.log(max(histogram_effective_classes(self.hist), 1e-9)
                                    / max(histogram_effective_classes(self.source_hist), 1e-9))
        signals = {"source_view": round(source_view, 3), "selectivity_view": round(selectivity_view, 3),
                   "flip_auc": round(auc, 4), "stream_diversity_log_ratio": round(stream_diversity, 4),
                   "scramble": round(self.batch_diversity / self.images - stream_diversity, 4)}
        low, high = sorted((source_view, selectivity_view))
        judgement = Judgement(round((source_view + selectivity_view) / 2, 2), round(low, 2), round(high, 2),
                              round(share, 4), round(histogram_effective_classes(self.source_hist), 3), signals,
                              validated=self.num_classes <= VALIDATED_CLASSES)
        return harm_verdict(judgement)


NO_CHANGE_SHARE = 0.01
"""Below this share of predictions differing from the source, adaptation changed nothing."""


def harm_verdict(judgement: Judgement) -> Judgement:
    """``no-change``, ``ok``, ``suspect`` or ``hurt``, each with its reason (collapse is the monitor's)."""
    signals, reasons = judgement.signals, judgement.reasons
    reasons.append(f"{100 * judgement.changed_share:.1f}% of predictions differ from the source model's")
    if judgement.changed_share < NO_CHANGE_SHARE:
        judgement.verdict = "no-change"
    elif judgement.estimated_change <= -HURT_POINTS:
        judgement.verdict = "hurt"
        reasons.append(f"estimated change {judgement.estimated_change:+.1f} points of accuracy")
    elif signals["scramble"] >= SCRAMBLE:
        judgement.verdict = "suspect"
        reasons.append("predictions are more varied within each batch than over the stream: test-batch "
                       "statistics on a class-ordered stream")
    elif signals["stream_diversity_log_ratio"] <= LOW_DIVERSITY:
        judgement.verdict = "suspect"
        reasons.append("fewer classes predicted than the source model predicts")
    return judgement


def judge(source_logits: torch.Tensor, adapted_logits: torch.Tensor, batch_size: int = 64,
          reference: str = "all") -> Judgement:
    """The judgement of a whole recorded run (logits in stream order), batch by batch, from the
    rows a ``reference`` of that mode (``tta_cli.reference``: sampled or all) would have seen."""
    estimate = ChangeEstimate(source_logits.shape[1])
    pred = torch.where(torch.isfinite(adapted_logits).all(1), adapted_logits.argmax(1), -1)
    for start in range(0, len(pred), batch_size):
        n = len(pred[start:start + batch_size])
        rows = start + referenced_rows(reference, start, n, batch_size)
        estimate.add(source_logits[rows], pred[rows], stream_images=n)
    return estimate.judgement()
