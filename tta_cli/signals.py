"""One policy for SIGINT (Ctrl-C) and SIGTERM (docker stop, systemd, Slurm), installed by
:mod:`tta_cli.__main__` before anything heavy is imported.

* The first signal received is remembered for the process: whatever happens after it (an exception
  from a half-done step, a library that swallowed the interrupt) the run ends as interrupted and
  the command exits 130 (SIGINT) or 143 (SIGTERM), see :func:`exit_code`.
* It raises ``KeyboardInterrupt`` in the main thread, but never inside an ``import`` (a module
  interrupted half-way stays broken in ``sys.modules`` and fails later with an unrelated
  ``AttributeError``): there it is raised again as soon as the import has finished.
* Inside :func:`deferred` (the run's final writes) it is only remembered; the caller looks at
  :func:`received`.
* In a forked child it does nothing: the parent decides and stops its workers. DataLoader workers
  have torch's own SIGTERM handler and die of a process-group SIGTERM; what the parent then reports
  from a finaliser ("Exception ignored ... DataLoader worker is killed") is the interrupt's fallout
  and is not printed once a signal was received (:func:`_unraisable`).

This module is torch-free and imports nothing of the package.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
HANDLED = (signal.SIGINT, signal.SIGTERM)
TEST_SIGNAL_ENV = "TTA_TEST_SIGNAL_AT"
"""Test hook: ``PHASE:SIGNAME`` sends the signal to this process at that point of a run (``import``:
before the command line is imported; ``load``: before the model loads; ``export``: before the
final writes), see :func:`test_point`."""
RETRY_SECONDS = 0.02
"""How often a signal that came during an import is raised again, until one is outside imports."""


class _State:
    received: int | None = None
    raised = False
    defer = 0
    pid = -1
    installed = False
    retrying = False


_state = _State()


def install() -> bool:
    """Handle SIGINT and SIGTERM by this policy (main thread only); False where it cannot."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in HANDLED:
        signal.signal(signum, _handler)
    sys.unraisablehook = _unraisable
    _state.pid, _state.installed, _state.defer = os.getpid(), True, 0
    reset()
    return True


def _unraisable(args: Any) -> None:
    """Errors in finalisers after a signal are its fallout (workers it ended): not printed."""
    if _state.received is not None and os.getpid() == _state.pid:
        return
    sys.__unraisablehook__(args)


def installed() -> bool:
    return _state.installed


def reset() -> None:
    """Forget a received signal (a new run in the same process)."""
    _state.received, _state.raised = None, False


def received() -> int | None:
    """The first SIGINT or SIGTERM received, if any."""
    return _state.received


def signal_name(default: str = "SIGINT") -> str:
    return signal.Signals(_state.received).name if _state.received is not None else default


def exit_code(default: int = 130) -> int:
    """130 after SIGINT, 143 after SIGTERM (``default`` when none was received)."""
    return EXIT_CODES.get(_state.received, default) if _state.received is not None else default


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a signal was received (also one a library swallowed)."""
    if _state.received is not None:
        _state.raised = True
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A signal inside is only remembered: writes that must finish (run.json, model/) finish."""
    _state.defer += 1
    try:
        yield
    finally:
        _state.defer -= 1


def ignore() -> None:
    """SIGINT and SIGTERM ignored from now on: the process is ending with its exit code set, and
    Python's shutdown would restore their default action (death by the signal, no exit code);
    it keeps an ignored one ignored."""
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_IGN)
        _state.installed = False


def hold() -> None:
    """From now on a signal is only noted (the command is ending: its exit code says it)."""
    _state.defer += 1


@contextlib.contextmanager
def allowed() -> Iterator[None]:
    """Inside :func:`deferred`, a part that a signal stops at once (raising ``KeyboardInterrupt``,
    also for one noted before it)."""
    _state.defer -= 1
    try:
        check()
        yield
    finally:
        _state.defer += 1


@contextlib.contextmanager
def policy() -> Iterator[None]:
    """This policy for a run called as a library (the command line installed it already): installed
    for the block, the previous handlers restored after; a signal that came before raises now."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        check()
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in HANDLED}
    reset()
    install()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = sys.__unraisablehook__
        _state.installed = False


def test_point(phase: str) -> None:
    """Fault injection for the tests: the signal ``TTA_TEST_SIGNAL_AT`` names for ``phase``."""
    wanted, _, name = os.environ.get(TEST_SIGNAL_ENV, "").partition(":")
    if wanted == phase:
        os.kill(os.getpid(), getattr(signal, name or "SIGINT"))


def _handler(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _state.pid:  # a forked worker: the parent stops it
        return
    if _state.received is None:
        _state.received = signum
    if _state.defer:
        return
    if _importing(frame):
        _retry_later(signum)
        return
    _state.raised = True
    raise KeyboardInterrupt


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _retry_later(signum: int) -> None:
    """Deliver the signal to the main thread again shortly (after the import, it raises)."""
    if _state.retrying:
        return
    _state.retrying = True

    def again() -> None:
        time.sleep(RETRY_SECONDS)
        _state.retrying = False
        if not _state.raised:
            _thread.interrupt_main(signum)

    threading.Thread(target=again, name="tta-signal-retry", daemon=True).start()


__all__ = ["EXIT_CODES", "allowed", "check", "deferred", "exit_code", "hold", "ignore", "install", "installed",
           "policy", "received", "reset", "signal_name", "test_point"]
