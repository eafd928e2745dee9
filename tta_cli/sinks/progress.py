"""The progress display (a live bar on a terminal, plain lines in a log) and the end-of-run summary:
a table, then one sentence with the accuracy before and after adaptation (or the share of
predictions it changed, without labels) and the label-free verdict.

Entropy is shown in nats (natural log) everywhere on the terminal, as in ``predictions.csv``; the
summary adds it as a share of the maximum (ln of the number of classes), the unit of
``run.json["health"]``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tta_cli.outputs import BatchOutputs, Totals
from tta_cli.reference import REFERENCE_ALL_FIRST, REFERENCE_EVERY
from tta_cli.sinks.report import VERDICTS, batch_list

if TYPE_CHECKING:
    import torch

    from tta_cli.models import LoadedModel
    from tta_cli.reference import SourceReference

WIDE_TERMINAL = 110
"""Columns from which the progress line has room for a bar beside its statistics."""
LEGEND = {
    "H": "H: mean prediction entropy so far, in nats (0: certain; lower is more confident)",
    "EMA": "EMA: SAR's moving average of the entropy after its update, in nats (below 0.2 it resets the model)",
}


class ProgressDisplay:
    """images/s, ETA, running mean entropy, share used for updates, resets, SAR's entropy EMA, accuracy.

    On a terminal: a live rich progress bar. Elsewhere (a log file, nohup, CI, Slurm), where a live
    bar shows nothing until the end and is cut to 80 columns: a plain, complete line every
    ``interval`` seconds and one at the end.
    """

    def __init__(self, console: Console, total: int | None, method: Any, quiet: bool = False,
                 interval: float = 5.0, clock: Callable[[], float] = time.perf_counter,
                 monitor: Any = None, totals: Totals | None = None) -> None:
        """``totals``: the run's counts, already updated when a batch arrives (a resumed run's include
        the images before the resume); without them the display counts for itself."""
        self.console = console
        self.monitor = monitor
        """A ``tta_cli.monitor.CollapseMonitor``: its events go on the progress line."""
        self.method = method
        self.total = total
        self.quiet = quiet
        self.plain = not console.is_terminal
        self.interval = interval
        self.clock = clock
        self.counted = totals is not None
        self.totals = totals if totals is not None else Totals()
        self._first_images = self.totals.images
        self.start = clock()
        self._last_line = self.start
        self._line_done = 0  # images counted in the last plain line
        self._progress = Progress(*self._columns(console.width), console=console,
                                  disable=quiet or self.plain, transient=False)
        self._legend_shown = False
        self._task = self._progress.add_task(method.name, total=total, rate="", stats="")
        self._ema: float | None = None
        self._ema_read_at = -1.0

    def __enter__(self) -> ProgressDisplay:
        self.start = self._last_line = self.clock()
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
        done = self.totals.images + self.totals.skipped
        if self.plain and not self.quiet and done and done != self._line_done:
            self._print_line()

    @staticmethod
    def _columns(width: int) -> list[Any]:
        """Count, time left and rate first, so that a narrow terminal cuts only the statistics;
        a bar only where it leaves room for them."""
        columns: list[Any] = [TextColumn("[bold]{task.description}"), MofNCompleteColumn(),
                              TimeRemainingColumn(compact=True), TextColumn("{task.fields[rate]}"),
                              TextColumn("{task.fields[stats]}")]
        if width >= WIDE_TERMINAL:
            columns.insert(1, BarColumn(bar_width=max(10, min(40, width - WIDE_TERMINAL + 10))))
        return columns

    def on_batch(self, out: BatchOutputs) -> None:
        if not self.counted:
            self.totals.add(out)
        if not self.quiet and not self._legend_shown and len(out.batch.items):
            self._show_legend()
        if self.plain:
            if not self.quiet and self.clock() - self._last_line >= self.interval:
                self._print_line()
            return
        self._progress.update(
            self._task,
            completed=self.totals.images + self.totals.skipped,
            rate=f"{self._rate():.1f} img/s",
            stats="  ".join(self._stats()),
        )

    def _show_legend(self) -> None:
        """What the abbreviations of the progress line mean, once, before its first update."""
        self._legend_shown = True
        parts = [LEGEND["H"]]
        if self.method.updates_parameters and self._method_ema() is not None:
            parts.append(LEGEND["EMA"])
        self.console.print("; ".join(parts), soft_wrap=self.plain, markup=False, highlight=False,
                           style="dim")

    def _rate(self) -> float:
        return (self.totals.images - self._first_images) / max(self.clock() - self.start, 1e-9)

    def _stats(self) -> list[str]:
        t = self.totals
        parts = [f"H {t.mean_entropy:.3f}"] if t.mean_entropy is not None else []
        if self.method.updates_parameters:
            parts.append(f"used {100 * (t.used_share or 0):.0f}%")
            parts.append(f"resets {t.resets}")
            ema = self._method_ema()
            if ema is not None:
                parts.append(f"EMA {ema:.3f}")
        collapse = self.monitor.progress_text() if self.monitor is not None else None
        if collapse:
            parts.append(collapse)
        if t.accuracy is not None:
            parts.append(f"acc {100 * t.accuracy:.1f}%")
        if t.skipped:
            parts.append(f"skipped {t.skipped}")
        return parts

    def line(self) -> str:
        """The plain progress line: everything the bar shows, in one unwrapped line."""
        t = self.totals
        done = t.images + t.skipped
        count = f"{done}/{self.total}" if self.total else str(done)
        rate = self._rate()
        head = [f"{self.method.name}: {count} images", f"{rate:.1f} img/s",
                f"{self.clock() - self.start:.0f}s"]
        if self.total and rate > 0 and done < self.total:
            head.append(f"ETA {(self.total - done) / rate:.0f}s")
        return ", ".join(head + self._stats())

    def _print_line(self) -> None:
        self._last_line = self.clock()
        self._line_done = self.totals.images + self.totals.skipped
        self.console.print(self.line(), soft_wrap=True, markup=False, highlight=False, emoji=False)

    def _method_ema(self) -> float | None:
        """SAR's entropy EMA, read at most twice a second: on a GPU reading it waits for the
        device, which the per-batch loop otherwise never does."""
        now = self.clock()
        if now - self._ema_read_at >= 0.5:
            self._ema = self.method.stats().get("ema")
            self._ema_read_at = now
        return self._ema

def source_accuracy(record: dict[str, Any]) -> tuple[int, int] | None:
    """(correct, labelled) of the frozen source model's predictions over the run: from the record
    where the monitor kept them, else from the ``source_pred`` and ``label`` columns of the
    predictions file (the whole run, a resumed one too). None without labels or source predictions."""
    health = record.get("health") or {}
    if "source_correct" in health and "labelled" in health:
        return int(health["source_correct"]), int(health["labelled"])
    if not record.get("counts", {}).get("labelled") or "changed_share" not in health:
        return None
    out = Path(str(record.get("out", "")))
    correct = labelled = 0
    for row in _prediction_rows(out, (record.get("config") or {}).get("format", "csv")):
        label, source = row.get("label"), row.get("source_pred")
        if label in (None, "") or source in (None, ""):
            continue
        labelled += 1
        correct += str(label) == str(source)
    return (correct, labelled) if labelled else None


def _prediction_rows(out: Path, fmt: str) -> Any:
    path = out / f"predictions.{fmt}"
    if not path.is_file():
        return
    with path.open(newline="", encoding="utf-8") as f:
        if fmt == "jsonl":
            for line in f:
                yield json.loads(line)
        else:
            yield from csv.DictReader(f)


def accuracy_text(record: dict[str, Any], source: tuple[int, int] | None) -> str:
    """``48.8% -> 67.8% (+19.1)``: the source model's accuracy, the adapted run's and the change in
    points; the run's alone where the source's is unknown."""
    accuracy = record.get("accuracy")
    if accuracy is None:
        return "no labels"
    if source is None or record.get("config", {}).get("predict_only"):
        return f"{100 * accuracy:.1f}%"
    before = source[0] / source[1]
    text = f"{100 * before:.1f}% -> {100 * accuracy:.1f}% ({100 * (accuracy - before):+.1f})"
    labelled = record.get("counts", {}).get("labelled") or 0
    if source[1] < labelled:  # a sampled reference: the source's accuracy is over its sample
        text += f" (source model on {source[1]} of the {labelled} labelled images)"
    return text


def summary_sentence(record: dict[str, Any], source: tuple[int, int] | None) -> str:
    """The summary's last line, for a newcomer: accuracy before and after, and the verdict."""
    counts = record["counts"]
    accuracy = record.get("accuracy")
    if record.get("config", {}).get("predict_only"):
        scored = f", accuracy {100 * accuracy:.1f}%" if accuracy is not None else ""
        return f"Predicted {counts['images']} images with the model as it is, without adapting{scored}."
    health = record.get("health") or {}
    if accuracy is not None and source is not None:
        before = source[0] / source[1]
        moved = "raised" if accuracy > before else "lowered" if accuracy < before else "kept"
        sample = f", on {source[1]} of the {counts['labelled']} images" if source[1] < counts["labelled"] else ""
        head = (f"Adaptation {moved} accuracy from {100 * before:.1f}% (the model as it was{sample}) to "
                f"{100 * accuracy:.1f}% ({100 * (accuracy - before):+.1f} points)")
    elif accuracy is not None:
        head = f"Accuracy with adaptation {100 * accuracy:.1f}% (the source model's is unknown: no source reference)"
    elif "estimated_accuracy_change" in health:
        head = (f"Adaptation changed {100 * health['changed_share']:.1f}% of the predictions, an estimated "
                f"{health['estimated_accuracy_change']['points']:+.1f} points of accuracy (no labels)")
    elif "changed_share" in health:
        head = (f"Adaptation changed {100 * health['changed_share']:.1f}% of the predictions "
                "(no labels: accuracy unknown)")
    else:
        head = "No labels and no source reference: neither accuracy nor the change is known"
    verdict = health.get("verdict")
    if verdict is None:
        return head + "."
    return f"{head}; verdict {verdict}: {VERDICTS.get(verdict, '')}."


