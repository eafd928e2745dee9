"""``tta_cli.signals``: every SIGINT and SIGTERM ends the command with 130 or 143, never inside an
import, never lost; a run records "interrupted" and resumes (fault injection in subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_images, tiny_model_folder
from tta_cli import signals
from tta_cli.signals import TEST_SIGNAL_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def policy() -> Iterator[None]:
    """The policy installed as ``tta_cli.__main__`` does, the test runner's handlers restored after."""
    signals._state.installed = False  # an earlier test may have left tta's main policy marked installed
    with signals.policy():
        yield
    signals.reset()


def test_a_signal_inside_an_import_is_raised_after_it(policy: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #24.6: an interrupted import left numpy half-built ("no attribute 'multiply'")."""
    (tmp_path / "slow_module_for_signals.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "deadline = time.monotonic() + 0.3\n"
        "while time.monotonic() < deadline:\n"
        "    pass\n"
        "complete = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        import slow_module_for_signals  # noqa: F401

        for _ in range(200):  # raised again as soon as the import is over
            time.sleep(0.01)
    assert sys.modules["slow_module_for_signals"].complete
    assert signals.received() == signal.SIGINT and signals.exit_code() == 130


def test_deferred_notes_the_signal_and_allowed_raises_it(policy: None) -> None:
    with signals.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt), signals.allowed():
            pass
    assert signals.exit_code() == 143 and signals.signal_name() == "SIGTERM"


def test_a_forked_worker_leaves_the_signal_to_its_parent(policy: None) -> None:
    pid = os.fork()
    if pid == 0:  # the child: SIGTERM does nothing here
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert signals.received() is None


# --- the command line, in subprocesses --------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("signals")
    model = tiny_model_folder(root / "model", "test_resnet")
    make_images(root / "images", 24)
    return model, root / "images"


def _args(setup: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    model, images = setup
    return ["adapt", str(images), "-m", f"local-dir:{model}", "--method", "tent", "-b", "4", "--workers", "0",
            "--checkpoint-every", "2", "-o", str(out), "--quiet", *extra]


def _tta(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "tta_cli", *args], env=environ, capture_output=True, text=True,
                          timeout=300)


def _status(out: Path) -> tuple[str, str | None]:
    record = json.loads((out / "run.json").read_text())
    return record["status"], record.get("reason")


def _same_predictions(a: Path, b: Path) -> bool:
    return (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()


@pytest.fixture(scope="module")
def reference(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _tta(_args(setup, out)).returncode == 0
    return out


def test_a_signal_while_importing_exits_with_its_code(setup: tuple[Path, Path], tmp_path: Path) -> None:
    result = _tta(_args(setup, tmp_path / "run"), {TEST_SIGNAL_ENV: "import:SIGTERM"})
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip() == "tta: error: interrupted"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("phase", "name", "code"), [("load", "SIGTERM", 143), ("export", "SIGTERM", 143),
                                                      ("load", "SIGINT", 130)])
def test_a_signal_at_start_up_or_export_is_recorded_and_resumes(setup: tuple[Path, Path], reference: Path,
                                                                tmp_path: Path, phase: str, name: str,
                                                                code: int) -> None:
    """Issue #24.7: SIGTERM at start-up or after model/ exited 130, run.json stayed "running"."""
    out = tmp_path / "run"
    result = _tta(_args(setup, out), {TEST_SIGNAL_ENV: f"{phase}:{name}"})
    assert result.returncode == code, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--resume" in result.stderr
    assert _status(out) == ("interrupted", name)
    resumed = _tta(["adapt", "--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert _status(out)[0] == "completed" and _same_predictions(out, reference)


def _wait_for_rows(out: Path, process: subprocess.Popen[str], rows: int = 3) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        path = out / "predictions.csv"
        if path.exists() and path.read_text().count("\n") > rows:
            return
        time.sleep(0.02)
    raise AssertionError("the run made no predictions in time")


def test_a_process_group_sigterm_with_workers_prints_no_worker_traceback(setup: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """Issue #24.8: the workers printed "Exception ignored" tracebacks (once: exit 1)."""
    model, _ = setup
    images = tmp_path / "images"
    make_images(images, 400, seed=3)
    out = tmp_path / "run"
    environ = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["adapt", str(images), "-m", f"local-dir:{model}", "--method", "tent", "-b", "2", "--workers", "2",
            "-o", str(out), "--quiet"]
    process = subprocess.Popen([sys.executable, "-m", "tta_cli", *args], env=environ, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _wait_for_rows(out, process)
        os.killpg(process.pid, signal.SIGTERM)
        err = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert _status(out) == ("interrupted", "SIGTERM")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_at_any_moment_is_never_lost(setup: tuple[Path, Path], reference: Path, tmp_path: Path,
                                             name: str) -> None:
    """A signal from 0.2 s after the start to the end: always its exit code; a run that started is
    recorded as interrupted and resumes to the uninterrupted run's predictions."""
    environ = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    assert _tta(_args(setup, tmp_path / "timing")).returncode == 0
    length = time.monotonic() - started
    for i, moment in enumerate([0.2 + k * length / 10 for k in range(11)]):
        out = tmp_path / f"run{i}"
        process = subprocess.Popen([sys.executable, "-m", "tta_cli", *_args(setup, out)], env=environ,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(moment)
        process.send_signal(getattr(signal, name))
        err = process.communicate(timeout=300)[1]
        if process.returncode == 0:  # it had ended before the signal
            continue
        assert process.returncode == signals.EXIT_CODES[getattr(signal, name)], (moment, err)
        assert "Traceback" not in err and "unexpected" not in err, (moment, err)
        if (out / "run.json").exists():
            assert _status(out) in (("interrupted", name), ("completed", None)), moment
            if _status(out)[0] == "interrupted":
                assert _tta(["adapt", "--resume", str(out)]).returncode == 0, moment
                assert _same_predictions(out, reference), moment
