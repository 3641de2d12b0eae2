"""UserError: a mistake the user can fix, reported as one line and never as a traceback.

Internal bugs keep raising ordinary exceptions; only this class is caught by the CLI (exit code 2).
"""
from __future__ import annotations


class UserError(Exception):
    """`file:line:column: field: what is wrong; fix` — every part optional except `what`."""

    def __init__(self, what: str, fix: str = "", *, file: str | None = None,
                 line: int | None = None, column: int | None = None, field: str | None = None):
        self.what, self.fix = what, fix
        self.file, self.line, self.column, self.field = file, line, column, field
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ":".join(str(p) for p in (self.file, self.line, self.column) if p is not None)
        parts = [p for p in (where, self.field) if p]
        text = self.what.rstrip(".")
        if self.fix:
            text += f"; fix: {self.fix.rstrip('.')}"
        # Collapse any newline a caller let through: the contract is one line.
        return " ".join((": ".join(parts + [text])).split())

    def at(self, file: str | None, line: int | None = None, column: int | None = None,
           field: str | None = None) -> "UserError":
        """The same error with a location filled in (keeps a location already set)."""
        return UserError(self.what, self.fix, file=self.file or file,
                         line=self.line if self.line is not None else line,
                         column=self.column if self.column is not None else column,
                         field=self.field or field)
