"""``python -m tta_cli`` and the ``tta`` script: the command line, with SIGINT and SIGTERM handled from
the first line.

The signal policy (:mod:`tta_cli.signals`) is installed before typer, torch or anything heavy is
imported, so a Ctrl-C or SIGTERM at any moment ends with "interrupted" and exit code 130 or 143
(never a traceback, never a half-imported module).
"""

from __future__ import annotations

import sys

from tta_cli import signals


def main() -> None:
    signals.install()
    try:
        signals.test_point("import")
        from tta_cli.cli import main as run_cli
    except KeyboardInterrupt:
        print("tta: error: interrupted", file=sys.stderr)
        sys.exit(signals.exit_code())
    run_cli()


if __name__ == "__main__":
    main()
