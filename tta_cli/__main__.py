"""``python -m tta_cli`` and the ``tta`` script: the command line, with SIGINT and SIGTERM handled from
the first line.

The signal policy (:mod:`tta_cli.signals`) is installed before typer, torch or anything heavy is
imported, so a Ctrl-C or SIGTERM at any moment ends with "interrupted" and exit code 130 or 143
(never a traceback, never a half-imported module).
"""

from __future__ import annotations

import atexit
import sys

from tta_cli import signals


def main() -> None:
    signals.install()
    atexit.register(signals.ignore)  # a signal while the interpreter shuts down cannot kill it uncounted
    code = 0
    try:
        signals.test_point("import")
        from tta_cli.cli import main as run_cli

        run_cli()  # exits itself with any code but 0
    except KeyboardInterrupt:
        code = signals.exit_code()
        print("tta: error: interrupted", file=sys.stderr)
    finally:
        signals.hold()  # the command is over: a signal from now on is only noted
    if signals.received() is not None and code == 0:
        print("tta: error: interrupted", file=sys.stderr)
        code = signals.exit_code()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
