"""What a run owns in a folder it writes (``--out``, ``--export-folder``): a lock for the run's whole
life and a list of the files it wrote, so that ``--overwrite`` deletes only those.

* **Lock.** ``.tta-lock`` in the folder is held with ``flock`` (exclusive, not waiting) while the run
  lives: a second run on the same folder fails at once with one line (exit 2). The lock goes with
  the process, also after kill -9 (the file may then stay; it is never counted as content).
* **Manifest.** ``.tta-outputs.json`` lists the names a run created in the folder (written
  atomically, each name before the file is created). ``--overwrite`` removes only listed names and
  their temporary names (``.NAME.tmp-PID``, ``NAME.tmp-PID``, ``NAME.old-PID``, see
  :mod:`tta_cli.atomic`); a link is removed, never followed; everything else stays. A name the run
  is about to write that exists but is not listed (a user's ``predictions.csv``) refuses the run
  before anything is deleted.
* **Plan first.** :func:`plan_overwrite` only checks and returns what would be removed;
  :func:`remove_planned` removes it, called once every check of the run has passed.

This module is torch-free and imports nothing of the package but the error type.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Collection, Iterable
from pathlib import Path

from tta_cli.errors import TTAError

LOCK_FILE = ".tta-lock"
OWNED_FILE = ".tta-outputs.json"
BOOKKEEPING = (LOCK_FILE, OWNED_FILE)
"""Files of the ownership machinery itself: never counted as content of a folder."""

_TEMPORARY = re.compile(r"^\.?(?P<name>.+)\.(?:tmp|old)-\d+$")


class FolderLock:
    """An exclusive, non-waiting ``flock`` on ``FOLDER/.tta-lock`` (the folder is created if absent,
    and removed again on release if the run wrote nothing in it)."""

    def __init__(self, folder: Path, option: str = "--out") -> None:
        self.folder, self.option = folder, option
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> FolderLock:
        refuse_link(self.folder, self.option)
        if self.folder.exists() and not self.folder.is_dir():
            raise TTAError(f"{self.option} {self.folder} exists and is not a folder")
        try:
            self._created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = self._lock_file()
        except OSError as err:
            what = "output folder" if self.option == "--out" else "export folder"
            raise TTAError(f"cannot write to {what} {self.folder}: {err.strerror or err}",
                           f"choose another {self.option}") from err
        return self

    def _lock_file(self) -> int:
        path = self.folder / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                raise TTAError(f"{self.option} {self.folder} is in use by another tta run"
                               + (f" (process {holder})" if holder else ""),
                               f"wait for it to end or choose another {self.option}") from None
            except BaseException:
                os.close(fd)
                raise
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not a lock file removed meanwhile
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    return fd
            os.close(fd)

    def release(self) -> None:
        """Unlock; the lock file goes (a run waiting on it sees that and takes a fresh one), and a
        folder this lock created goes too if nothing was written in it."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.folder / LOCK_FILE).unlink()
            if self._created:
                self.folder.rmdir()  # only if empty
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def refuse_link(folder: Path, option: str = "--out") -> None:
    """Outputs are never written through a symbolic link: a folder that is one is refused."""
    if folder.is_symlink():
        raise TTAError(f"{option} {folder} is a symbolic link: tta does not write through links",
                       f"pass the real folder as {option}")


# --- the manifest of owned names -------------------------------------------------------------------

def owned(folder: Path) -> set[str]:
    """The names the manifest lists (none when it is absent, a link or unreadable: nothing is proven)."""
    path = folder / OWNED_FILE
    if path.is_symlink() or not path.is_file():
        return set()
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("names", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in names if isinstance(name, str) and _plain_name(name)}


def start_manifest(folder: Path) -> None:
    """Begin listing in ``folder`` (an existing list is kept)."""
    if not (folder / OWNED_FILE).is_file():
        _write_manifest(folder, set())


def record(folder: Path, *names: str) -> None:
    """Add ``names`` to the folder's manifest, if it keeps one, before the files are created."""
    if not (folder / OWNED_FILE).is_file():
        return
    names_now = owned(folder)
    if not set(names) <= names_now:
        _write_manifest(folder, names_now | set(names))


def record_path(path: Path) -> None:
    """:func:`record` for ``path`` in its folder."""
    if path.name not in BOOKKEEPING:
        record(path.parent, path.name)


def _write_manifest(folder: Path, names: set[str]) -> None:
    path = folder / OWNED_FILE
    tmp = folder / f".{OWNED_FILE}.tmp-{os.getpid()}"
    text = json.dumps({"written_by": "tta", "names": sorted(names)}, indent=1)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def is_owned_entry(name: str, names: Collection[str]) -> bool:
    """A listed name, or the temporary name of one (or of the manifest itself)."""
    if name in names:
        return True
    match = _TEMPORARY.match(name)
    return match is not None and (match["name"] in names or match["name"] == OWNED_FILE)


def stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files a killed run left beside its outputs (removed when a run resumes)."""
    names = owned(folder)
    return [p for p in _entries(folder) if p.name not in names and is_owned_entry(p.name, names)]


# --- --overwrite: check, then remove ---------------------------------------------------------------

def content(folder: Path) -> list[Path]:
    """The folder's entries other than the ownership files."""
    return [p for p in _entries(folder) if p.name not in BOOKKEEPING]


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []
    except OSError as err:
        raise TTAError(f"cannot read folder {folder}: {err.strerror or err}") from err


def plan_overwrite(folder: Path, overwrite: bool, writes: Iterable[str] = (), ignore: Collection[str] = (),
                   option: str = "--out", hint: str | None = None) -> list[Path]:
    """Check ``folder`` and return what ``--overwrite`` will remove (nothing is removed here).

    A non-empty folder (``ignore`` and the ownership files aside) is refused without ``overwrite``;
    with it, the listed names are removed, and a name in ``writes`` that exists unlisted refuses."""
    refuse_link(folder, option)
    if folder.exists() and not folder.is_dir():
        raise TTAError(f"output path {folder} exists and is not a folder")
    present = [p for p in content(folder) if p.name not in ignore]
    if not present:
        return []
    if not overwrite:
        raise TTAError(f"output folder {folder} is not empty", hint or f"choose another {option} or pass --overwrite")
    names = owned(folder)
    removable = [p for p in present if is_owned_entry(p.name, names)]
    foreign = sorted(name for name in set(writes) if _exists(folder / name) and name not in names)
    if foreign:
        raise TTAError(f"{option} {folder} holds {', '.join(foreign)}, which no tta run recorded writing there: "
                       "tta deletes only files it wrote", f"move them away or choose another {option}")
    return removable


def remove_path(path: Path) -> None:
    """A file, a link (not what it points to) or a folder tree, if present."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)  # removes links inside, never follows them


def _exists(path: Path) -> bool:
    return path.is_symlink() or path.exists()


def remove_planned(folder: Path, paths: Iterable[Path]) -> None:
    """Remove what :func:`plan_overwrite` returned (links themselves, never their targets), then
    drop those names from the manifest."""
    removed = set()
    for path in paths:
        remove_path(path)
        removed.add(path.name)
    if removed and (folder / OWNED_FILE).is_file():
        _write_manifest(folder, owned(folder) - removed)


__all__ = ["BOOKKEEPING", "LOCK_FILE", "OWNED_FILE", "FolderLock", "content", "is_owned_entry", "owned",
           "plan_overwrite", "record", "record_path", "refuse_link", "remove_path", "remove_planned",
           "stale_temporaries", "start_manifest"]
