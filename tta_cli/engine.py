"""The one loop: batches to the device, through the method, outputs to the sinks.

The engine owns the device, the no-grad boundary of the bookkeeping and the order of events; the
method owns the loss and the update; sinks own what is written and shown.

On a GPU the loop never waits for the device: the next batch is copied (pinned memory, a side
stream) while the current one is processed, and each batch's per-sample outputs travel to the host
asynchronously and reach the sinks one batch later, once the next batch has been queued.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from tta_cli.errors import TTAError
from tta_cli.methods.base import StepResult, TTAMethod, is_vit_like, softmax_entropy
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


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning: the stream's shapes repeat, so the fastest algorithms are found once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def resolve_channels_last(requested: str, model: nn.Module, device: torch.device) -> bool:
    """``auto``: convolutional networks on CUDA (tensor-core convolutions want NHWC); on the CPU
    it measured no faster (docs/PERFORMANCE.md) and transformers have a single convolution."""
    if requested in ("on", "off"):
        return requested == "on"
    if requested != "auto":
        raise TTAError(f"--channels-last must be auto, on or off, got {requested!r}")
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return device.type == "cuda" and has_conv and not is_vit_like(model)


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
def device_outputs(result: StepResult) -> dict[str, torch.Tensor]:
    """Everything the sinks need from a step, computed where the logits are (no host sync)."""
    logits = result.logits.float()
    confidence, pred = logits.softmax(1).max(1)
    device = logits.device
    counts = [torch.as_tensor(n, device=device).reshape(()).long() for n in result.filtered]
    return {
        "pred": pred,
        "confidence": confidence,
        "entropy": softmax_entropy(logits),
        "top5": logits.topk(min(5, logits.shape[1]), dim=1).indices,
        "used": result.used,
        "filtered": torch.stack(counts) if counts else torch.zeros(0, dtype=torch.long, device=device),
        "reset": torch.as_tensor(result.reset, device=device).reshape(()),
    }


def to_host(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
    """Start copying to the CPU; on CUDA into pinned memory, with an event that marks the end."""
    first = next(iter(tensors.values()))
    if first.device.type != "cuda":
        return {k: v.cpu() for k, v in tensors.items()}, None
    host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in tensors.items()}
    for key, value in tensors.items():
        host[key].copy_(value, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def host_outputs(batch: Batch, host: dict[str, torch.Tensor], seconds: float) -> BatchOutputs:
    return BatchOutputs(
        batch=batch,
        pred=host["pred"],
        confidence=host["confidence"],
        entropy=host["entropy"],
        top5=host["top5"],
        used=host["used"],
        filtered=tuple(int(n) for n in host["filtered"].tolist()),
        reset=bool(host["reset"]),
        seconds=seconds,
    )


def summarise(batch: Batch, result: StepResult, seconds: float) -> BatchOutputs:
    """A step's outputs on the CPU, now (waits for the device)."""
    host, done = to_host(device_outputs(result))
    if done is not None:
        done.synchronize()
    return host_outputs(batch, host, seconds)


def empty_outputs(batch: Batch) -> BatchOutputs:
    """A batch of only skipped files since the last batch."""
    empty = torch.empty(0)
    return BatchOutputs(batch, empty.long(), empty, empty, empty.long(), empty.bool(), (), False, 0.0)


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

    @property
    def device_idle_share(self) -> float | None:
        total = self.device_busy_seconds + self.device_idle_seconds
        return self.device_idle_seconds / total if total > 0 else None


# --- the loop -------------------------------------------------------------------------------------


class OtherLoad:
    """How many cores other processes kept busy since the last call (Linux /proc/stat; None
    elsewhere): system busy time minus this process's CPU time, over the wall time."""

    def __init__(self) -> None:
        self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)) / os.sysconf("SC_CLK_TCK")
        return busy, time.process_time(), time.perf_counter()

    def cores(self) -> float | None:
        now, last = self._sample(), self.last
        self.last = now
        if now is None or last is None or now[2] - last[2] < 0.05:
            return None
        return max(0.0, (now[0] - last[0]) - (now[1] - last[1])) / (now[2] - last[2])


