"""The one exception type for user errors.

Everything a user can get wrong (a missing folder, an unknown model, a bad ``--set``) raises
:class:`TTAError`. The CLI turns it into one clean line and a non-zero exit code in one place
(``tta_cli.cli.main``); library users catch it like any exception.
"""

from __future__ import annotations


class TTAError(Exception):
    """A user error: a message that says what is wrong, and optionally how to fix it."""

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
