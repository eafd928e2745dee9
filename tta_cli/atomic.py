"""Writing outputs so that nothing half-written looks complete: a temporary name in the same folder,
then a rename (``os.replace``, atomic on one file system), and never through a symbolic link. In a
folder that keeps a manifest of its run's outputs (:mod:`tta_cli.ownership`) the name is listed
first, so that ``--overwrite`` may later remove it and its temporary names."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tta_cli.errors import TTAError
from tta_cli.ownership import record_path, remove_path


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary name in the same folder, flushed to disk, then renamed over
    ``path``: a reader (or a crash) sees the old file or the new one, never half of one."""
    refuse_symlink(path)
    record_path(path)  # listed as this run's before it exists (tta_cli.ownership)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if tmp.is_file():
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_dir(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp_dir)`` into ``path.tmp-PID/``, then that folder takes ``path``'s place (an old one
    is moved aside first and removed after): never a folder with half its files."""
    refuse_symlink(path)
    record_path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    remove_path(tmp)
    try:
        tmp.mkdir()
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    remove_path(old)


def refuse_symlink(path: Path) -> None:
    """Outputs are never written through a symbolic link (it could point out of ``--out``)."""
    if path.is_symlink():
        raise TTAError(f"{path} is a symbolic link: tta does not write through links",
                       "remove the link or choose another --out")


__all__ = ["atomic_write", "atomic_write_dir", "atomic_write_text", "refuse_symlink", "remove_path"]
