"""auto on batch-independent models: LAME's predictions for the batches that hold few classes.

LAME (``tta_cli.methods.lame``) pulls each prediction towards those of the images of the batch
that look alike. On batches of few classes (class-ordered and label-correlated streams: its
paper's setting) that gains more than any method that adapts the model; on a batch that mixes the
stream's classes it drags the batch onto a few of them and loses up to 60 points
(docs/BENCHMARKS.md). So auto predicts a batch with LAME, on the source model's features and
probabilities, only where the source model's predictions show that the recent batches hold few
classes *compared with the stretch of stream around them*:

* a batch's *collision probability* is the chance that two of its images are predicted the same
  class, sum_c n_c (n_c - 1) / (B (B - 1)); the stretch's is that of two images drawn from the
  latest images, sum_c p_c^2, over the collapse window (``collapse_window.default_window``: 256
  images at B = 64 on ten classes). Their inverses are effective numbers of classes (order-2 Rényi).
* LAME predicts while the recent batches' collision probability (their same-class pairs over
  their pairs) is at least ``CONCENTRATION`` times the stretch's: the batches hold at most half its
  effective classes, the collapse rule's diversity ratio (``collapse_window.Thresholds``).
* Against the stretch, not the whole stream so far: a new corruption makes the source model
  favour a few classes on every batch alike (it is as sure of "frog" under noise as of "cat" under
  blur), which against the whole stream would look like a batch of few classes; against the
  stretch it does not, since that favours the same classes, except for the first batches after
  the change, while the stretch still holds the previous favourite (on a simulated source that
  gives its favourite 80% of the images, 1-2 batches per change of shift). Labels correlated in
  time differ from batch to batch, so the stretch holds more classes than each batch.
* The recent batches are the latest that hold at least ``WINDOW_IMAGES`` images and enough pairs
  that a shuffled stream would show ``MIN_EXPECTED_PAIRS`` same-class pairs among them. Were the
  pairs independent, a shuffled stream would then reach twice its collision probability only by
  about six standard deviations (the excess needed equals the expected count, whose standard
  deviation is its square root); they are not (a frequent class's pairs grow with the square of its
  count): on simulated shuffled streams (``benchmarks/few_classes_null.py``) no batch of ten
  classes was given to LAME, and at most 1.5% of those of 1,000 classes with a skewed source. At
  batch size 64 on ten classes one batch is enough; small batches and many classes need more.

A shuffled stream gives a ratio near 1 at any batch size (the collision probability is an
unbiased estimate), a stream that the source model predicts as one class everywhere too (both
sides are near 1), so neither is given to LAME; a batch of one image has no pair and is never
given to LAME either. A class-ordered stream whose classes last longer than the stretch is not
recognised (each stretch is one class): LAME's gain is left, and nothing is lost.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from tta_cli.methods.lame import LAMEConfig, lame_log_probs

CONCENTRATION = 2.0
"""LAME predicts while the recent batches' collision probability is at least this many times the
stretch's (at most half its effective classes)."""
WINDOW_IMAGES = 64
"""The recent batches hold at least this many images ..."""
MIN_EXPECTED_PAIRS = 32.0
"""... and at least this many same-class pairs were the stream shuffled (pairs x the stretch's
collision probability)."""


class FewClasses:
    """Which batches LAME predicts, from the source model's predictions of each (global) batch."""

    def __init__(self, num_classes: int, stretch_images: int, concentration: float = CONCENTRATION,
                 window_images: int = WINDOW_IMAGES, min_expected_pairs: float = MIN_EXPECTED_PAIRS) -> None:
        self.num_classes = num_classes
        self.stretch_images = stretch_images
        self.concentration = concentration
        self.window_images = window_images
        self.min_expected_pairs = min_expected_pairs
        self._stretch: deque[torch.Tensor] = deque()
        """The latest batches' class counts, holding at least ``stretch_images`` images."""
        self.hist = torch.zeros(num_classes, dtype=torch.float64)
        """Their sum."""
        self._recent: deque[tuple[int, int, int]] = deque()
        """Per recent batch: its images, pairs and same-class pairs."""
        self._sums = [0, 0, 0]
        self.ratio: float | None = None
        """The latest ratio of the recent batches' collision probability to the stretch's."""
        self.batches: list[list[int]] = []
        """The batches LAME predicted, as ``[first, last + 1)`` ranges."""

    def add(self, source_pred: torch.Tensor, batch: int) -> bool:
        """One batch's source predictions; whether LAME predicts it."""
        source_pred = source_pred[source_pred >= 0].cpu()
        counts = torch.bincount(source_pred.long(), minlength=self.num_classes)[: self.num_classes]
        self._add_to_stretch(counts.double())
        n = len(source_pred)
        if n < 2:
            return False
        self._add_recent((n, n * (n - 1) // 2, int((counts * (counts - 1)).sum()) // 2))
        share = self.hist / self.hist.sum()
        stretch = max(float((share * share).sum()), 1e-12)
        while len(self._recent) > 1 and self._enough(self._without_oldest(), stretch):
            self._sums = self._without_oldest()
            self._recent.popleft()
        if not self._enough(self._sums, stretch):
            return False
        self.ratio = self._sums[2] / self._sums[1] / stretch
        if self.ratio < self.concentration:
            return False
        add_to_ranges(self.batches, batch)
        return True

    def _add_to_stretch(self, counts: torch.Tensor) -> None:
        self._stretch.append(counts)
        self.hist += counts
        while len(self._stretch) > 1 and float(self.hist.sum() - self._stretch[0].sum()) >= self.stretch_images:
            self.hist -= self._stretch.popleft()

    def _add_recent(self, entry: tuple[int, int, int]) -> None:
        self._recent.append(entry)
        self._sums = [total + value for total, value in zip(self._sums, entry, strict=True)]

    def _without_oldest(self) -> list[int]:
        return [total - value for total, value in zip(self._sums, self._recent[0], strict=True)]

    def _enough(self, sums: list[int], stretch: float) -> bool:
        """Whether recent batches with these sums (images, pairs, same-class pairs) are judged,
        ``stretch`` being the stretch's collision probability."""
        return sums[0] >= self.window_images and sums[1] * stretch >= self.min_expected_pairs

    def state(self) -> dict[str, Any]:
        return {"stretch": [counts.clone() for counts in self._stretch],
                "recent": [list(entry) for entry in self._recent], "ratio": self.ratio, "batches": self.batches}

    def load_state(self, state: dict[str, Any]) -> None:
        self._stretch = deque(counts.clone() for counts in state["stretch"])
        self.hist = sum(self._stretch, torch.zeros(self.num_classes, dtype=torch.float64))
        self._recent, self._sums = deque(), [0, 0, 0]
        for n, pairs, same in state["recent"]:
            self._add_recent((int(n), int(pairs), int(same)))
        self.ratio, self.batches = state["ratio"], state["batches"]


def add_to_ranges(ranges: list[list[int]], batch: int) -> None:
    """Batch number ``batch`` into ``ranges`` (``[first, last + 1)``, in order): the last range
    grows when it ends there, else a new one starts."""
    if ranges and ranges[-1][1] == batch:
        ranges[-1][1] = batch + 1
    else:
        ranges.append([batch, batch + 1])


def lame_predictions(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """LAME's log-probabilities for a batch (its authors' defaults, ``LAMEConfig``)."""
    return lame_log_probs(features, logits, LAMEConfig())


__all__ = ["CONCENTRATION", "MIN_EXPECTED_PAIRS", "WINDOW_IMAGES", "FewClasses", "add_to_ranges", "lame_predictions"]
