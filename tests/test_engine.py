"""The loop: every batch reaches the sinks once, in order, with the same outputs whether they are
delivered at once (CPU) or one batch later (the GPU path, forced here); counters and timing."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

from tta_cli.engine import (
    BatchOutputs,
    ThreadTuner,
    configure_backends,
    device_outputs,
    host_outputs,
    resolve_channels_last,
    run_stream,
    summarise,
    to_host,
)
from tta_cli.errors import TTAError
from tta_cli.methods import create_method
from tta_cli.sources.items import Batch, StreamItem

CPU = torch.device("cpu")



@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # tiny models: one thread avoids OpenMP barriers stalling on a busy machine (100x slower)
    torch.set_num_threads(1)

def _model(arch: str = "test_vit") -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if arch == "test_vit" else {}
    return timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)


def _batches(sizes: list[int], skipped_before: int | None = None) -> list[Batch]:
    """Batches of random images labelled 0..9; optionally a skipped-only batch at that position."""
    g = torch.Generator().manual_seed(3)
    batches, first = [], 0
    for b, size in enumerate(sizes):
        if b == skipped_before:
            bad = StreamItem("bad.png", Path("bad.png"))
            batches.append(Batch([], torch.empty(0), first, [(bad, "OSError: truncated")]))
        items = [StreamItem(f"{first + i}.png", Path(f"{first + i}.png"), label=(first + i) % 10)
                 for i in range(size)]
        batches.append(Batch(items, torch.randn(size, 3, 32, 32, generator=g) * 2, first))
        first += size
    return batches


class Recorder:
    def __init__(self) -> None:
        self.outputs: list[BatchOutputs] = []

    def on_batch(self, outputs: BatchOutputs) -> None:
        self.outputs.append(outputs)


def _run(defer: bool, name: str = "sar", **settings: object) -> tuple[Recorder, object]:
    method = create_method(name, _model(), batch_size=4, lr=0.05, **settings)
    recorder = Recorder()
    totals = run_stream(method, _batches([4, 4, 4, 2], skipped_before=2), CPU, [recorder], defer=defer)
    return recorder, totals


@pytest.mark.parametrize("defer", [False, True])
def test_every_batch_reaches_the_sinks_once_in_order(defer: bool) -> None:
    recorder, totals = _run(defer)
    keys = [item.key for out in recorder.outputs for item in out.batch.items]
    assert keys == [f"{i}.png" for i in range(14)]
    assert [len(out.batch.items) for out in recorder.outputs] == [4, 4, 0, 4, 2]
    assert totals.images == 14 and totals.batches == 4 and totals.skipped == 1
    assert totals.labelled == 14


def test_deferred_delivery_gives_the_same_outputs() -> None:
    now, totals_now = _run(False, margin_factor=1.0)
    later, totals_later = _run(True, margin_factor=1.0)
    for a, b in zip(now.outputs, later.outputs, strict=True):
        assert torch.equal(a.pred, b.pred) and torch.equal(a.used, b.used)
        assert torch.equal(a.top5, b.top5) and torch.allclose(a.entropy, b.entropy)
        assert a.filtered == b.filtered and a.reset == b.reset
    assert totals_now.used == totals_later.used and totals_now.filter_counts == totals_later.filter_counts


def test_outputs_are_host_values_with_plain_types() -> None:
    recorder, totals = _run(False, margin_factor=1.0)
    out = recorder.outputs[0]
    assert out.pred.device.type == "cpu" and out.pred.dtype == torch.long
    assert out.top5.shape == (4, 5) and out.used.dtype == torch.bool
    assert isinstance(out.reset, bool) and all(isinstance(n, int) for n in out.filtered)
    assert len(totals.filter_counts) == 2 and totals.filter_counts[0] >= totals.filter_counts[1]
    assert totals.used == totals.filter_counts[1]


def test_device_decided_resets_are_counted() -> None:
    method = create_method("sar", _model(), batch_size=4, lr=0.05, margin_factor=10.0, reset_threshold=100.0)
    recorder = Recorder()
    totals = run_stream(method, _batches([4, 4, 4]), CPU, [recorder])
    assert [out.reset for out in recorder.outputs] == [True, True, True]
    assert totals.resets == 3 and method.resets == [0, 1, 2]


def test_summarise_equals_the_asynchronous_pieces() -> None:
    method = create_method("tent", _model(), batch_size=4, lr=0.05)
    batch = _batches([4])[0]
    result = method.step(batch.images)
    direct = summarise(batch, result, 0.5)
    host, done = to_host(device_outputs(result))
    assert done is None  # nothing to wait for on the CPU
    pieces = host_outputs(batch, host, 0.5)
    assert torch.equal(direct.pred, pieces.pred) and torch.equal(direct.confidence, pieces.confidence)
    assert direct.filtered == () and direct.reset is False


def test_waiting_for_data_is_measured() -> None:
    def slow() -> Iterator[Batch]:
        for batch in _batches([2, 2, 2]):
            time.sleep(0.01)
            yield batch

    method = create_method("source", _model(), batch_size=2)
    totals = run_stream(method, slow(), CPU)
    assert totals.data_waits == 3 and totals.data_wait_seconds >= 0.03
    assert totals.device_idle_share is None  # measured on CUDA only


def test_channels_last_auto_means_conv_nets_on_cuda() -> None:
    cuda = torch.device("cuda")
    assert resolve_channels_last("auto", _model("test_resnet"), cuda) is True
    assert resolve_channels_last("auto", _model("test_vit"), cuda) is False
    assert resolve_channels_last("auto", _model("test_resnet"), CPU) is False
    assert resolve_channels_last("on", _model("test_vit"), CPU) is True
    assert resolve_channels_last("off", _model("test_resnet"), cuda) is False
    with pytest.raises(TTAError):
        resolve_channels_last("yes", _model("test_resnet"), CPU)


def test_configure_backends_leaves_the_cpu_alone() -> None:
    before = torch.backends.cudnn.benchmark
    configure_backends(CPU)
    assert torch.backends.cudnn.benchmark == before


def test_thread_tuner_keeps_the_fastest_count_and_retries_when_slowed() -> None:
    torch.set_num_threads(2)
    tuner = ThreadTuner(period=4)
    tuner.load.cores = lambda: None  # type: ignore[method-assign]  # no load reading: try every count
    assert tuner.active and tuner.candidates == [2, 1]
    per_image = {2: 1.0, 1: 0.1}  # a busy machine: two threads wait for each other
    seen = []
    for _ in range(3):  # warm-up on one thread, then one batch at each count
        threads = tuner.before_step()
        seen.append(threads)
        tuner.after_step(per_image[threads] * 8, 8)
    assert seen == [1, 2, 1] and tuner.chosen == 1
    assert tuner.before_step() == 1
    tuner.after_step(0.1 * 8, 8)
    for _ in range(2):  # another process starts: 5x slower than the trial
        assert tuner.before_step() == 1
        tuner.after_step(0.5 * 8, 8)
    assert tuner.before_step() == 2  # a new trial at once
    tuner.restore()
    assert torch.get_num_threads() == 2


def test_thread_tuning_is_recorded_and_undone() -> None:
    torch.set_num_threads(2)
    method = create_method("source", _model(), batch_size=2)
    totals = run_stream(method, _batches([2] * 5), CPU, tune_threads=True)
    assert totals.cpu_threads[0] == (0, 1) and {t for _, t in totals.cpu_threads} <= {1, 2}
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert not ThreadTuner().active  # nothing to choose from


def test_thread_counts_beyond_the_free_cores_are_not_tried() -> None:
    torch.set_num_threads(2)
    tuner = ThreadTuner()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    tuner.load.cores = lambda: cores - 1.0  # type: ignore[method-assign]  # all but one core busy
    seen = []
    for _ in range(3):
        threads = tuner.before_step()
        seen.append(threads)
        tuner.after_step(0.1, 8)
    assert seen == [1, 1, 1] and tuner.chosen == 1
    tuner.restore()
