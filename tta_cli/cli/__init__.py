"""The ``tta`` command line. Importing this package does not import torch (``tta --help`` is instant);
each command imports the library when it runs.

Exit codes: 0 done; 2 a usage error (a bad option or value, a missing argument) or a user error
(:class:`~tta_cli.errors.TTAError`, unless it carries its own code); 3 inputs could not be read;
4 the disk is full; 130 interrupted (Ctrl-C or ``typer.Abort``), 143 stopped by SIGTERM, at any point
(the ``tta`` script and ``python -m tta_cli`` start in :mod:`tta_cli.__main__`, which installs the
signal policy of :mod:`tta_cli.signals` before this package is imported; a run's ``run.json`` says
interrupted); 1 an unexpected error.
Bare ``tta`` prints the help; its exit code is the one the installed click gives a command line
without arguments: 2 with typer >= 0.26's own click and with click >= 8.2, 0 with older click.

Typer >= 0.26 carries its own copy of click (``typer._click``) whose exceptions are not those of a
``click`` that may also be installed, so the classes are looked up in both (:func:`click_exceptions`).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

from tta_cli import signals
from tta_cli.cli.adapt_cmds import adapt, methods, models, predict
from tta_cli.cli.app import app
from tta_cli.cli.bench_cmds import bench, corrupt
from tta_cli.cli.help import Command, examples
from tta_cli.cli.report_cmd import report
from tta_cli.errors import TTAError

# Every command, registered here and only here (the command modules never import the app).
for _command in (adapt, predict, report, methods, models, corrupt, bench):
    app.command(cls=Command, epilog=examples(_command.__name__))(_command)

_CLICK_LAYOUTS = ("typer._click.exceptions", "click.exceptions")
"""Where the click exceptions live: typer's vendored copy (typer >= 0.26), then click itself."""


def click_exceptions() -> list[ModuleType]:
    """The click exception modules present, typer's own copy first."""
    found = []
    for name in _CLICK_LAYOUTS:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    return found


def _classes(name: str) -> tuple[type[BaseException], ...]:
    found = (getattr(module, name, None) for module in click_exceptions())
    return tuple(cls for cls in found if isinstance(cls, type))


def _abort_classes() -> tuple[type[BaseException], ...]:
    import typer

    return (*_classes("Abort"), typer.Abort)


def main() -> None:
    """Entry point: run the app and turn every way it can end into one clean line and an exit code.

    After SIGINT or SIGTERM (:mod:`tta_cli.signals`) the exit is 130 or 143 whatever ended the
    command: an exception then is the interrupt's doing, a completion after it does not hide it."""
    if not signals.installed():  # called in Python, not through tta_cli.__main__: a fresh start
        signals.reset()
    try:
        code = _run()
    except KeyboardInterrupt:  # between the app's end and the exit
        code = _interrupted()
    if signals.received() is not None and code != signals.exit_code():
        code = _interrupted()
    if code:  # success returns, so that callers in Python carry on
        sys.exit(code)


def _run() -> int:
    try:
        result = app(standalone_mode=False)
    except TTAError as err:
        if _debug():
            raise
        if err.exit_code in (130, 143):
            return _interrupted(str(err))
        if signals.received() is not None:
            return _interrupted()
        _print_error(str(err))
        return err.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except SystemExit as err:
        return _system_exit_code(err)
    except Exception as err:
        if signals.received() is not None and not _debug():
            return _interrupted()
        return _other_error(err)
    # Without standalone mode click returns the code of an Exit it caught: typer turns Ctrl-C
    # inside a command into Exit(130), and --version raises Exit(0).
    if isinstance(result, int) and not isinstance(result, bool):
        return _interrupted() if result == 130 else result
    return 0


def _other_error(err: Exception) -> int:
    """Click's usage errors and aborts (from either click), else an unexpected error."""
    if isinstance(err, _abort_classes()):  # older click turns Ctrl-C into Abort
        return _interrupted("interrupted" if isinstance(err.__cause__, KeyboardInterrupt) else "aborted")
    if type(err).__name__ == "NoArgsIsHelpError":  # bare `tta`: the help is the message
        if str(err.format_message()).strip():  # type: ignore[attr-defined]  # rich has printed it already
            err.show()  # type: ignore[attr-defined]
        return int(getattr(err, "exit_code", 2))
    if isinstance(err, _classes("ClickException")):
        _print_error(_usage_line(err))
        return int(getattr(err, "exit_code", 2))
    if _debug():
        raise err
    _print_error(f"unexpected error: {type(err).__name__}: {err} (set TTA_DEBUG=1 for the traceback)")
    return 1


def _usage_line(err: Any) -> str:
    """Click's message (it names the option) and where the help is, on one line."""
    message = " ".join(str(err.format_message()).split())
    ctx = getattr(err, "ctx", None)
    if ctx is not None and isinstance(err, _classes("UsageError")):
        message += f" (see '{ctx.command_path} --help')"
    return message


def _system_exit_code(err: SystemExit) -> int:
    if err.code is None:
        return 0
    if isinstance(err.code, int):
        return err.code
    _print_error(str(err.code))
    return 1


def _interrupted(message: str = "interrupted") -> int:
    """The message, and 130 (143 after SIGTERM)."""
    _print_error(message)
    return signals.exit_code()


def _debug() -> bool:
    return os.environ.get("TTA_DEBUG") == "1"


def _print_error(message: str) -> None:
    print(f"tta: error: {message}", file=sys.stderr)


__all__ = ["app", "click_exceptions", "main"]
