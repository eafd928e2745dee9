"""The one loop: batches to the device, through the method, outputs to the sinks.

The engine owns the device, the no-grad boundary of the bookkeeping and the order of events; the
method owns the loss and the update; sinks own what is written and shown.

On a GPU the loop never waits for the device: the next batch is copied (pinned memory, a side
stream) while the current one is processed, and each batch's per-sample outputs travel to the host
asynchronously and reach the sinks one batch later, once the next batch has been queued.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tta_cli import distributed
from tta_cli.methods.base import StepResult, TTAMethod, softmax_entropy
from tta_cli.outputs import BatchOutputs, Sink, Totals, empty_outputs
from tta_cli.reference import SourceReference
from tta_cli.sources.items import Batch
from tta_cli.threads import ThreadTuner


@torch.no_grad()
def device_outputs(result: StepResult) -> dict[str, torch.Tensor]:
    """Everything the sinks need from a step, computed where the logits are (no host sync)."""
    logits = result.logits.float()
    confidence, pred = logits.softmax(1).max(1)
    pred = torch.where(torch.isfinite(logits).all(1), pred, -1)  # never a silent class 0
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


def host_outputs(batch: Batch, host: dict[str, torch.Tensor], seconds: float,
                 reference_seconds: float = 0.0) -> BatchOutputs:
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
        source_rows=host.get("source_rows"),
        source_logits=host.get("source_logits"),
        reference_seconds=reference_seconds,
    )


def outputs_now(batch: Batch, result: StepResult, seconds: float) -> BatchOutputs:
    """A step's outputs on the CPU, now (waits for the device)."""
    host, done = to_host(device_outputs(result))
    if done is not None:
        done.synchronize()
    return host_outputs(batch, host, seconds)


# --- the loop -------------------------------------------------------------------------------------


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
    if not batch.items and not distributed.active():  # data-parallel: every rank steps, in step
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
                 events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None,
                 reference_seconds: float = 0.0) -> None:
        self.batch, self.host, self.done, self.seconds, self.events = batch, host, done, seconds, events
        self.reference_seconds = reference_seconds

    def outputs(self) -> BatchOutputs:
        if self.host is None:
            return empty_outputs(self.batch)
        if self.done is not None:
            self.done.synchronize()  # long done by now: a batch later, the GPU is on the next one
        seconds = self.seconds
        if self.events is not None:
            seconds = self.events[0].elapsed_time(self.events[1]) / 1000
        return host_outputs(self.batch, self.host, seconds, self.reference_seconds)


def _step(method: TTAMethod, loaded: _Loaded, reference: SourceReference | None = None) -> _InFlight:
    """The method's step on a batch, then the source reference's pass on its referenced rows."""
    if loaded.x is None:
        return _InFlight(loaded.batch)
    timed = loaded.x.device.type == "cuda"
    events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if timed else None
    start = time.perf_counter()
    if events is not None:
        events[0].record()
    result = method.step(loaded.x)
    outputs = device_outputs(result)
    stepped = time.perf_counter()
    if reference is not None:
        outputs |= reference.outputs(loaded.x, loaded.batch.first_index, method, result.source_logits)
    host, done = to_host(outputs)
    if events is not None:
        events[1].record()
    end = time.perf_counter()
    return _InFlight(loaded.batch, host, done, end - start, events, end - stepped if reference else 0.0)


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
    defer: bool | None = None, tune_threads: bool = False, reference: SourceReference | None = None,
    totals: Totals | None = None,
) -> Totals:
    """Adapt on every batch in order; each sink sees every batch's outputs, in order.

    ``defer`` (default: on CUDA) delivers a batch's outputs after the next batch has been queued,
    when their copy to the host is long finished; otherwise as soon as its step returns.
    ``tune_threads`` lets a ``ThreadTuner`` choose the CPU thread count (restored at the end).
    ``reference``: the source model's pass after each step (its rows and logits in the outputs).
    ``totals``: the counts to add to (a resumed run's), else new ones; updated before the sinks
    see a batch.
    """
    totals = totals if totals is not None else Totals()
    tuner = ThreadTuner() if tune_threads and device.type == "cpu" else None
    try:
        _loop(method, batches, device, sinks, totals, defer, tuner if tuner and tuner.active else None,
              reference)
    finally:
        if tuner is not None:
            tuner.restore()
    settle = getattr(method, "settle", None)
    if callable(settle):
        settle()
    return totals


def _loop(method: TTAMethod, batches: Iterable[Batch], device: torch.device, sinks: Sequence[Sink],
          totals: Totals, defer: bool | None, tuner: ThreadTuner | None,
          reference: SourceReference | None = None) -> None:
    timeline = _Timeline()
    deferred = device.type == "cuda" if defer is None else defer
    pending: _InFlight | None = None
    for loaded in device_batches(batches, device, totals):
        if tuner is not None:
            _note_threads(totals, tuner.before_step())
        current = _step(method, loaded, reference)
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
