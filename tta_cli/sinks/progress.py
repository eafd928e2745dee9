"""The progress display (a live bar on a terminal, plain lines in a log) and the end-of-run summary table."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tta_cli.outputs import BatchOutputs, Totals


class ProgressDisplay:
    """images/s, ETA, running mean entropy, share used for updates, resets, SAR's entropy EMA, accuracy.

    On a terminal: a live rich progress bar. Elsewhere (a log file, nohup, CI, Slurm), where a live
    bar shows nothing until the end and is cut to 80 columns: a plain, complete line every
    ``interval`` seconds and one at the end.
    """

    def __init__(self, console: Console, total: int | None, method: Any, quiet: bool = False,
                 interval: float = 5.0, clock: Callable[[], float] = time.perf_counter,
                 monitor: Any = None) -> None:
        self.console = console
        self.monitor = monitor
        """A ``tta_cli.monitor.CollapseMonitor``: its events go on the progress line."""
        self.method = method
        self.total = total
        self.quiet = quiet
        self.plain = not console.is_terminal
        self.interval = interval
        self.clock = clock
        self.totals = Totals()
        self.start = clock()
        self._last_line = self.start
        self._line_done = 0  # images counted in the last plain line
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            disable=quiet or self.plain,
            transient=False,
        )
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

    def on_batch(self, out: BatchOutputs) -> None:
        self.totals.add(out)
        if self.plain:
            if not self.quiet and self.clock() - self._last_line >= self.interval:
                self._print_line()
            return
        self._progress.update(
            self._task,
            advance=len(out.batch.items) + len(out.batch.skipped),
            rate=f"{self._rate():.1f} img/s",
            stats="  ".join(self._stats()),
        )

    def _rate(self) -> float:
        return self.totals.images / max(self.clock() - self.start, 1e-9)

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

def _health_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The label-free verdict (``tta_cli.monitor.health_verdict``) and what auto chose."""
    rows = []
    choice = record["method"].get("choice")
    if choice:
        rows.append(("auto chose", f"{choice.get('method')}: {choice.get('why', '')}"))
    health = record.get("health")
    if health:
        rows.append(("health", f"{health['verdict']} ({'; '.join(health['reasons'])})"))
    return rows


def summary_table(record: dict[str, Any]) -> Table:
    title = "tta predict" if record.get("config", {}).get("predict_only") else "tta adapt"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    counts, timing = record["counts"], record["timing"]
    method = record["method"]
    lr = f", lr {method['lr']:.3g} ({method['lr_source']})" if method.get("lr") else ""
    rows = [
        ("model", f"{record['model']['spec']} ({record['model']['architecture']})"),
        ("method", f"{method['method']}{lr}"),
        ("device", record["device"]),
        ("images", str(counts["images"])),
        ("skipped", str(counts["skipped"])),
        ("used for updates", f"{counts['used_for_update']} ({100 * (counts['used_share'] or 0):.1f}%)"),
        ("resets", str(counts["resets"])),
        ("mean entropy", f"{counts['mean_entropy']:.4f}" if counts["mean_entropy"] is not None else "-"),
        ("accuracy", f"{100 * record['accuracy']:.2f}%" if record.get("accuracy") is not None else "no labels"),
        ("images/s", f"{timing['images_per_second']:.1f}"),
        *_health_rows(record),
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

