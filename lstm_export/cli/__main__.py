"""`python -m lstm_export.cli`: the same as the `lstm-export` command."""

from lstm_export.cli.entry import main

main()
