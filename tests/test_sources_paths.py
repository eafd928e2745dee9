"""Input path checks: each problem named, with the path, before any work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tta_cli.errors import TTAError
from tta_cli.sources.paths import check_input


def test_good_paths_pass(tmp_path: Path) -> None:
    (tmp_path / "f.png").write_bytes(b"x")
    check_input(tmp_path)
    check_input(tmp_path / "f.png")


def _bad_path(root: Path, kind: str) -> Path:
    if kind == "broken":
        (root / "link").symlink_to(root / "gone")
        return root / "link"
    if kind == "loop":
        (root / "a").symlink_to(root / "b")
        (root / "b").symlink_to(root / "a")
        return root / "a"
    if kind == "below a file":
        (root / "file").write_text("")
        return root / "file" / "below"
    return root / "nothing"


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "input not found"),
    ("broken", "broken symbolic link"),
    ("loop", "symbolic link loop"),
    ("below a file", "Not a directory"),
])
def test_bad_paths_name_the_problem(tmp_path: Path, kind: str, message: str) -> None:
    path = _bad_path(tmp_path, kind)
    with pytest.raises(TTAError, match=message) as err:
        check_input(path)
    assert str(path) in str(err.value)


def test_permission_denied_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: the tests may run as root, whom permissions do not stop.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(TTAError, match="permission denied"):
        check_input(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_folder_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0)
    try:
        with pytest.raises(TTAError, match="permission denied"):
            check_input(folder)
    finally:
        folder.chmod(0o755)
