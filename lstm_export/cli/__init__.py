"""The `lstm-export` command: a thin typer layer over the library (nothing imports it)."""

from lstm_export.cli.commands import app, main

__all__ = ["app", "main"]
