"""The console-script entry, `main()`: every command group registered on the app, and every
error turned into one line on stderr and an exit code, never a traceback.

2: bad input (ours, click's usage errors, an OSError about a path); 1: a parity breach;
3: anything else, a bug, with a hint to rerun with --debug for the traceback.
"""

from __future__ import annotations

import sys
import traceback
from typing import NoReturn

import typer
from rich.markup import escape

from lstm_export.cli.base import PROG, app, debug, debug_from_environment, err
from lstm_export.config import printable
from lstm_export.errors import LSTMExportError, UsageError

# isort: off
# Importing a command module registers its commands, in the order `--help` lists them.
import lstm_export.cli.export
import lstm_export.cli.verify
import lstm_export.cli.triton
import lstm_export.cli.serve
import lstm_export.cli.bench  # noqa: F401
# isort: on

MAX_ERROR_LINE = 2000
INTERNAL_ERROR = 3
"""Exit code of a bug of ours, kept apart from 1 (a parity breach) and 2 (bad input)."""
INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
TERMINATED = 143  # 128 + SIGTERM


def main() -> None:
    """Console-script entry point: every error becomes one line and an exit code."""
    debug["on"] = debug_from_environment()  # until the options are parsed
    try:
        code = app(prog_name=PROG, standalone_mode=False)
    except LSTMExportError as exc:
        _fail(str(exc), exc.exit_code, exc)
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave
            _internal(exc)
        _fail(_os_error_line(exc), UsageError.exit_code, exc)
    except (typer.Abort, KeyboardInterrupt) as exc:
        _interrupted(exc)
    except SystemExit as exc:
        if exc.code == TERMINATED:
            _fail("terminated (SIGTERM); the export cleaned up after itself", TERMINATED)
        raise
    except typer.TyperException as exc:  # click's usage errors (typer vendors click)
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already shown (typer's test)
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path if ctx is not None else PROG} --help)"
        _fail(exc.format_message() + hint, exc.exit_code, exc)
    except Exception as exc:  # a bug of ours: one line, the traceback on request
        if _out_of_memory(exc):
            _fail(
                f"out of memory: {_one_line(exc)}; a smaller model or more memory is needed",
                UsageError.exit_code,
                exc,
            )
        _internal(exc)
    if code == INTERRUPTED:  # typer turns Ctrl-C into exit code 130 itself, silently
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int, exc: BaseException | None = None) -> NoReturn:
    """One line on stderr and the exit code: the whole error report, no traceback, no box
    (with --debug, the traceback first)."""
    if exc is not None and debug["on"]:
        traceback.print_exception(exc)
    line = printable(" ".join(message.split()), MAX_ERROR_LINE)  # short, even quoting a file
    err.print(f"[bold red]error[/]: {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _os_error_line(exc: OSError) -> str:
    """An OSError about a path the user gave (too long, a full disk, no permission)."""
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {exc.strerror or exc}"


def _interrupted(exc: BaseException | None = None) -> NoReturn:
    """Ctrl-C, whether typer turned it into exit code 130 or it reached us as an exception."""
    _fail("interrupted (Ctrl-C)", INTERRUPTED, exc)


def _one_line(exc: BaseException) -> str:
    """The whole message on one line, clipped: a bug's second line may be the telling one
    (`errors.first_line` keeps only the first, for quoting a library's error)."""
    return " ".join(str(exc).split())[:300]


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or libtorch's allocator failing (a RuntimeError): limits raised too far."""
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


def _internal(exc: BaseException) -> NoReturn:
    _fail(
        f"internal error: {type(exc).__name__}: {_one_line(exc)}; this is a bug in lstm-export: "
        f"rerun with `{PROG} --debug ...` for the traceback and report it",
        INTERNAL_ERROR,
        exc,
    )