class ThreadTuner:
    """Chooses torch's intra-op thread count on the CPU by timing steps.

    When another process keeps a core busy, every parallel region waits for the thread that lost
    its core: on a 2-core machine with one busy core, 2 threads ran SAR 20x slower than 1
    (docs/PERFORMANCE.md). After a warm-up batch on one thread, one batch is timed at each
    candidate count and the fastest kept; the trial is repeated after ``period`` batches, the
    period doubling while the choice holds, and at once when two batches in a row run 3x slower
    than the choice's trial (another process started). Different thread counts may sum in a
    different order (last-bit differences); set OMP_NUM_THREADS to pin the count instead.
    Counts above the cores other processes left free are not tried (they cannot win, and one
    batch at them costs as much as twenty).
    """

    SLOWER = 3.0

    def __init__(self, period: int = 32) -> None:
        self.initial = torch.get_num_threads()
        self.candidates = list(dict.fromkeys([self.initial, max(1, self.initial // 2), 1]))
        self.base_period = period
        self.period = period
        self.trial: list[int] = list(self.candidates)
        self.times: dict[int, float] = {}
        self.chosen = 1
        self.next_trial = 1
        self.batch = 0
        self.reference = math.inf  # the chosen count's time per image in its trial
        self.slow_batches = 0
        self.load = OtherLoad()

    @property
    def active(self) -> bool:
        return len(self.candidates) > 1

    def before_step(self) -> int:
        """Set and return the thread count for the next batch."""
        if self.batch == self.next_trial and len(self.trial) == len(self.candidates):
            self._drop_hopeless()
        trying = self.batch >= self.next_trial and self.trial
        threads = self.trial[0] if trying else self.chosen
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def after_step(self, seconds: float, images: int) -> None:
        if images and self.batch >= self.next_trial and self.trial:
            self.times[self.trial.pop(0)] = seconds / images
            if not self.trial:
                self._decide()
        elif images:
            self.slow_batches = self.slow_batches + 1 if seconds / images > self.SLOWER * self.reference else 0
            if self.slow_batches >= 2:
                self.next_trial = self.batch + 1
        self.batch += 1
        if self.batch != self.next_trial:
            self.load.cores()  # so that a trial looks at the load during the batch just before it

    def _drop_hopeless(self) -> None:
        """Before a trial: keep the counts that fit the cores left free during the last batch."""
        busy = self.load.cores()
        if busy is None:
            return
        affinity = getattr(os, "sched_getaffinity", None)
        cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
        free = max(1, round(cores - busy))
        self.trial = [n for n in self.trial if n <= free] or [1]

    def _decide(self) -> None:
        best = min(self.times, key=self.times.__getitem__)
        self.period = self.period * 2 if best == self.chosen else self.base_period
        self.chosen = best
        self.reference = self.times[best]
        self.slow_batches = 0
        self.next_trial = self.batch + 1 + self.period
        self.trial = list(self.candidates)
        self.times = {}

    def restore(self) -> None:
        torch.set_num_threads(self.initial)

DATA_WAIT_S = 1e-3


@dataclass
class _Loaded:
    """A batch with its images on the device (or on their way there: ``ready`` marks the end)."""

    batch: Batch
    x: torch.Tensor | None
    ready: torch.cuda.Event | None = None


def _load(iterator: Iterator[Batch], device: torch.device, stream: torch.cuda.Stream | None,
          totals: Totals) -> _Loaded | None:
    start = time.perf_counter()
    batch = next(iterator, None)
    if batch is None:  # the end of the stream is not a wait for data
        return None
    waited = time.perf_counter() - start
    totals.data_wait_seconds += waited
    totals.data_waits += int(waited > DATA_WAIT_S)
    if not batch.items:
        return _Loaded(batch, None)
    if stream is None:
        return _Loaded(batch, batch.images.to(device))
    with torch.cuda.stream(stream):  # a side stream: the copy overlaps the current step
        x = batch.images.to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return _Loaded(batch, x, ready)


def device_batches(batches: Iterable[Batch], device: torch.device, totals: Totals) -> Iterator[_Loaded]:
    """Batches on the device, in order; the next batch is fetched and its copy started before the
    current one is handed out, so the transfer overlaps the current step."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    iterator = iter(batches)
    ahead = _load(iterator, device, stream, totals)
    while ahead is not None:
        current = ahead
        ahead = _load(iterator, device, stream, totals)
        if current.ready is not None and current.x is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_event(current.ready)
            current.x.record_stream(compute)  # allocated on the side stream, used on this one
        yield current


class _InFlight:
    """One batch between its step and its sinks: the outputs on their way to the host."""

    def __init__(self, batch: Batch, host: dict[str, torch.Tensor] | None = None,
                 done: torch.cuda.Event | None = None, seconds: float = 0.0,
                 events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None) -> None:
        self.batch, self.host, self.done, self.seconds, self.events = batch, host, done, seconds, events

    def outputs(self) -> BatchOutputs:
        if self.host is None:
            return empty_outputs(self.batch)
        if self.done is not None:
            self.done.synchronize()  # long done by now: a batch later, the GPU is on the next one
        seconds = self.seconds
        if self.events is not None:
            seconds = self.events[0].elapsed_time(self.events[1]) / 1000
        return host_outputs(self.batch, self.host, seconds)


def _step(method: TTAMethod, loaded: _Loaded) -> _InFlight:
    if loaded.x is None:
        return _InFlight(loaded.batch)
    timed = loaded.x.device.type == "cuda"
    events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if timed else None
    start = time.perf_counter()
    if events is not None:
        events[0].record()
    result = method.step(loaded.x)
    host, done = to_host(device_outputs(result))
    if events is not None:
        events[1].record()
    return _InFlight(loaded.batch, host, done, time.perf_counter() - start, events)


class _Timeline:
    """GPU busy and idle time from the step events, read when a batch is delivered."""

    def __init__(self) -> None:
        self.last_end: torch.cuda.Event | None = None

    def add(self, flight: _InFlight, totals: Totals) -> None:
        if flight.events is None:
            return
        start, end = flight.events
        totals.device_busy_seconds += start.elapsed_time(end) / 1000
        if self.last_end is not None:
            totals.device_idle_seconds += max(0.0, self.last_end.elapsed_time(start) / 1000)
        self.last_end = end


def run_stream(
    method: TTAMethod, batches: Iterable[Batch], device: torch.device, sinks: Sequence[Sink] = (),
    defer: bool | None = None, tune_threads: bool = False,
) -> Totals:
    """Adapt on every batch in order; each sink sees every batch's outputs, in order.

    ``defer`` (default: on CUDA) delivers a batch's outputs after the next batch has been queued,
    when their copy to the host is long finished; otherwise as soon as its step returns.
    ``tune_threads`` lets a ``ThreadTuner`` choose the CPU thread count (restored at the end).
    """
    totals = Totals()
    tuner = ThreadTuner() if tune_threads and device.type == "cpu" else None
    try:
        _loop(method, batches, device, sinks, totals, defer, tuner if tuner and tuner.active else None)
    finally:
        if tuner is not None:
            tuner.restore()
    settle = getattr(method, "settle", None)
    if callable(settle):
        settle()
    return totals


def _loop(method: TTAMethod, batches: Iterable[Batch], device: torch.device, sinks: Sequence[Sink],
          totals: Totals, defer: bool | None, tuner: ThreadTuner | None) -> None:
    timeline = _Timeline()
    deferred = device.type == "cuda" if defer is None else defer
    pending: _InFlight | None = None
    for loaded in device_batches(batches, device, totals):
        if tuner is not None:
            _note_threads(totals, tuner.before_step())
        current = _step(method, loaded)
        if tuner is not None:
            tuner.after_step(current.seconds, len(loaded.batch.items))
        if pending is not None:
            _deliver(pending, totals, timeline, sinks)
        pending = current
        if not deferred:
            _deliver(pending, totals, timeline, sinks)
            pending = None
    if pending is not None:
        _deliver(pending, totals, timeline, sinks)


def _note_threads(totals: Totals, threads: int) -> None:
    if not totals.cpu_threads or totals.cpu_threads[-1][1] != threads:
        totals.cpu_threads.append((totals.batches, threads))


def _deliver(flight: _InFlight, totals: Totals, timeline: _Timeline, sinks: Sequence[Sink]) -> None:
    outputs = flight.outputs()
    timeline.add(flight, totals)
    totals.add(outputs)
    for sink in sinks:
        sink.on_batch(outputs)
