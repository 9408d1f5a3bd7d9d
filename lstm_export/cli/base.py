"""What every command group shares: the typer app, the two consoles, the parity options.

Nothing heavy is imported here or in any command module at import time: `lstm-export
--help` must not pay for torch. Each command imports the library inside its body.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperCommand

from lstm_export import __version__
from lstm_export.artifacts import ATOL, FACTOR

PROG = "lstm-export"


class Command(TyperCommand):
    """Usage lines spell arguments the usual way, `verify [OPTIONS] FOLDER`, not `{folder}`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not isinstance(param, TyperArgument):
                pieces.extend(param.get_usage_pieces(ctx))
                continue
            piece = (param.metavar or param.name or "").upper()
            piece = piece if param.required else f"[{piece}]"
            pieces.append(piece + ("..." if param.nargs != 1 else ""))
        return pieces


class _Typer(typer.Typer):
    """A typer app whose commands are all `Command`s, without touching each decorator."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or Command, **kwargs)


app = _Typer(
    help="Export a scratch PyTorch LSTM to TorchScript and ONNX, with proven parity.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # click's plain help: rich's help renderer alone costs ~0.2 s
)
out = Console(soft_wrap=True)  # long paths stay whole when piped
err = Console(stderr=True)

# The parity rule's two numbers, the same on every command that checks parity; the defaults
# live in lstm_export.artifacts (None here: "not given", so a TOML value is not overridden).
Atol = Annotated[
    float | None,
    typer.Option(
        "--atol",
        help=f"Parity: absolute error always allowed (default {ATOL:g}); see README 'Parity'.",
    ),
]
Factor = Annotated[
    float | None,
    typer.Option(
        "--factor",
        help=f"Parity: allow this many times the case's float32 floor (default {FACTOR:g}).",
    ),
]


def tolerance(atol: float | None, factor: float | None) -> dict[str, float]:
    """The parity keywords a library call takes, for the options that were given."""
    return {k: v for k, v in (("atol", atol), ("factor", factor)) if v is not None}


def status(message: str) -> AbstractContextManager:
    """A spinner on an interactive stderr; nothing when piped (CI logs stay clean)."""
    return err.status(message) if err.is_terminal else nullcontext()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")


# Set by --debug (or LSTM_EXPORT_DEBUG=1): an error shows its traceback before its line.
debug = {"on": False}


def debug_from_environment() -> bool:
    return os.environ.get("LSTM_EXPORT_DEBUG", "") not in ("", "0")


def _version(value: bool) -> None:
    if value:
        out.print(f"lstm-export {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    debug_option: Annotated[
        bool, typer.Option("--debug", help="Show an error's traceback before its one line.")
    ] = False,
) -> None:
    """Export a scratch PyTorch LSTM to TorchScript and ONNX, with proven parity."""
    debug["on"] = debug_option or debug_from_environment()
