"""The benchmark report: aggregation, collapse attribution, markdown, plots, and the curve recorder."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tta_cli.bench.report import adaptation_collapses, markdown, summarise, write_report
from tta_cli.bench.results import CURVE_FIELDS, RESULT_FIELDS, CurveRecorder, is_collapsed


def _row(setting: str, corruption: str, method: str, acc: float, collapsed: bool = False,
         resets: int = 0) -> dict[str, str]:
    return {"model": "local-dir:/m/cifar10-resnet18-gn", "setting": setting, "corruption": corruption,
            "method": method, "batch_size": "64", "images": "100", "correct": str(int(acc * 100)),
            "accuracy": str(acc), "last_tenth_accuracy": "0.0" if collapsed else "0.5",
            "collapsed": str(collapsed), "resets": str(resets), "used_share": "0.5", "mean_entropy": "1.0",
            "adapt_seconds": "0.5", "wall_seconds": "0.6", "lr": ""}


ROWS = [
    _row("mild", "fog", "source", 0.40), _row("mild", "snow", "source", 0.20),
    _row("mild", "fog", "tent", 0.50), _row("mild", "snow", "tent", 0.06, collapsed=True),
    _row("label-shift", "fog", "source", 0.05, collapsed=True), _row("label-shift", "fog", "tent", 0.02, True),
    _row("mixed", "all", "sar", 0.30, resets=3),
]


def test_summary_averages_over_corruptions_and_attributes_collapses() -> None:
    summary = {(s["setting"], s["method"]): s for s in summarise(ROWS)}
    assert summary[("mild", "source")]["accuracy"] == pytest.approx(0.30)
    assert summary[("mild", "tent")]["accuracy"] == pytest.approx(0.28)
    assert summary[("mild", "tent")]["collapsed"] == 1
    # The source model fails the last-tenth test on this label-shift stream too: not tent's collapse.
    assert summary[("label-shift", "tent")]["collapsed"] == 0
    assert adaptation_collapses(ROWS) == {("local-dir:/m/cifar10-resnet18-gn", "mild", "snow", "tent")}
    assert summary[("mixed", "sar")]["resets"] == 3
    assert summary[("mild", "tent")]["seconds_per_image"] == pytest.approx(0.005)


def test_markdown_tables() -> None:
    text = markdown(ROWS, ["source", "tent", "sar"])
    assert "| cifar10-resnet18-gn | tent | 28.0 (1/2 collapsed) | 2.0 | - | 0/0/- | 5.0 | - |" in text
    assert "**cifar10-resnet18-gn, mild** (accuracy %, per corruption)" in text
    assert "| source | 20.0 | 40.0 | 30.0 |" in text  # ImageNet-C order: snow, fog; then the mean


def test_curve_recorder_windows_and_last_tenth() -> None:
    recorder = CurveRecorder()
    for i in range(20):  # 20 batches of 10: right for the first 18, wrong for the last 2
        n_right = 0 if i >= 18 else 10
        correct = torch.tensor([True] * n_right + [False] * (10 - n_right))
        out = SimpleNamespace(batch=SimpleNamespace(items=[0] * 10, labels=None), correct=correct,
                              entropy=torch.full((10,), 0.5), reset=i == 3,
                              pred=torch.zeros(10, dtype=torch.long) if i >= 18 else torch.arange(10))
        recorder.on_batch(out)  # type: ignore[arg-type]
    windows = recorder.finish()
    assert [int(w["n"]) for w in windows] == [70, 70, 60]  # windows of at least 64 images
    assert sum(int(w["resets"]) for w in windows) == 1
    # The last tenth is 20 images, but at least a window (64) is used: the last 7 batches.
    assert recorder.last_tenth_accuracy() == pytest.approx(50 / 70)
    assert recorder.last_tenth()[1] == pytest.approx(25 / 70)  # class 0: once in 5 batches, all of 2


def test_collapse_test() -> None:
    assert is_collapsed(0.10, 0.2, 10) and not is_collapsed(0.11, 0.2, 10)
    assert is_collapsed(0.11, 0.95, 10)  # one class for everything: that class's share, just above chance
    assert not is_collapsed(0.95, 0.95, 10)  # a label-shift stream's last class, predicted right


def test_report_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with (tmp_path / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(ROWS)
    with (tmp_path / "curves.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        writer.writeheader()
        for row in ROWS:
            for w in range(3):
                writer.writerow({k: row[k] for k in ("model", "setting", "corruption", "method")}
                                | {"window": w, "images": 64 * (w + 1), "n": 64, "correct": 20 + w,
                                   "entropy_sum": 60.0, "resets": int(w == 1 and row["method"] == "sar")})
    write_report(tmp_path, num_classes=10)
    assert (tmp_path / "results.md").is_file() and (tmp_path / "accuracy.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "curves").iterdir()) == [
        "label-shift_fog.png", "mild_fog.png", "mild_snow.png", "mixed_all.png"]


def test_seeds_give_mean_and_standard_deviation_and_speed() -> None:
    rows = []
    for seed, (fog, snow) in enumerate([(0.40, 0.20), (0.50, 0.30)]):
        for corruption, acc in (("fog", fog), ("snow", snow)):
            row = _row("mild", corruption, "tent", acc) | {"seed": str(seed), "online_k": "2",
                                                           "online_accuracy": str(acc - 0.1)}
            rows.append(row)
    (cell,) = summarise(rows)
    # Per seed the mean over corruptions (0.30, 0.40); then their mean and sample std.
    assert cell["accuracy"] == pytest.approx(0.35) and cell["accuracy_std"] == pytest.approx(0.0707, abs=1e-4)
    assert cell["seeds"] == 2 and cell["online_k"] == 2
    assert cell["online_accuracy"] == pytest.approx(0.25)
    assert cell["images_per_second"] == pytest.approx(400 / 2.0)
    text = markdown(rows)
    assert "| tent | 35.0 ± 7.1 | 200 | 2 | 25.0 ± 7.1 | 0 | 0/4 |" in text
    assert "| cifar10-resnet18-gn | tent | 35.0 ± 7.1 |" in text
    # Without the new columns (results of an earlier version) the cells say "-".
    assert "| tent | 28.0 | 200 | - | - | 0 | 1/2 |" in markdown(ROWS)
