"""The run report: files written, charts, changed images, configuration; rendered by a browser."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tta_cli.errors import TTAError
from tta_cli.sinks.charts import Series, bar_chart, line_chart, nice_ticks
from tta_cli.sinks.report import (
    COLLAPSE_SHARE,
    image_path,
    short_name,
    stream_series,
    write_report,
)

from .conftest import ROOT, make_images

COLUMNS = ["index", "path", "frame", "timestamp", "pred", "pred_name", "pred_id", "confidence", "entropy",
           "top5", "used_for_update", "label", "correct"]


def make_run(tmp_path: Path, n: int = 40, source: bool = True, labels: bool = True) -> Path:
    """A run folder as `tta adapt` writes it: images in an input folder, predictions.csv, run.json."""
    inputs = tmp_path / "images"
    paths = make_images(inputs, n)
    run = tmp_path / "run"
    run.mkdir()
    columns = COLUMNS + (["source_pred"] if source else [])
    with (run / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, path in enumerate(paths):
            label = i % 3
            pred = label if i >= 10 else 2  # the first window collapses onto class 2
            row = [i, path.name, "", "", pred, f"class <{pred}>", f"id{pred}", 0.9, 1.0 - i / n, str(pred),
                   int(i % 2 == 0), label if labels else "", int(pred == label) if labels else ""]
            writer.writerow(row + ([2 if i % 4 else pred] if source else []))
    record = {"status": "completed", "config": {"inputs": [str(inputs)], "batch_size": 10, "method": "sar"},
              "model": {"spec": "local-dir:m"}, "method": {"method": "sar", "lr": 0.001},
              "resets_at_batch": [2]}
    (run / "run.json").write_text(json.dumps(record))
    return run


def test_report_files_and_contents(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    report = write_report(run)
    assert report.html == run / "report" / "report.html"
    assert sorted(p.name for p in report.pngs) == ["accuracy.png", "classes.png", "entropy.png",
                                                  "top_class.png", "used.png"]
    for png in report.pngs:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width == 960
    page = report.html.read_text()
    assert page.count('src="data:image/png;base64,') == 5  # every chart embedded, nothing linked
    assert not re.search(r'src="(?!data:)', page)
    changed = 40 - 10 - sum(1 for i in range(10, 40) if i % 4 == 0 or i % 3 == 2)
    assert f"<tr><th>predictions changed by adaptation</th><td>{changed} of 40</td></tr>" in page
    assert page.count("<figure>") == changed and page.count('src="data:image/jpeg;base64,') == changed
    assert "class &lt;0&gt;" in page  # class names are escaped
    assert "the model as it was -&gt; adapted" in page and "the method's 1 resets" in page
    assert "&quot;batch_size&quot;: 10" in page  # the configuration from run.json


def test_auto_falling_back_towards_the_source_is_reported(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    record = json.loads((run / "run.json").read_text())
    record["counts"] = {"batches": 4}
    record["method_state"] = {"fallback_batches": [{"batch": 1, "left_out": ["batch_statistics"],
                                                    "reason": "flips beyond the source's errors"}]}
    (run / "run.json").write_text(json.dumps(record))
    page = write_report(run).html.read_text()
    assert ("<tr><th>batches falling back towards the source</th><td>1 of 4 (first: batch 1, batch_statistics "
            "left out: flips beyond the source&#x27;s errors)</td></tr>") in page


def test_auto_giving_batches_to_lame_is_reported(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    record = json.loads((run / "run.json").read_text())
    record["counts"] = {"batches": 10}
    record["method_state"] = {"lame_batches": [[3, 5], [7, 8]], "lame_share": 0.3}
    (run / "run.json").write_text(json.dumps(record))
    page = write_report(run).html.read_text()
    assert ("<tr><th>batches predicted by LAME (few classes per batch)</th><td>3 of 10 (first: batch 3)</td></tr>"
            in page)


def test_auto_restarting_where_the_input_changed_is_reported(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    record = json.loads((run / "run.json").read_text())
    record["method_state"] = {"domain_changes": [4, 9]}
    (run / "run.json").write_text(json.dumps(record))
    page = write_report(run).html.read_text()
    assert ("<tr><th>restarts from the source model where the input changed</th><td>2, at batches 4 and 9</td></tr>"
            in page)


def test_collapse_windows_are_counted() -> None:
    rows = [{"pred": "1", "entropy": "0.1", "used_for_update": "1", "correct": ""} for _ in range(10)]
    rows += [{"pred": str(i % 5), "entropy": "0.5", "used_for_update": "0", "correct": ""} for i in range(10)]
    series = stream_series(rows, 10)
    assert series["top_class"].ys == [1.0, 0.2] and series["top_class"].ys[0] >= COLLAPSE_SHARE
    assert series["entropy"].ys == pytest.approx([0.1, 0.5]) and series["used"].ys == [1.0, 0.0]
    assert series["accuracy"].xs == []


def test_without_source_predictions_or_labels_it_says_so(tmp_path: Path) -> None:
    run = make_run(tmp_path, source=False, labels=False)
    report = write_report(run, tmp_path / "elsewhere")
    assert report.html.parent == tmp_path / "elsewhere"
    assert "accuracy.png" not in [p.name for p in report.pngs]
    page = report.html.read_text()
    assert "no source-model predictions" in page and "<figure>" not in page
    assert "did not record the source model" in page


def test_image_paths_from_the_recorded_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (first,) = make_images(folder / "sub", 1)
    run = {"config": {"inputs": [str(folder)]}}
    assert image_path("sub/img0.png", run, tmp_path / "run") == folder / "sub" / "img0.png"
    assert image_path(str(first), {"config": {"inputs": []}}, tmp_path) == first
    assert image_path("img0.png", {"config": {"inputs": [str(first)]}}, tmp_path) == first
    assert image_path("missing.png", run, tmp_path) is None


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(TTAError, match=r"no predictions\.csv"):
        write_report(tmp_path)


def test_report_command(tmp_path: Path) -> None:
    from tta_cli.cli.app import app

    run = make_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip()) == tmp_path / "r" / "report.html"


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def test_a_headless_browser_renders_the_page(tmp_path: Path) -> None:
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium / google-chrome installed")
    report = write_report(make_run(tmp_path))
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1000,3000", report.html.as_uri()], check=True, timeout=120,
                   capture_output=True)
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50  # charts and thumbnails drawn, not a blank page


@pytest.mark.slow
def test_report_of_a_real_run_on_the_sample(tmp_path: Path) -> None:
    from tta_cli.cli.app import app

    sample = ROOT / "sample_data"
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "adapt", str(sample / "stream"), "--labels", str(sample / "stream" / "labels.csv"),
        "--model", f"local-dir:{sample / 'model'}", "--out", str(out), "--quiet", "--workers", "0"])
    assert result.exit_code == 0, result.output
    with (out / "predictions.csv").open() as f:
        first = next(csv.DictReader(f))
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert first["pred_id"] == first["pred_name"] == cifar[int(first["pred"])]  # no descriptions: id = name
    report = write_report(out)
    page = report.html.read_text()
    assert "accuracy.png" in [p.name for p in report.pngs]  # the sample is labelled
    assert page.count('src="data:image/png;base64,') == len(report.pngs) == 5


def test_the_verdict_and_the_accuracy_before_and_after_head_the_page(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    record = json.loads((run / "run.json").read_text())
    record["health"] = {"verdict": "suspect", "reasons": ["prediction diversity 1.2 classes against 3.0"],
                        "estimated_change": 0.031}
    (run / "run.json").write_text(json.dumps(record))
    page = write_report(run).html.read_text()
    head = page[:page.index("<h2>")]
    assert "Verdict: <b>suspect</b>, adaptation may have hurt" in head
    assert "prediction diversity 1.2 classes" in head and "estimated change: 0.031" in head
    preds = [i % 3 if i >= 10 else 2 for i in range(40)]  # as make_run writes them
    sources = [2 if i % 4 else preds[i] for i in range(40)]
    before = sum(sources[i] == i % 3 for i in range(40)) / 40
    after = sum(preds[i] == i % 3 for i in range(40)) / 40
    assert f"{100 * before:.1f}% -&gt; {100 * after:.1f}% ({100 * (after - before):+.1f})" in head


def test_images_are_labelled_by_class_name_from_the_model_config(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "model").mkdir()
    names = ["zero, nil", "one", "two"]
    (run / "model" / "config.json").write_text(json.dumps({"architecture": "x", "label_descriptions": names}))
    page = write_report(run).html.read_text()
    assert not re.search(r"label: \d+<", page)  # label 0 and 1 are never predicted but are named
    assert "label: zero, nil" in page and "label: one" in page


def test_count_ticks_are_whole_numbers_and_value_ticks_nice() -> None:
    assert nice_ticks(0, 5, whole=True) == [0, 2, 4, 6]
    assert nice_ticks(0, 4, whole=True) == [0, 1, 2, 3, 4]
    assert nice_ticks(0, 91, whole=True) == [0, 25, 50, 75, 100]
    assert nice_ticks(0, 2, whole=True) == [0, 1, 2]
    assert nice_ticks(0.0, 0.99) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    for hi in (1, 2, 3, 7, 13, 91, 1234):
        assert all(float(t).is_integer() for t in nice_ticks(0, hi, whole=True))


def _lowest_ink(image: Image.Image, x0: int, x1: int) -> int:
    pixels = image.convert("L").load()
    return max((y for y in range(image.height) for x in range(x0, x1) if pixels[x, y] < 128), default=-1)


def test_long_class_names_fit_under_the_bars() -> None:
    assert short_name("tench, Tinca tinca") == "tench"
    assert len(short_name("a" * 40)) == 22
    chart = bar_chart("t", [short_name("European fire salamander, Salamandra salamandra"), "b"],
                      [("adapted", [3, 1], "#1f77b4")])
    slot = (chart.width - 70 - 20) // 2
    assert _lowest_ink(chart, 70 + slot // 2 - 8, 70 + slot // 2 + 8) < chart.height - 20  # clear of the x title


def test_charts_have_axis_titles() -> None:

    plain = line_chart("t", [Series("s", [1, 2], [0.5, 0.7])])
    titled = line_chart("t", [Series("s", [1, 2], [0.5, 0.7])], y_title="entropy (nats)")
    assert _lowest_ink(plain, 0, 20) == -1 and _lowest_ink(titled, 0, 20) > 0
