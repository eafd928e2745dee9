"""``tta report RUN_DIR``: the page and charts of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tta_cli.cli.adapt_cmds import print_summary
from tta_cli.cli.options import OUTPUT, SummaryJsonOpt


def report(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", show_default=False,
        help="The --out folder of a tta adapt or tta predict run (predictions.csv, run.json).")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="DIR", rich_help_panel=OUTPUT,
        help="Folder for report.html and the PNG charts (default: RUN_DIR/report).")] = None,
    as_json: SummaryJsonOpt = False,
) -> None:
    """Write a run's report: one self-contained HTML page and PNG charts.

    The verdict and the accuracy before and after adaptation at the top, then charts along the
    stream, the predicted classes against the source model's, the images whose prediction changed
    and the configuration.
    """
    from tta_cli.sinks.report import write_report

    written = write_report(run_dir, out)
    if as_json:
        print_summary({"html": str(written.html), "pngs": [str(p) for p in written.pngs]}, True)
    else:
        typer.echo(str(written.html))
