"""The benchmark report: summary tables (markdown) and plots (PNG, matplotlib is an optional extra).

Everything is computed from ``results.csv`` and ``curves.csv``, so a report can be rebuilt from the
files of earlier (or resumed, or combined) benchmark runs without running anything again.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from tta_cli.bench.corrupt import KNOWN
from tta_cli.bench.results import is_source
from tta_cli.bench.settings import SETTINGS

SHORT = {
    "gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "defocus_blur": "defoc",
    "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "frost",
    "fog": "fog", "brightness": "brit", "contrast": "contr", "elastic_transform": "elast",
    "pixelate": "pixel", "jpeg_compression": "jpeg",
}


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _ordered(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """Unique values, those in ``preferred`` first in its order, the rest as first seen."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def adaptation_collapses(rows: list[dict[str, str]]) -> set[tuple[str, str, str, str]]:
    """(model, setting, corruption, method) of the runs that collapsed because of the adaptation.

    ``collapsed`` in results.csv is the raw test (see ``results.is_collapsed``). On a label-shift
    stream the last tenth is one or two classes, which the source model itself may get all wrong;
    such a stream says nothing about the adaptation, so a run only counts when the source model's
    run on the same stream (if any) did not fail the test too.
    """
    source_failed = {(r["model"], r["setting"], r["corruption"], _seed(r)) for r in rows
                     if is_source(r["method"]) and r["collapsed"] == "True"}
    return {(r["model"], r["setting"], r["corruption"], r["method"]) for r in rows
            if r["collapsed"] == "True" and (r["model"], r["setting"], r["corruption"], _seed(r)) not in source_failed}


def _seed(row: dict[str, str]) -> str:
    """The stream seed of a row (results written before seeds existed used seed 0)."""
    return row.get("seed") or "0"


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean, and the sample standard deviation when there are at least two values."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _per_seed_means(runs: list[dict[str, str]], column: str) -> list[float] | None:
    """Per stream seed, ``column`` averaged over the setting's streams (None if any is empty)."""
    by_seed: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        if not r.get(column):
            return None
        by_seed[_seed(r)].append(float(r[column]))
    return [statistics.fmean(v) for v in by_seed.values()]


