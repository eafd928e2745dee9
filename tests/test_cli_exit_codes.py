"""The README's exit-code table is the one truth: each of its rows, produced by the command line."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_images
from tta_cli.cli import main
from tta_cli.signals import TEST_SIGNAL_ENV

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def readme_exit_codes() -> list[int]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("**Exit codes**"):].split("\n\n")[1]
    return [int(code) for code in re.findall(r"^\| (\d+) \|", table, flags=re.MULTILINE)]


def test_the_readme_table_lists_every_exit_code_once() -> None:
    assert sorted(readme_exit_codes()) == [0, 1, 2, 3, 4, 130, 143]


def _adapt(model: Path, images: Path, out: Path) -> list[str]:
    return ["adapt", str(images), "-m", f"local-dir:{model}", "--method", "tent", "-b", "4", "--workers", "0",
            "-o", str(out), "--quiet"]


def _in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                args: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["tta", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


def _disk_full(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _unexpected(*_: object, **__: object) -> None:
    raise ValueError("a bug")


@pytest.mark.parametrize("code", readme_exit_codes())
def test_each_exit_code_of_the_readme(code: int, tiny_model_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, 8)
    args = _adapt(tiny_model_dir, images, out)
    if code in (130, 143):
        name = "SIGINT" if code == 130 else "SIGTERM"
        environ = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", TEST_SIGNAL_ENV: f"load:{name}"}
        result = subprocess.run([sys.executable, "-m", "tta_cli", *args], env=environ, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == code, result.stderr
        assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
        return
    if code == 2:  # a folder with no images is a usage error, not unreadable inputs (issue #24.16)
        args = _adapt(tiny_model_dir, tmp_path / "empty", out)
        (tmp_path / "empty").mkdir()
    elif code == 3:
        for path in images.iterdir():
            path.write_bytes(b"not an image")
    elif code == 4:
        monkeypatch.setattr("tta_cli.checkpoint.torch.save", _disk_full)
    elif code == 1:
        monkeypatch.setattr("tta_cli.run.run_stream", _unexpected)
    got, err = _in_process(monkeypatch, capsys, args)
    assert got == code, err
    if code:
        assert err.strip().splitlines()[-1].startswith("tta: error: ") and "Traceback" not in err
    if code == 4:
        assert "disk full writing" in err and "checkpoint.pt" in err
    if code in (1, 4):
        assert json.loads((out / "run.json").read_text())["status"] == "failed"
