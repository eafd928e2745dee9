"""What the engine hands to the sinks: per-batch outputs, running totals, and the sink protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from tta_cli.sources.items import Batch


@dataclass
class BatchOutputs:
    """Per-sample results of one batch, on the CPU, in stream order."""

    batch: Batch
    pred: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    top5: torch.Tensor
    used: torch.Tensor
    filtered: tuple[int, ...]
    reset: bool
    seconds: float
    source_rows: torch.Tensor | None = None
    """The rows the source reference predicted (``tta_cli.reference``); None without one."""
    source_logits: torch.Tensor | None = None
    """The source model's logits (float32) for ``source_rows``, in their order."""
    reference_seconds: float = 0.0

    def source_pred(self) -> torch.Tensor | None:
        """The source model's class for each of ``source_rows`` (-1 from non-finite logits)."""
        logits = self.source_logits
        if logits is None or self.source_rows is None:
            return None
        if not len(self.source_rows):
            return torch.empty(0, dtype=torch.long)
        return torch.where(torch.isfinite(logits).all(1), logits.argmax(1), -1)

    @property
    def correct(self) -> torch.Tensor | None:
        labels = self.batch.labels
        return None if labels is None else self.pred == labels


def empty_outputs(batch: Batch) -> BatchOutputs:
    """A batch of only skipped files since the last batch."""
    empty = torch.empty(0)
    return BatchOutputs(batch, empty.long(), empty, empty, empty.long(), empty.bool(), (), False, 0.0)


class Sink(Protocol):
    """Anything that takes every batch's outputs, in stream order."""

    def on_batch(self, outputs: BatchOutputs) -> None: ...


TIMINGS = ("adapt_seconds", "reference_seconds", "data_wait_seconds", "data_waits", "device_busy_seconds",
           "device_idle_seconds", "cpu_threads")
"""The ``Totals`` fields that are one process's timings, not counts."""


@dataclass
class Totals:
    """Running counts over the stream, for the progress display and the run record."""

    images: int = 0
    batches: int = 0
    used: int = 0
    labelled: int = 0
    correct: int = 0
    entropy_sum: float = 0.0
    skipped: int = 0
    resets: int = 0
    filter_counts: list[int] = field(default_factory=list)
    adapt_seconds: float = 0.0
    referenced: int = 0
    """Images the source reference predicted."""
    reference_seconds: float = 0.0
    """Of ``adapt_seconds``, the source reference's (host time: on a GPU, the launch only)."""
    data_wait_seconds: float = 0.0
    """Time the loop waited for the decoder to hand over a batch."""
    data_waits: int = 0
    """Batches that were not ready when the loop asked for them (waited over 1 ms)."""
    device_busy_seconds: float = 0.0
    device_idle_seconds: float = 0.0
    """CUDA only: time the GPU spent on steps and idle between them (waiting for data or the host)."""
    cpu_threads: list[tuple[int, int]] = field(default_factory=list)
    """(batch, intra-op threads from that batch on), when the thread count was tuned."""

    def add(self, out: BatchOutputs) -> None:
        n = len(out.batch.items)
        self.images += n
        self.batches += 1 if n else 0
        self.used += int(out.used.sum())
        self.entropy_sum += float(out.entropy.sum())
        self.skipped += len(out.batch.skipped)
        self.resets += int(out.reset)
        self.adapt_seconds += out.seconds
        self.referenced += 0 if out.source_rows is None else len(out.source_rows)
        self.reference_seconds += out.reference_seconds
        if not self.filter_counts:
            self.filter_counts = [0] * len(out.filtered)
        for i, count in enumerate(out.filtered):
            self.filter_counts[i] += count
        correct = out.correct
        if correct is not None and n:
            self.labelled += n
            self.correct += int(correct.sum())

    def take_timings(self, engine: Totals) -> None:
        """An engine's timings (under torchrun, rank 0's) into these totals, whose counts are the
        whole stream's."""
        for name in TIMINGS:
            setattr(self, name, getattr(engine, name))

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def mean_entropy(self) -> float | None:
        return self.entropy_sum / self.images if self.images else None

    @property
    def used_share(self) -> float | None:
        return self.used / self.images if self.images else None

    @property
    def device_idle_share(self) -> float | None:
        total = self.device_busy_seconds + self.device_idle_seconds
        return self.device_idle_seconds / total if total > 0 else None