def _entropy_text(record: dict[str, Any]) -> str:
    nats = record["counts"]["mean_entropy"]
    if nats is None:
        return "-"
    classes = record.get("model", {}).get("num_classes")
    if isinstance(classes, int) and classes > 1:
        return f"{nats:.3f} nats ({nats / math.log(classes):.2f} of the maximum, ln {classes})"
    return f"{nats:.3f} nats"


def _health_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    """What auto chose, then the label-free verdict (``tta_cli.monitor.health_verdict``), last; a
    prediction run has neither (it does not adapt)."""
    if record.get("config", {}).get("predict_only"):
        return [("adaptation", "none: predicts with the model as it is")]
    rows = []
    choice = record["method"].get("choice")
    if choice:
        rows.append(("auto chose", f"{choice.get('method')}: {choice.get('why', '')}"))
    lame = (record.get("method_state") or {}).get("lame_batches")
    if lame:
        rows.append(("LAME predicted", f"{sum(last - first for first, last in lame)} of "
                                       f"{record['counts'].get('batches', '?')} batches (few classes per batch)"))
    restarts = (record.get("method_state") or {}).get("domain_changes")
    if restarts:
        rows.append(("restarted", f"{_inner_name(record)} from the source model where the input changed: "
                                  f"{batch_list(restarts)}"))
    health = record.get("health") or {}
    estimate = health.get("estimated_accuracy_change")
    if estimate:
        rows.append(("estimated change", f"{estimate['points']:+.1f} points ({estimate['low']:+.1f} to "
                                         f"{estimate['high']:+.1f}), without labels"))
    verdict = f"{health['verdict']} ({'; '.join(health['reasons'])})" if health else "-"
    rows.append(("verdict", verdict))
    if health.get("advice"):
        rows.append(("what to do", health["advice"]))
    return rows


