"""How the ``tta`` command ends: usage errors, Ctrl-C and aborts, under the installed typer.

Typer >= 0.26 carries its own click (``typer._click``); older typers use click itself. These tests
run against whichever is installed (CI runs them with the newest typer and the oldest supported
one, see pyproject.toml), and check the layout they ran under is the one detected.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import tta_cli.cli
from tta_cli.cli import app, click_exceptions, main

ROOT = Path(__file__).resolve().parents[1]
VENDORED = importlib.util.find_spec("typer._click") is not None


def tta(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``python -m tta_cli ARGS`` in a fresh process (this checkout's package first)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra_env}
    env.pop("TTA_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "tta_cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def one_clean_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "unexpected error" not in stderr, stderr
    assert lines[0].startswith("tta: error: "), stderr
    return lines[0]


def test_the_click_layout_of_the_installed_typer_is_found() -> None:
    names = [module.__name__ for module in click_exceptions()]
    if VENDORED:
        assert names[0] == "typer._click.exceptions"
    else:
        assert names == ["click.exceptions"]
    usage_error = type(_raised_by(["adapt", "--nope"]))
    assert any(usage_error.__module__.startswith(name.removesuffix(".exceptions")) for name in names)


def _raised_by(args: list[str]) -> BaseException:
    try:
        app(args, standalone_mode=False)
    except Exception as err:
        return err
    raise AssertionError(f"{args} raised nothing")


USAGE_ERRORS = [
    (["adapt", "x", "-m", "m", "--batch-size", "0"], "'--batch-size'"),
    (["adapt", "x", "-m", "m", "--workers", "-1"], "'--workers'"),
    (["adapt", "x", "-m", "m", "--lr", "nan"], "'--lr': must be a finite number > 0, got nan"),
    (["adapt", "x", "-m", "m", "--lr", "inf"], "'--lr': must be a finite number > 0, got inf"),
    (["adapt", "x", "-m", "m", "--lr", "-0.1"], "'--lr': must be a finite number > 0, got -0.1"),
    (["adapt", "x", "-m", "m", "--lr", "abc"], "'--lr'"),
    (["adapt", "x", "-m", "m", "--fps", "nan"], "'--fps'"),
    (["adapt", "x", "-m", "m", "--start", "inf"], "'--start'"),
    (["adapt", "x", "-m", "m", "--seed", "-1"], "'--seed'"),
    (["adapt", "x", "-m", "m", "--precision", "fp8"], "'--precision': 'fp8' is not one of auto, fp32, bf16, fp16"),
    (["adapt", "x", "-m", "m", "--channels-last", "maybe"], "'--channels-last'"),
    (["adapt", "x", "-m", "m", "--labels-encoding", "klingon"], "'--labels-encoding': unknown encoding"),
    (["adapt", "x", "-m", "m", "--labels-from-folders", "x"], "'--labels-from-folders'"),
    (["adapt", "x", "-m", "m", "--nope"], "--nope"),
    (["adapt", "x"], "'--model'"),
    (["adapt"], "Missing argument"),
    (["nosuch"], "No such command 'nosuch'"),
]


@pytest.mark.parametrize(("args", "named"), USAGE_ERRORS, ids=[" ".join(a[-2:]) for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_with_one_line_naming_the_option(args: list[str], named: str,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["tta", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    assert exited.value.code == 2
    line = one_clean_line(captured.err)
    assert named in line and "--help" in line
    assert captured.out == ""


@pytest.mark.parametrize(("args", "named"), [USAGE_ERRORS[0], USAGE_ERRORS[2], USAGE_ERRORS[13], USAGE_ERRORS[15]])
def test_usage_errors_in_a_fresh_process(args: list[str], named: str) -> None:
    result = tta(*args)
    assert result.returncode == 2, result.stderr
    assert named in one_clean_line(result.stderr)


@pytest.mark.parametrize(("args", "named"), USAGE_ERRORS[:4])
def test_usage_errors_through_cli_runner(args: list[str], named: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert named.split(":")[0] in result.output


def test_bare_tta_shows_the_help() -> None:
    result = tta()
    assert "Usage:" in result.stdout and "adapt" in result.stdout
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr
    # click >= 8.2 (and typer's own copy) exit 2 for a command line without arguments, older click 0.
    assert result.returncode in (0, 2)
    if VENDORED:
        assert result.returncode == 2


def test_help_and_version_exit_0() -> None:
    assert tta("--help").returncode == 0
    version = tta("--version")
    assert version.returncode == 0 and version.stdout.startswith("tta ")


@pytest.fixture
def failing_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[typer.Typer]:
    """An app standing in for tta's, whose command raises what the test asks for (via the real typer)."""
    stand_in = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    raised: list[BaseException] = []

    @stand_in.command()
    def run() -> None:
        raise raised[0]

    @stand_in.command()
    def other() -> None:  # two commands: "run" is then a sub-command, as tta's are
        pass

    stand_in.raised = raised  # type: ignore[attr-defined]
    monkeypatch.setattr(tta_cli.cli, "app", stand_in)
    monkeypatch.setattr(sys, "argv", ["tta", "run"])
    yield stand_in


