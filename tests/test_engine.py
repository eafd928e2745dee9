"""The loop: every batch reaches the sinks once, in order, with the same outputs whether they are
delivered at once (CPU) or one batch later (the GPU path, forced here); counters and timing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import Recorder, tiny_timm
from tta_cli.engine import device_outputs, host_outputs, outputs_now, run_stream, to_host
from tta_cli.methods import create_method
from tta_cli.sources.items import Batch, StreamItem
from tta_cli.threads import ThreadTuner

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


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


def _run(defer: bool, name: str = "sar", **hyperparameters: object) -> tuple[Recorder, object]:
    method = create_method(name, tiny_timm(), batch_size=4, lr=0.05, **hyperparameters)
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
    method = create_method("sar", tiny_timm(), batch_size=4, lr=0.05, margin_factor=10.0, reset_threshold=100.0)
    recorder = Recorder()
    totals = run_stream(method, _batches([4, 4, 4]), CPU, [recorder])
    assert [out.reset for out in recorder.outputs] == [True, True, True]
    assert totals.resets == 3 and method.resets == [0, 1, 2]


def test_outputs_now_equals_the_asynchronous_pieces() -> None:
    method = create_method("tent", tiny_timm(), batch_size=4, lr=0.05)
    batch = _batches([4])[0]
    result = method.step(batch.images)
    direct = outputs_now(batch, result, 0.5)
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

    method = create_method("source", tiny_timm(), batch_size=2)
    totals = run_stream(method, slow(), CPU)
    assert totals.data_waits == 3 and totals.data_wait_seconds >= 0.03
    assert totals.device_idle_share is None  # measured on CUDA only


def test_thread_tuning_is_recorded_and_undone() -> None:
    torch.set_num_threads(2)
    method = create_method("source", tiny_timm(), batch_size=2)
    totals = run_stream(method, _batches([2] * 5), CPU, tune_threads=True)
    assert totals.cpu_threads[0] == (0, 1) and {t for _, t in totals.cpu_threads} <= {1, 2}
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert not ThreadTuner().active  # nothing to choose from
