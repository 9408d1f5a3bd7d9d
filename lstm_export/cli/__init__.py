"""The `lstm-export` command: a thin typer layer over the library (nothing imports it).

One module per command group (export, verify, triton, serve, bench), each only mapping
options onto a library call and rendering its result; `base` holds what they share,
`render` the tables, `entry` the console-script `main()` and its exit codes.
"""

from lstm_export.cli.entry import app, main

__all__ = ["app", "main"]
