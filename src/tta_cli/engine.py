"""The one loop: batches to the device, through the method, outputs to the sinks.

The engine owns the device, the no-grad boundary of the bookkeeping and the order of events; the
method owns the loss and the update; sinks own what is written and shown.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tta_cli.errors import TTAError
from tta_cli.methods.base import StepResult, TTAMethod, softmax_entropy
from tta_cli.sources.items import Batch


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise TTAError(f"invalid device {requested!r}", "use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TTAError("CUDA is not available on this machine", "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TTAError(f"no CUDA device {device.index}", f"{torch.cuda.device_count()} available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TTAError("MPS is not available on this machine", "use --device cpu or auto")
    return device


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

    @property
    def correct(self) -> torch.Tensor | None:
        labels = self.batch.labels
        return None if labels is None else self.pred == labels


@torch.no_grad()
def summarise(batch: Batch, result: StepResult, seconds: float) -> BatchOutputs:
    logits = result.logits.float()
    probs = logits.softmax(1)
    confidence, pred = probs.max(1)
    k = min(5, logits.shape[1])
    return BatchOutputs(
        batch=batch,
        pred=pred.cpu(),
        confidence=confidence.cpu(),
        entropy=softmax_entropy(logits).cpu(),
        top5=logits.topk(k, dim=1).indices.cpu(),
        used=result.used.cpu(),
        filtered=tuple(int(n) for n in result.filtered),
        reset=result.reset,
        seconds=seconds,
    )


class Sink(Protocol):
    def on_batch(self, outputs: BatchOutputs) -> None: ...


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

    def add(self, out: BatchOutputs) -> None:
        n = len(out.batch.items)
        self.images += n
        self.batches += 1 if n else 0
        self.used += int(out.used.sum())
        self.entropy_sum += float(out.entropy.sum())
        self.skipped += len(out.batch.skipped)
        self.resets += int(out.reset)
        self.adapt_seconds += out.seconds
        if not self.filter_counts:
            self.filter_counts = [0] * len(out.filtered)
        for i, count in enumerate(out.filtered):
            self.filter_counts[i] += count
        correct = out.correct
        if correct is not None and n:
            self.labelled += n
            self.correct += int(correct.sum())

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def mean_entropy(self) -> float | None:
        return self.entropy_sum / self.images if self.images else None

    @property
    def used_share(self) -> float | None:
        return self.used / self.images if self.images else None


def run_stream(
    method: TTAMethod, batches: Iterable[Batch], device: torch.device, sinks: Sequence[Sink] = ()
) -> Totals:
    """Adapt on every batch in order; each sink sees every batch's outputs as soon as it is done."""
    totals = Totals()
    for batch in batches:
        if batch.items:
            x = batch.images.to(device, non_blocking=True)
            start = time.perf_counter()
            result = method.step(x)
            outputs = summarise(batch, result, 0.0)
            outputs.seconds = time.perf_counter() - start
        else:  # only skipped files since the last batch
            empty = torch.empty(0)
            outputs = BatchOutputs(batch, empty.long(), empty, empty, empty.long(), empty.bool(), (), False, 0.0)
        totals.add(outputs)
        for sink in sinks:
            sink.on_batch(outputs)
    return totals
