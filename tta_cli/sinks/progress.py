"""The live progress bar and the end-of-run summary table (rich)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tta_cli.outputs import BatchOutputs, Totals


class ProgressDisplay:
    """images/s, ETA, running mean entropy, share used for updates, resets, SAR's entropy EMA, accuracy."""

    def __init__(self, console: Console, total: int, method: Any, quiet: bool = False) -> None:
        self.console = console
        self.method = method
        self.totals = Totals()
        self.start = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            disable=quiet,
            transient=False,
        )
        self._task = self._progress.add_task(method.name, total=total, rate="", stats="")
        self._ema: float | None = None
        self._ema_read_at = -1.0

    def __enter__(self) -> ProgressDisplay:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def on_batch(self, out: BatchOutputs) -> None:
        self.totals.add(out)
        t = self.totals
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        parts = [f"H {t.mean_entropy:.3f}" if t.mean_entropy is not None else ""]
        if self.method.updates_parameters:
            parts.append(f"used {100 * (t.used_share or 0):.0f}%")
            parts.append(f"resets {t.resets}")
            ema = self._method_ema()
            if ema is not None:
                parts.append(f"EMA {ema:.3f}")
        if t.accuracy is not None:
            parts.append(f"acc {100 * t.accuracy:.1f}%")
        if t.skipped:
            parts.append(f"skipped {t.skipped}")
        self._progress.update(
            self._task,
            advance=len(out.batch.items) + len(out.batch.skipped),
            rate=f"{t.images / elapsed:.1f} img/s",
            stats="  ".join(p for p in parts if p),
        )


    def _method_ema(self) -> float | None:
        """SAR's entropy EMA, read at most twice a second: on a GPU reading it waits for the
        device, which the per-batch loop otherwise never does."""
        now = time.perf_counter()
        if now - self._ema_read_at >= 0.5:
            self._ema = self.method.stats().get("ema")
            self._ema_read_at = now
        return self._ema


def summary_table(record: dict[str, Any]) -> Table:
    table = Table(title="tta adapt", show_header=False, title_justify="left")
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
        ("outputs", record["out"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
