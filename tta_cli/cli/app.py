"""The ``tta`` Typer app and its root options; the commands are registered in ``tta_cli.cli``."""

from __future__ import annotations

from typing import Annotated

import typer

from tta_cli import __version__
from tta_cli.cli.help import Group

app = typer.Typer(
    name="tta",
    cls=Group,
    help="Adapt an image classifier to the shifted data it meets, while it predicts: better "
         "predictions and the adapted model (tta methods lists the methods; auto by default).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tta {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Adapt image classifiers at test time."""
