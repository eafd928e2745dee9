"""The ``tta`` command line. Importing this package does not import torch (``tta --help`` is instant);
each command imports the library when it runs."""

from __future__ import annotations

import os
import sys

from tta_cli.cli.adapt_cmds import adapt, methods, models
from tta_cli.cli.app import app
from tta_cli.cli.bench_cmds import bench, corrupt
from tta_cli.errors import TTAError

# Every command, registered here and only here (the command modules never import the app).
for _command in (adapt, methods, models, corrupt, bench):
    app.command()(_command)


def main() -> None:
    """Entry point: run the app and turn user errors into one clean line and an exit code."""
    try:
        app(standalone_mode=False)
    except TTAError as err:
        if os.environ.get("TTA_DEBUG") == "1":
            raise
        _print_error(str(err))
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _print_error("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click's usage errors and anything unexpected
        import click

        if isinstance(err, click.exceptions.Abort):
            _print_error("aborted")
            sys.exit(130)
        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if os.environ.get("TTA_DEBUG") == "1":
            raise
        _print_error(f"unexpected error: {type(err).__name__}: {err} (set TTA_DEBUG=1 for the traceback)")
        sys.exit(1)


def _print_error(message: str) -> None:
    print(f"tta: error: {message}", file=sys.stderr)


__all__ = ["app", "main"]
