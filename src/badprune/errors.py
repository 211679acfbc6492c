"""The one error type every user-facing failure raises (the CLI turns it into one line and exit 2)."""
from __future__ import annotations


class BadpruneError(Exception):
    """A failure caused by the user's input or usage.

    ``what`` says what is wrong, ``file`` names the file concerned (if any) and ``fix`` says how to fix it.
    ``str(err)`` is the one-line form the CLI prints after ``error: ``.
    """

    exit_code = 2

    def __init__(self, what: str, file: str | None = None, fix: str | None = None):
        self.what = what
        self.file = None if file is None else str(file)
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        s = self.what
        if self.file:
            s += f" ({self.file})"
        if self.fix:
            s += f": {self.fix}"
        return s
