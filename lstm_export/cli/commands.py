"""Transitional: `lstm_export.cli.commands` was the whole CLI; it is now split into one module
per command group. Kept only until tests/conftest.py, test_checkpoints.py and test_config.py
import `lstm_export.cli` instead (issue 12); then delete this file."""

from lstm_export.cli.entry import app, main

__all__ = ["app", "main"]
