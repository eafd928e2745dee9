"""How a run ended: its outcome (completed, interrupted, failed, collapsed) and the one table from
outcome to message and exit code (the README's exit-code table)."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tta_cli import signals
from tta_cli.config import AdaptConfig
from tta_cli.errors import TTAError
from tta_cli.monitor import CollapseStop
from tta_cli.outputs import Totals


@dataclass
class Outcome:
    status: str = "completed"
    reason: str | None = None
    error: BaseException | None = None


def is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC, as an OSError or as the message of a writer that wraps it (safetensors)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return err is not None and ("os error 28" in str(err) or "No space left on device" in str(err))


def failure_reason(err: BaseException, writing: Path | None = None) -> str:
    if is_disk_full(err):
        return f"disk full writing {getattr(err, 'filename', None) or writing or 'the outputs'}"
    return f"{type(err).__name__}: {err}"


@contextlib.contextmanager
def disk_full_as_error(out: Path) -> Iterator[None]:
    """A full disk as one line and exit 4."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        raise TTAError(f"{failure_reason(err, out)}: free space or choose another --out", exit_code=4) from err


def after_signal(outcome: Outcome) -> Outcome:
    """A run that received SIGINT or SIGTERM ended by it: whatever failed after (a step cut short,
    an interrupt a library swallowed) is the interrupt's doing, and it is not complete."""
    if signals.received() is not None and outcome.status in ("completed", "failed", "interrupted"):
        outcome.status, outcome.reason, outcome.error = "interrupted", signals.signal_name(), None
    elif outcome.status == "interrupted" and outcome.reason is None:
        outcome.reason = "SIGINT"
    return outcome


def check_outcome(config: AdaptConfig, outcome: Outcome, totals: Totals, out: Path, console: Console,
                   record: dict[str, Any]) -> dict[str, Any]:
    """The exit: a failed run raises (a full disk as one line), an interrupted one exits 130 (143
    after SIGTERM), skipped inputs warn (or fail with --strict)."""
    err = outcome.error
    if isinstance(err, CollapseStop):
        raise err
    if outcome.status == "failed":
        if is_disk_full(err):
            raise TTAError(f"{outcome.reason}: free space or choose another --out", exit_code=4) from err
        assert err is not None
        raise err
    if outcome.status == "interrupted":
        code = 143 if outcome.reason == "SIGTERM" else 130
        raise TTAError(f"interrupted ({outcome.reason}): the predictions so far, the model and run.json are in "
                       f"{out}; continue with: tta adapt --resume {out}", exit_code=code)
    if totals.skipped:
        console.print(f"[yellow]warning: {totals.skipped} inputs could not be read, see {out / 'errors.csv'}"
                      "[/yellow]")
        if not totals.images:
            raise TTAError(f"none of the inputs could be read ({totals.skipped} skipped)",
                           f"see {out / 'errors.csv'}", exit_code=3)
        if config.strict:
            raise TTAError(f"{totals.skipped} inputs could not be read (--strict)", exit_code=3)
    return record