def summarise(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per model, setting and method: accuracy averaged over the setting's streams (corruptions),
    then mean and standard deviation over the stream seeds; resets summed, collapsed runs counted,
    adaptation seconds per image and images per second over all images; the online view's
    accuracy (mean over seeds) and its k (the largest of the runs)."""
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["setting"], row["method"])].append(row)
    collapses = adaptation_collapses(rows)
    summary = []
    for (model, setting, method), runs in groups.items():
        images = sum(int(r["images"]) for r in runs)
        seconds = sum(float(r["adapt_seconds"]) for r in runs)
        accuracy, accuracy_std = _mean_std(_per_seed_means(runs, "accuracy") or [0.0])
        online = _per_seed_means(runs, "online_accuracy")
        ks = [int(r["online_k"]) for r in runs if r.get("online_k")]
        summary.append({
            "model": model, "setting": setting, "method": method, "streams": len(runs), "images": images,
            "seeds": len({_seed(r) for r in runs}),
            "accuracy": accuracy, "accuracy_std": accuracy_std,
            "resets": sum(int(r["resets"]) for r in runs),
            "collapsed": sum((model, setting, r["corruption"], method) in collapses for r in runs),
            "seconds_per_image": seconds / max(images, 1),
            "images_per_second": images / seconds if seconds > 0 else None,
            "online_accuracy": _mean_std(online)[0] if online else None,
            "online_accuracy_std": _mean_std(online)[1] if online else None,
            "online_k": max(ks) if ks else None,
        })
    return summary


Rows = list[dict[str, str]]


def _axes(rows: Rows, methods: Sequence[str] | None) -> tuple[list[str], list[str], list[str]]:
    models = _ordered([r["model"] for r in rows], [])
    settings = _ordered([r["setting"] for r in rows], list(SETTINGS))
    return models, settings, _ordered([r["method"] for r in rows], methods or [])


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def summary_tables(rows: list[dict[str, str]], methods: Sequence[str] | None = None) -> str:
    """Per model and method: accuracy per setting (%, with collapsed runs), resets per setting
    (slash-separated, in the column order) and adaptation ms per image (batched and batch size 1)."""
    models, settings, method_order = _axes(rows, methods)
    by_key = {(s["model"], s["setting"], s["method"]): s for s in summarise(rows)}
    header = ["model", "method", *settings, f"resets ({'/'.join(settings)})", "ms/img (B=64)", "ms/img (B=1)"]
    body = []
    for model in models:
        for method in method_order:
            cells = [by_key.get((model, s, method)) for s in settings]
            if not any(cells):
                continue
            resets = "/".join(str(c["resets"]) if c else "-" for c in cells)
            body.append([_model_name(model), method, *[_acc_cell(c) for c in cells], resets,
                         _ms(cells, settings, batched=True), _ms(cells, settings, batched=False)])
    return "\n".join(_table(header, body))


def _ms(cells: list[dict[str, Any] | None], settings: list[str], batched: bool) -> str:
    """Adaptation time per image over the batched settings (or the batch-size-1 one)."""
    chosen = [c for c, s in zip(cells, settings, strict=True) if c and (s != "bs1") == batched]
    images = sum(c["images"] for c in chosen)
    if not images:
        return "-"
    return f"{1000 * sum(c['seconds_per_image'] * c['images'] for c in chosen) / images:.1f}"


def _acc_cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    mark = f" ({cell['collapsed']}/{cell['streams']} collapsed)" if cell["collapsed"] else ""
    return f"{_percent(cell['accuracy'], cell['accuracy_std'])}{mark}"


def _percent(value: float, std: float | None) -> str:
    """``44.8`` or, over several seeds, ``44.8 ± 0.3`` (mean ± standard deviation, in %)."""
    return f"{100 * value:.1f}" if std is None else f"{100 * value:.1f} ± {100 * std:.1f}"


def speed_tables(rows: list[dict[str, str]], methods: Sequence[str] | None = None) -> str:
    """Per model and setting: accuracy, images per second, and the online view (k and accuracy)."""
    models, settings, method_order = _axes(rows, methods)
    by_key = {(s["model"], s["setting"], s["method"]): s for s in summarise(rows)}
    parts = []
    header = ["method", "accuracy", "img/s", "online k", "online accuracy", "resets", "collapsed"]
    for model in models:
        for setting in settings:
            cells = [(m, by_key[(model, setting, m)]) for m in method_order if (model, setting, m) in by_key]
            if not cells:
                continue
            body = [[m, _percent(c["accuracy"], c["accuracy_std"]),
                     f"{c['images_per_second']:.0f}" if c["images_per_second"] else "-",
                     str(c["online_k"]) if c["online_k"] else "-",
                     _percent(c["online_accuracy"], c["online_accuracy_std"]) if c["online_accuracy"] is not None
                     else "-",
                     str(c["resets"]), f"{c['collapsed']}/{c['streams']}"] for m, c in cells]
            seeds = max(c["seeds"] for _, c in cells)
            note = f", mean ± std over {seeds} stream seeds" if seeds > 1 else ""
            parts.append(f"**{_model_name(model)}, {setting}** (accuracy %{note})\n")
            parts.append("\n".join(_table(header, body)))
            parts.append("")
    return "\n".join(parts)


def _model_name(spec: str) -> str:
    """``local-dir:/a/b/cifar10-resnet18-gn`` reads as ``cifar10-resnet18-gn`` in tables."""
    return spec.removeprefix("local-dir:").rstrip("/").rsplit("/", 1)[-1]


def corruption_tables(rows: list[dict[str, str]], methods: Sequence[str] | None = None) -> str:
    """Per model and per-corruption setting: accuracy (%) per corruption, and the mean."""
    models, settings, method_order = _axes(rows, methods)
    parts = []
    for model in models:
        for setting in settings:
            runs = [r for r in rows if r["model"] == model and r["setting"] == setting]
            corruptions = _ordered([r["corruption"] for r in runs], list(KNOWN))
            if len(corruptions) < 2:
                continue
            per_seed: dict[tuple[str, str], list[float]] = defaultdict(list)
            for r in runs:
                per_seed[(r["method"], r["corruption"])].append(float(r["accuracy"]))
            acc = {key: statistics.fmean(values) for key, values in per_seed.items()}
            body = []
            for method in method_order:
                values = [acc.get((method, c)) for c in corruptions]
                if all(v is None for v in values):
                    continue
                present = [v for v in values if v is not None]
                cells = ["-" if v is None else f"{100 * v:.1f}" for v in values]
                body.append([method, *cells, f"{100 * sum(present) / len(present):.1f}"])
            parts.append(f"**{_model_name(model)}, {setting}** (accuracy %, per corruption)\n")
            parts.append("\n".join(_table(["method", *[SHORT.get(c, c) for c in corruptions], "mean"], body)))
            parts.append("")
    return "\n".join(parts)


def markdown(rows: list[dict[str, str]], methods: Sequence[str] | None = None) -> str:
    text = ["# Benchmark results", "",
            "Accuracy averaged over a setting's streams (corruptions). A run collapsed when, on the last "
            "tenth of its stream (at least 64 images), its accuracy is at or below chance, or it gives one "
            "class to 90% of the images and is wrong on most, while the source model's run on the same "
            "stream does not. Resets: model recoveries (SAR), summed. "
            "ms/img: adaptation time per image (forward, backward and update; decoding excluded). "
            "With several stream seeds: mean ± standard deviation over the seeds of the setting's mean.", "",
            summary_tables(rows, methods), "",
            "## Speed and the online view", "",
            "img/s: images per adaptation second. Online (Alfarra et al., ICML 2024): a method k times "
            "slower than source on the same stream (k = ceil of the speed ratio, measured) adapts on "
            "every k-th batch only and predicts the others with its current model; re-run on the "
            "identical stream.", "",
            speed_tables(rows, methods), "", corruption_tables(rows, methods)]
    return "\n".join(text).rstrip() + "\n"


# --- plots -----------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (benchmarks run headless)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(rows: list[dict[str, str]], path: Path, num_classes: int) -> None:
    """Grouped bars: accuracy per setting (x) and method (bars), one panel per model."""
    plt = _pyplot()
    models, settings, methods = _axes(rows, None)
    by_key = {(s["model"], s["setting"], s["method"]): s for s in summarise(rows)}
    fig, axes = plt.subplots(len(models), 1, figsize=(max(6, 1.6 * len(settings) * max(1, len(methods)) / 3),
                                                       3.6 * len(models)), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, model in zip(axes[:, 0], models, strict=True):
        for i, method in enumerate(methods):
            values = [100 * by_key[(model, s, method)]["accuracy"] if (model, s, method) in by_key else 0.0
                      for s in settings]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(settings))]
            ax.bar(xs, values, width, label=method)
        ax.axhline(100 / num_classes, color="grey", linestyle="--", linewidth=0.8, label="chance")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(_model_name(model))
        # Beside the axes, so that it never hides a bar.
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stream(curves: list[dict[str, str]], path: Path, title: str, num_classes: int) -> None:
    """Accuracy and mean entropy per window along the stream, one line per method; resets marked."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    methods = _ordered([c["method"] for c in curves], [])
    for method in methods:
        points = [c for c in curves if c["method"] == method]
        xs = [int(p["images"]) for p in points]
        acc = [100 * int(p["correct"]) / max(int(p["n"]), 1) for p in points]
        ent = [float(p["entropy_sum"]) / max(int(p["n"]), 1) for p in points]
        (line,) = top.plot(xs, acc, label=method, linewidth=1)
        bottom.plot(xs, ent, color=line.get_color(), linewidth=1)
        resets = [x for x, p in zip(xs, points, strict=True) if int(p["resets"])]
        for x in resets:  # a reset is a model recovery: the method restarts from the source here
            top.axvline(x, color=line.get_color(), linestyle=":", linewidth=0.8)
        if resets:
            top.plot(resets, [100] * len(resets), "v", color=line.get_color(), markersize=5)
    top.axhline(100 / num_classes, color="grey", linestyle="--", linewidth=0.8)
    top.set_ylabel("accuracy per window (%)")
    top.set_ylim(0, 102)
    top.set_title(title)
    top.legend(fontsize="small", ncol=min(5, len(methods)))
    bottom.set_ylabel("mean entropy")
    bottom.set_xlabel("images seen")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(out: Path, rows: Rows, curves: Rows, num_classes: int) -> list[Path]:
    written = [out / "accuracy.png"]
    plot_accuracy(rows, written[0], num_classes)
    streams: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    first_seed = min((_seed(c) for c in curves), key=int, default="0")
    for c in curves:  # the curves of one stream order (the first seed): several would overlap
        if _seed(c) == first_seed:
            streams[(c["model"], c["setting"], c["corruption"])].append(c)
    folder = out / "curves"
    folder.mkdir(exist_ok=True)
    several = len({k[0] for k in streams}) > 1
    for (model, setting, corruption), points in streams.items():
        stem = f"{_model_name(model)}_" if several else ""
        path = folder / f"{stem}{setting}_{corruption}.png"
        plot_stream(points, path, f"{_model_name(model)}: {setting}, {corruption}", num_classes)
        written.append(path)
    return written


def write_report(out: Path, num_classes: int, plots: bool = True, console: Console | None = None,
                 methods: Sequence[str] | None = None) -> None:
    """results.md (and, with matplotlib, accuracy.png and curves/*.png) from OUT's csv files."""
    rows = read_csv(out / "results.csv")
    if not rows:
        return
    (out / "results.md").write_text(markdown(rows, methods))
    if not plots:
        return
    try:
        write_plots(out, rows, read_csv(out / "curves.csv"), num_classes)
    except ImportError:
        if console is not None:
            console.print('[yellow]no plots: matplotlib is not installed (pip install "tta-cli[bench]")'
                          "[/yellow]")
