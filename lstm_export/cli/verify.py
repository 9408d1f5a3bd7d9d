"""`lstm-export verify`, `inspect` and `cpp-check`: read an export, check or show it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lstm_export.cli.base import Atol, Factor, app, out, print_json, status, tolerance
from lstm_export.cli.render import parity_table, print_inspection
from lstm_export.config import printable


@app.command()
def verify(
    folder: Annotated[Path, typer.Argument(help="An export folder.")],
    atol: Atol = None,
    factor: Factor = None,
    every_case: Annotated[
        bool, typer.Option("--all", help="One row per backend and case, not just the worst.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Re-run the parity matrix on an export folder and check what its manifest claims
    (hashes, config, name); exit code 1 on any breach, 2 if it cannot be read as an export."""
    with status("Verifying parity"):
        from lstm_export.verification.folder import verify as run_verify

        report = run_verify(folder, **tolerance(atol, factor))
    if as_json:
        print_json(report.to_dict())
    else:
        if not out.is_terminal and out.width < 100:  # rich pipes 80 columns; the table needs 100
            out.width = 100
        out.print(parity_table(report, every_case))
        for problem in report.problems:  # may quote the manifest: escaped
            out.print(f"[bold red]problem[/]: {escape(printable(problem))}")
        for note in report.notes():  # prose: wrapped to the table's width, unlike paths
            out.print(f"[bold yellow]note[/]: {escape(printable(note))}", soft_wrap=False)
    given = "".join(f" --{k} {v:g}" for k, v in tolerance(atol, factor).items())
    report.raise_if_failed(
        str(folder), f"run `lstm-export verify {folder}{given} --json` for the whole table"
    )
    if not as_json:
        out.print(
            f"[bold green]Parity passed[/]: {escape(report.summary())}", soft_wrap=False
        )  # prose: wrapped like the notes


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A model.pt, a model.onnx or an export folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show config, signature, opset and sizes of an artifact or export folder."""
    from lstm_export.inspection import inspect as run_inspect

    info = run_inspect(path)
    if as_json:
        print_json(info)
        return
    print_inspection(out, info)


@app.command("cpp-check")
def cpp_check(
    folder: Annotated[Path, typer.Argument(help="An export folder (or its model.pt).")],
    build_dir: Annotated[
        Path | None, typer.Option(help="Build folder; default ~/.cache/lstm-export/cpp-<torch>.")
    ] = None,
    atol: Atol = None,
    factor: Factor = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Build the libtorch C++ example once, run model.pt in C++ and hold it to the parity rule."""
    with status("Building the C++ example and comparing"):
        from lstm_export.verification.cpp import cpp_check as run_cpp_check

        report = run_cpp_check(folder, build_dir=build_dir, **tolerance(atol, factor))
    if as_json:
        print_json(report.to_dict())
    else:
        for line in report.lines():
            out.print(line, markup=False, highlight=False)
    report.raise_if_failed()
