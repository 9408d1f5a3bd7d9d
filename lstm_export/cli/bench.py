"""`lstm-export bench`: every backend's latency beside the anchors, as a table (and files)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lstm_export.benchmarks import DEFAULT_SHAPES
from lstm_export.cli.base import app, err, out, status
from lstm_export.cli.render import latency_table


@app.command()
def bench(
    folder: Annotated[
        Path | None,
        typer.Argument(help="Export folder; default: export the default model to a temp folder."),
    ] = None,
    shapes: Annotated[
        str, typer.Option(help="seq x batch list; ':ragged' for a padded batch of lengths seq..1.")
    ] = DEFAULT_SHAPES,
    threads: Annotated[int, typer.Option(min=1, help="Threads for torch and onnxruntime.")] = 2,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per backend and shape.")] = 15,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs first.")] = 3,
    export_timing: Annotated[
        bool, typer.Option("--export-timing/--no-export-timing", help="Time a full export too.")
    ] = True,
    cpp: Annotated[
        bool, typer.Option("--cpp/--no-cpp", help="Time libtorch from C++ if the example is built.")
    ] = True,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    plot_file: Annotated[
        Path | None, typer.Option("--plot", help="PNG of latency per shape (needs the plot extra).")
    ] = None,
) -> None:
    """Time every backend and the anchors (nn.LSTM, onnxruntime's LSTM op) side by side."""
    import tempfile

    with status("Loading torch"):
        from lstm_export.benchmarks.latency import bench as run_bench
        from lstm_export.benchmarks.latency import parse_shapes, plot, save_json

    parsed = parse_shapes(shapes)
    with tempfile.TemporaryDirectory() as tmp, status("Benchmarking") as spinner:

        def progress(message: str) -> None:
            if spinner is not None:
                spinner.update(message)

        if folder is None:
            from lstm_export.checkpoints import build_model
            from lstm_export.config import LSTMConfig
            from lstm_export.pipeline import export as run_export

            folder = run_export(build_model(LSTMConfig()), Path(tmp) / "default").out_dir
        report = run_bench(
            folder,
            parsed,
            threads=threads,
            repeats=repeats,
            warmup=warmup,
            with_export=export_timing,
            cpp=cpp,
            progress=progress,
        )
    out.print(latency_table(report))
    for note in report.notes:
        err.print(f"[bold yellow]note[/]: {escape(note)}", highlight=False, soft_wrap=True)
    out.print(f"libtorch C++: {report.cpp}", markup=False, highlight=False)
    if report.export:
        out.print(
            f"export: {report.export['seconds']} s, peak RSS {report.export['peak_rss_mib']} MiB "
            f"({report.export['includes']})"
        )
    if json_file is not None:
        save_json(report, json_file)
    if plot_file is not None:
        plot(report, plot_file)
    met = "[green]all targets met[/]" if report.targets_met else "[bold red]targets missed[/]"
    out.print(met)
