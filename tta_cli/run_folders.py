"""The folders a run writes (``--out`` and ``--export-folder``) over the run's life: locked from the
start (a second run on the same folder fails at once), checked before the model loads, and cleared
by ``--overwrite`` only in :meth:`RunFolders.prepare`, once every check of the run has passed.
What may be removed and how is :mod:`tta_cli.ownership`'s."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tta_cli.atomic import refuse_symlink
from tta_cli.ownership import FolderLock, content, remove_path, stale_temporaries
from tta_cli.runtime import prepare_out_dir, refuse_non_empty
from tta_cli.sinks.export_folder import plan_overwrite as plan_export

RESUMED_FILES = ("predictions.csv", "predictions.jsonl", "errors.csv", "run.json", "checkpoint.pt")


class RunFolders:
    """``with RunFolders(...) as folders``: locked and checked; ``folders.prepare()`` clears them."""

    def __init__(self, out: Path, export: Path | None, overwrite: bool, resume: bool, lock: bool = True) -> None:
        self.out, self.export, self.overwrite, self.resume, self.lock = out, export, overwrite, resume, lock
        self._locks = contextlib.ExitStack()
        self.fresh = False
        """``--out`` held nothing when checked (a run stopped before it started may record so there)."""
        self.prepared = False

    def __enter__(self) -> RunFolders:
        try:
            if self.lock:
                self._locks.enter_context(FolderLock(self.out, "--out"))
                if self.export is not None and self.export.absolute() != self.out.absolute():
                    self._locks.enter_context(FolderLock(self.export, "--export-folder"))
            self.check()
        except BaseException:
            self._locks.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._locks.close()

    def check(self) -> None:
        """Everything about the folders that can refuse the run; nothing is removed."""
        if self.resume:
            for name in RESUMED_FILES:
                refuse_symlink(self.out / name)
        else:
            refuse_non_empty(self.out, self.overwrite)
            self.fresh = not content(self.out)
        if self.export is not None:
            plan_export(self.export, self.overwrite)

    def prepare(self) -> None:
        """The out folder ready to write: an earlier run's outputs removed (``--overwrite``), or on
        resume the temporary files a killed run left. The export folder is cleared by its sink."""
        if self.resume:
            for path in stale_temporaries(self.out):
                remove_path(path)
        else:
            prepare_out_dir(self.out, self.overwrite)
        self.prepared = True


__all__ = ["RunFolders"]
