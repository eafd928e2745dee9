"""Rich progress across the runs of ``tta bench``: one bar for the runs, one for the current run."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tta_cli.bench.results import RunResult
from tta_cli.outputs import BatchOutputs


class BenchProgress:
    """Rich progress across runs: one bar for the runs, one for the images of the current run."""

    def __init__(self, console: Console, total_runs: int, quiet: bool) -> None:
        self.console = console
        self.quiet = quiet
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[stats]}"),
            console=console, disable=quiet, transient=False,
        )
        self._runs = self._progress.add_task("runs", total=total_runs, stats="")
        self._run: Any = None
        self._images = self._correct = 0
        self._started = time.perf_counter()

    def __enter__(self) -> BenchProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start_run(self, description: str, total: int) -> None:
        self._images = self._correct = 0
        self._started = time.perf_counter()
        if self._run is not None:
            self._progress.remove_task(self._run)
        self._run = self._progress.add_task(description, total=total, stats="")

    def on_batch(self, out: BatchOutputs) -> None:
        correct = out.correct
        self._images += len(out.batch.items)
        self._correct += int(correct.sum()) if correct is not None else 0
        rate = self._images / max(time.perf_counter() - self._started, 1e-9)
        stats = f"acc {100 * self._correct / max(self._images, 1):.1f}%  {rate:.1f} img/s"
        self._progress.update(self._run, advance=len(out.batch.items) + len(out.batch.skipped), stats=stats)

    def end_run(self, result: RunResult) -> None:
        self._progress.advance(self._runs)
        if not self.quiet:
            flag = "  [red]collapsed[/red]" if result.collapsed else ""
            self._progress.console.print(
                f"{result.setting:>15s} {result.corruption:<17s} {result.method:<12s} "
                f"acc {100 * result.accuracy:5.1f}%  resets {result.resets:3d}  "
                f"{1000 * result.adapt_seconds / max(result.images, 1):6.1f} ms/img{flag}")

    def skip(self, n: int = 1) -> None:
        self._progress.advance(self._runs, n)
