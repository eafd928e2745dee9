"""``tta report RUN_DIR``: the page and charts of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tta_cli.cli.adapt_cmds import print_summary
from tta_cli.cli.options import SummaryJsonOpt


def report(
    run_dir: Annotated[Path, typer.Argument(help="The --out folder of a run (predictions.csv, run.json).")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Folder for report.html and the PNG charts (default: RUN_DIR/report).")] = None,
    as_json: SummaryJsonOpt = False,
) -> None:
    """Write a self-contained HTML report (charts, changed images, configuration) and PNG charts of a run."""
    from tta_cli.sinks.report import write_report

    written = write_report(run_dir, out)
    if as_json:
        print_summary({"html": str(written.html), "pngs": [str(p) for p in written.pngs]}, True)
    else:
        typer.echo(str(written.html))