def _inner_name(record: dict[str, Any]) -> str:
    """The method auto chose to run (its recorded ``choice``), else "the inner method"."""
    choice = record.get("method", {}).get("choice") or {}
    return str(choice.get("method") or "the inner method")


def summary_table(record: dict[str, Any]) -> Table:
    """The end-of-run table, its last line (the caption) one sentence with the outcome."""
    title = "tta predict" if record.get("config", {}).get("predict_only") else "tta adapt"
    source = source_accuracy(record)
    table = Table(title=title, show_header=False, title_justify="left", caption_justify="left",
                  caption=summary_sentence(record, source), caption_style="bold")
    table.add_column(style="bold")
    table.add_column()
    counts, timing = record["counts"], record["timing"]
    method = record["method"]
    lr = f", lr {method['lr']:.3g} ({method['lr_source']})" if method.get("lr") else ""
    skipped = f" ({counts['skipped']} skipped)" if counts["skipped"] else ""
    rows = [
        ("model", f"{record['model']['spec']} ({record['model']['architecture']})"),
        ("method", f"{method['method']}{lr}"),
        *_health_rows(record)[:-1],
        ("device", record["device"]),
        ("images", f"{counts['images']}{skipped}"),
    ]
    if counts["used_for_update"] or counts["resets"] or counts.get("after_each_filter"):
        rows.append(("used for updates", f"{counts['used_for_update']} ({100 * (counts['used_share'] or 0):.1f}%),"
                                         f" resets {counts['resets']}"))
    rows.append(("mean entropy", _entropy_text(record)))
    changed = (record.get("health") or {}).get("changed_share")
    if record.get("accuracy") is None and changed is not None:
        rows.append(("changed", f"{100 * changed:.1f}% of the predictions differ from the source model's"))
    else:
        rows.append(("accuracy", accuracy_text(record, source)))
    rows += [
        *_health_rows(record)[-1:],
        ("images/s", f"{timing['images_per_second']:.1f}"),
        ("outputs", record["out"]),
    ]
    rows += _export_rows(record)
    for key, value in rows:
        table.add_row(key, value)
    return table


