"""``python -m tta_cli`` and the ``tta`` script: the command line, with Ctrl-C handled from the first line.

This module imports nothing heavy itself, so a Ctrl-C while typer and the commands are imported
also ends with "interrupted" and exit code 130 (not a traceback).
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from tta_cli.cli import main as run_cli
    except KeyboardInterrupt:
        print("tta: error: interrupted", file=sys.stderr)
        sys.exit(130)
    run_cli()


if __name__ == "__main__":
    main()
