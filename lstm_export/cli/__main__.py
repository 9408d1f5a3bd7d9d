"""`python -m lstm_export.cli`: the same as the `lstm-export` command."""

from lstm_export.cli.commands import main

main()
