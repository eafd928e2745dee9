"""Progress: a live bar on a terminal; outside one, complete plain lines every few seconds."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tta_cli.outputs import BatchOutputs
from tta_cli.sinks.progress import ProgressDisplay, source_accuracy, summary_table
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
    legend, *lines = out.getvalue().splitlines()
    assert legend.startswith("H: mean prediction entropy so far, in nats")
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
    _legend, *lines = out.getvalue().splitlines()
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


def test_on_an_80_column_terminal_the_count_and_time_left_stay_and_the_legend_shows_once() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    clock = Clock()
    display = ProgressDisplay(console, 48, FakeMethod(), interval=5.0, clock=clock)
    with display:
        for k in range(2):
            clock.now += 2.0
            display.on_batch(batch_outputs(8, 8 * k, correct=6))
        rendered = io.StringIO()
        Console(file=rendered, force_terminal=True, color_system=None, width=80).print(
            display._progress.get_renderable())
    lines = rendered.getvalue().strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 80
    assert "16/48" in lines[0] and re.search(r" \d+:\d\d ", lines[0]) and "acc 75.0%" in lines[0]
    text = out.getvalue()
    assert text.count("H: mean prediction entropy") == 1 and text.count("EMA: SAR's moving average") == 1


def test_a_wide_terminal_gets_a_bar() -> None:
    assert any(type(c).__name__ == "BarColumn" for c in ProgressDisplay._columns(160))
    assert not any(type(c).__name__ == "BarColumn" for c in ProgressDisplay._columns(80))


def _record(out: Path, accuracy: float | None, changed: float | None = 0.48125, **config: Any) -> dict[str, Any]:
    health: dict[str, Any] = {"verdict": "ok", "reasons": ["48.1% of predictions differ from the source model's"]}
    if changed is not None:
        health["changed_share"] = changed
    return {"config": {"format": "csv", **config}, "out": str(out), "device": "cpu", "accuracy": accuracy,
            "model": {"spec": "local-dir:m", "architecture": "resnet18", "num_classes": 10},
            "method": {"method": "auto"}, "timing": {"images_per_second": 50.0}, "health": health,
            "counts": {"images": 4, "skipped": 0, "used_for_update": 0, "used_share": 0.0, "resets": 0,
                       "mean_entropy": 0.9403, "labelled": 4 if accuracy is not None else 0}}


def _write_predictions(out: Path, labels: list[str], source: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pairs = enumerate(zip(labels, source, strict=True))
    rows = ["index,pred,label,source_pred"] + [f"{i},0,{y},{s}" for i, (y, s) in pairs]
    (out / "predictions.csv").write_text("\n".join(rows) + "\n")


def _summary_text(record: dict[str, Any]) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table(record))
    return out.getvalue()


def _last_sentence(text: str) -> str:
    """The caption under the table, its wrapped lines joined."""
    return " ".join(line.strip() for line in text.split("└")[-1].splitlines()[1:] if line.strip())


def test_the_summary_shows_accuracy_before_and_after_and_ends_with_one_sentence(tmp_path: Path) -> None:
    _write_predictions(tmp_path, ["1", "2", "3", "4"], ["1", "0", "0", "0"])  # the source: 1 of 4
    text = _summary_text(_record(tmp_path, accuracy=0.75))
    assert "25.0% -> 75.0% (+50.0)" in text
    last = _last_sentence(text)
    assert last.startswith("Adaptation raised accuracy from 25.0% (the model as it was) to 75.0% (+50.0 points)")
    assert "verdict ok: predictions changed, with no sign of collapse." in last


def test_without_labels_the_summary_shows_the_share_changed(tmp_path: Path) -> None:
    text = _summary_text(_record(tmp_path, accuracy=None))
    assert "48.1% of the predictions differ from the source model's" in text
    assert "accuracy" not in text.split("└")[0].lower()  # no accuracy row
    assert _last_sentence(text).startswith("Adaptation changed 48.1% of the predictions (no labels: accuracy unknown)")


def test_entropy_is_in_nats_with_its_share_of_the_maximum(tmp_path: Path) -> None:
    assert "0.940 nats (0.41 of the maximum, ln 10)" in _summary_text(_record(tmp_path, accuracy=None))


def test_a_prediction_run_says_it_does_not_adapt(tmp_path: Path) -> None:
    record = _record(tmp_path, accuracy=0.5, changed=None, predict_only=True)
    record["health"] = {"verdict": "no-change", "reasons": ["the source model itself, not adapted"]}
    text = _summary_text(record)
    assert "no-change" not in text and "none: predicts with the model as it is" in text
    assert _last_sentence(text) == "Predicted 4 images with the model as it is, without adapting, accuracy 50.0%."


def test_source_accuracy_prefers_the_record_and_needs_labels(tmp_path: Path) -> None:
    record = _record(tmp_path, accuracy=0.75)
    record["health"] |= {"source_correct": 3, "labelled": 4}
    assert source_accuracy(record) == (3, 4)
    assert source_accuracy(_record(tmp_path, accuracy=None)) is None


def test_an_estimated_loss_shows_its_estimate_and_what_to_do(tmp_path: Path) -> None:
    record = _record(tmp_path, accuracy=None)
    record["health"] |= {"verdict": "hurt", "estimated_accuracy_change": {"points": -7.5, "low": -20.0, "high": 5.0},
                         "advice": "use the source model's predictions (predictions.csv column source_pred)"}
    text = _summary_text(record)
    assert "-7.5 points (-20.0 to +5.0), without labels" in text
    assert "what to do" in text and "source_pred" in text
    assert "an estimated -7.5 points of accuracy" in _last_sentence(text)
    assert "verdict hurt: the label-free estimate says adaptation lost accuracy" in _last_sentence(text)


def test_auto_giving_batches_to_lame_is_in_the_summary(tmp_path: Path) -> None:
    record = _record(tmp_path, accuracy=None)
    record["counts"]["batches"] = 16
    record["method_state"] = {"lame_batches": [[6, 7], [8, 10]], "lame_share": 0.1875}
    assert "3 of 16 batches (few classes per batch)" in _summary_text(record)
    assert "LAME" not in _summary_text(_record(tmp_path, accuracy=None))


def test_auto_restarting_where_the_input_changed_is_in_the_summary(tmp_path: Path) -> None:
    record = _record(tmp_path, accuracy=None)
    record["method"]["choice"] = {"method": "roid", "why": "test"}
    record["method_state"] = {"domain_changes": [13, 25, 37]}
    assert "roid from the source model where the input changed: at batches 13, 25 and 37" in _summary_text(record)
    record["method_state"] = {"domain_changes": list(range(10, 80, 10))}
    assert "at batches 10, 20, 30, 40, 50 and 2 more" in _summary_text(record)
    assert "restarted" not in _summary_text(_record(tmp_path, accuracy=None))
