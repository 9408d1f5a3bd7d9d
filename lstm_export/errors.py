"""The errors lstm-export raises on purpose; the CLI turns them into one line and an exit code."""

from __future__ import annotations


class LSTMExportError(Exception):
    """Base class: anything the user can fix from the message alone."""

    exit_code = 2


class UsageError(LSTMExportError, ValueError):
    """Bad input: a wrong flag, file, shape or checkpoint (exit code 2)."""


class ParityError(LSTMExportError):
    """An export whose backends disagree beyond the tolerance (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message, for a one-line error quoting a library's
    failure; `default` (else the exception's type name) when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else default or type(exc).__name__