def _export_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The exported model's agreement with the run's late predictions, and the sorted export."""
    rows = []
    exported = record.get("model_export")
    if exported:
        check = exported["agreement"]
        agree = (f"agrees with predictions on {check['agree']}/{check['images']} of the last images"
                 if check["images"] else "no images to check")
        rows.append(("exported model", f"BN statistics: {exported['bn_statistics']}; {agree}"))
    folder = record.get("export_folder")
    if folder:
        rows.append(("export folder", f"{folder['files']} files ({folder['uncertain']} uncertain, "
                                      f"{len(folder['failed'])} failed) in {folder['directory']}"))
    return rows


def print_plan(console: Console, loaded: LoadedModel, method: Any, stream: str, device: torch.device,
               reference: SourceReference | None) -> None:
    """What the run is about to do: model, preprocessing, method, stream, device, source reference."""
    info = method.describe()
    console.print(f"[bold]model[/bold] {loaded.spec} -> {loaded.architecture}"
                  f"{'.' + loaded.tag if loaded.tag else ''} ({loaded.source}), {loaded.num_classes} classes")
    dc = loaded.data_config
    console.print(f"[bold]preprocessing[/bold] input {tuple(dc['input_size'])}, {dc['interpolation']}, "
                  f"crop_pct {dc['crop_pct']}, mean {tuple(round(m, 4) for m in dc['mean'])}, "
                  f"std {tuple(round(s, 4) for s in dc['std'])}")
    line = f"[bold]method[/bold] {info['method']}"
    if info["lr"] is not None:
        line += f", lr {info['lr']:.4g} ({info['lr_source']}), {info['adapted_parameters']} parameter tensors"
    if info["bn_stats"]:
        line += f", BatchNorm statistics: {info['bn_stats']}"
    console.print(line)
    if info.get("choice"):
        console.print(f"[bold]auto chose[/bold] {info['choice']['method']}: {info['choice']['why']}", markup=True)
    console.print(f"[bold]stream[/bold] {stream} on {device}")
    if reference is not None and not reference.complete:
        console.print(f"[bold]source reference[/bold] the first {REFERENCE_ALL_FIRST} images, then 1 batch in "
                      f"{REFERENCE_EVERY} (--source-reference all: every image)")
