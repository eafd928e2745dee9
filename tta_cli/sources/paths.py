"""Checks on the paths given as inputs, so a bad one fails early with a message that names it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from tta_cli.errors import TTAError

INPUT_KINDS_HINT = ("inputs are image folders, images, videos (.mp4 .mkv .avi .mov .webm) "
                    "or lists (.txt, .csv)")


def check_input(path: Path) -> None:
    """Raise a :class:`TTAError` naming the problem when ``path`` cannot be read as an input.

    Checked before any work starts, so a typo or a broken link never leaves a half-written run.
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise TTAError(f"input {path} is a broken symbolic link (to {os.readlink(path)})",
                           "fix or remove the link") from None
        raise TTAError(f"input not found: {path}", f"check the path; {INPUT_KINDS_HINT}") from None
    except PermissionError:
        raise permission_error(path) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TTAError(f"input {path} is a symbolic link loop",
                           "fix the link so it ends at a file or folder") from None
        raise TTAError(f"cannot read {path}: {err.strerror}", INPUT_KINDS_HINT) from None
    # os.access, not a trial read: a folder also needs the execute bit to be listed.
    needed = os.R_OK | os.X_OK if path.is_dir() else os.R_OK
    if not os.access(path, needed):
        raise permission_error(path)


def permission_error(path: Path) -> TTAError:
    return TTAError(f"cannot read {path}: permission denied",
                    "check its permissions (ls -l), or run as a user who can read it")
