"""Progress: a live bar on a terminal; outside one, complete plain lines every few seconds."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tta_cli.outputs import BatchOutputs
from tta_cli.sinks.progress import ProgressDisplay
from tta_cli.sources.items import Batch, StreamItem


@dataclass
class FakeMethod:
    name: str = "sar"
    updates_parameters: bool = True
    stats_calls: list[int] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        self.stats_calls.append(1)
        return {"ema": 0.25}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def batch_outputs(n: int, first: int, correct: int) -> BatchOutputs:
    items = [StreamItem(f"a_long_folder_name/image_{first + i:05d}.png", Path("x"), label=1) for i in range(n)]
    pred = torch.tensor([1] * correct + [0] * (n - correct))
    return BatchOutputs(Batch(items, torch.zeros(n, 3, 1, 1), first), pred, torch.full((n,), 0.5),
                        torch.full((n,), 0.4), pred.view(n, 1), torch.tensor([True, False] * (n // 2)),
                        (), first == 8, 0.1)


def run(console: Console, clock: Clock, steps: int = 6) -> ProgressDisplay:
    display = ProgressDisplay(console, 48, FakeMethod(name="sar_with_a_long_name" * 3), interval=5.0, clock=clock)
    with display:
        for k in range(steps):
            clock.now += 2.0
            display.on_batch(batch_outputs(8, 8 * k, correct=6))
    return display


def test_outside_a_terminal_a_full_line_every_interval_and_one_at_the_end() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80)
    assert not console.is_terminal
    run(console, Clock(), steps=5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # at 6 s (batch 3) and at the end (10 s: batch 5 came too soon for a line)
    assert all(len(line) > 80 for line in lines)  # never cut or wrapped to the console width
    last = lines[-1]
    assert last.startswith("sar_with_a_long_name" * 3 + ": 40/48 images, 4.0 img/s, 10s")
    for part in ("H 0.400", "used 50%", "resets 1", "EMA 0.250", "acc 75.0%"):
        assert part in last
    assert "ETA 6s" in lines[0]  # 24 of 48 images at 4 img/s


def test_the_end_line_is_not_repeated_when_the_last_batch_printed_one() -> None:
    out = io.StringIO()
    run(Console(file=out, width=80), Clock(), steps=6)  # lines at batches 3 and 6 (6 s, 12 s), none after
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and ": 48/48 images, 4.0 img/s, 12s" in lines[-1]


def test_quiet_prints_nothing() -> None:
    out = io.StringIO()
    display = ProgressDisplay(Console(file=out), 48, FakeMethod(), quiet=True, clock=Clock())
    with display:
        display.on_batch(batch_outputs(8, 0, 8))
    assert out.getvalue() == "" and display.totals.images == 8


def test_on_a_terminal_no_plain_lines() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    display = run(console, Clock())
    assert not display.plain and "img/s" in out.getvalue()
    assert "sar_with_a_long_name" * 3 + ": " not in out.getvalue()


def test_method_state_is_read_at_most_twice_a_second() -> None:
    clock = Clock()
    method = FakeMethod()
    display = ProgressDisplay(Console(file=io.StringIO()), None, method, interval=0.0, clock=clock)
    with display:
        for _ in range(10):
            clock.now += 0.1
            display.on_batch(batch_outputs(2, 0, 1))
    assert 2 <= len(method.stats_calls) <= 3