@pytest.mark.parametrize(("error", "message"), [
    (KeyboardInterrupt(), "tta: error: interrupted"),
    (typer.Abort(), "tta: error: aborted"),
    (typer.Exit(130), "tta: error: interrupted"),
])
def test_ctrl_c_and_abort_in_a_command_exit_130(error: BaseException, message: str, failing_app: typer.Typer,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    failing_app.raised.append(error)  # type: ignore[attr-defined]
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 130
    assert one_clean_line(capsys.readouterr().err) == message


def test_a_user_error_with_its_own_exit_code(failing_app: typer.Typer, capsys: pytest.CaptureFixture[str]) -> None:
    from tta_cli.errors import TTAError

    failing_app.raised.append(TTAError("none of the inputs could be read", "see errors.csv", exit_code=3))  # type: ignore[attr-defined]
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 3
    assert one_clean_line(capsys.readouterr().err) == "tta: error: none of the inputs could be read (see errors.csv)"


def test_an_unexpected_error_is_one_line_and_exit_1(failing_app: typer.Typer,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    failing_app.raised.append(ZeroDivisionError("boom"))  # type: ignore[attr-defined]
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.strip() == (
        "tta: error: unexpected error: ZeroDivisionError: boom (set TTA_DEBUG=1 for the traceback)")


def test_ctrl_c_while_the_commands_are_imported_exits_130(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The ``tta`` script starts in tta_cli.__main__, which imports the command line inside its guard."""
    import tta_cli.__main__ as entry

    class Interrupting:
        def find_spec(self, name: str, *_: object) -> None:
            if name == "tta_cli.cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "tta_cli.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 130
    assert one_clean_line(capsys.readouterr().err) == "tta: error: interrupted"


def test_the_script_entry_point_is_the_guarded_one() -> None:
    tomllib = pytest.importorskip("tomllib")

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tta"] == "tta_cli.__main__:main"


def test_the_typer_range_in_pyproject_holds_the_installed_typer() -> None:
    from importlib.metadata import version

    tomllib = pytest.importorskip("tomllib")

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in dependencies if d.startswith("typer"))
    low, high = (part.split("=")[-1].lstrip("<") for part in spec.removeprefix("typer").split(","))
    installed = tuple(int(x) for x in version("typer").split(".")[:2])
    assert tuple(int(x) for x in low.split(".")[:2]) <= installed < tuple(int(x) for x in high.split(".")[:2])


@pytest.mark.parametrize("offline", [
    {"HF_HUB_OFFLINE": "1"},
    {"HTTPS_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"},  # a proxy that refuses: no network, anywhere
], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_a_registry_model_without_cache_or_network_fails_at_once(offline: dict[str, str], tmp_path: Path) -> None:
    started = time.monotonic()
    result = tta("adapt", "sample_data/stream", "--model", "vit_base", "--out", str(tmp_path / "out"),
                 HF_HUB_CACHE=str(tmp_path / "empty-cache"), **offline)
    elapsed = time.monotonic() - started
    line = one_clean_line(result.stderr)
    assert result.returncode == 2 and "cannot load weights for vit_base_patch16_224" in line
    assert "local-dir:" in line and "--no-pretrained" in line  # the hint
    assert elapsed < 60  # imports on a loaded machine; huggingface_hub's retries took 81 s
