"""`lstm-export export`: flags onto `ExportConfig`, then `model_for` and `pipeline.export`.

Every check that can fail without torch runs first (`ExportConfig.resolve`, `check_source`):
a wrong flag costs nothing. From the first slow step on, SIGTERM exits like Ctrl-C does,
through the export's own cleanup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lstm_export.cli.base import Atol, Factor, app, err, out, print_json, status
from lstm_export.config import (
    MAX_LAYERS,
    MAX_PARAMETERS,
    MAX_SIZE,
    ExportConfig,
    SizeLimits,
    read_export_config,
)
from lstm_export.errors import ParityError


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, their children, ...), from /proc; none where
    /proc cannot be read."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and fields[1].isdigit():
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) so an export cleans up its staging folder as on Ctrl-C.

    Only around `export`: `serve` handles SIGTERM itself (a graceful shutdown).
    """
    if threading.current_thread() is not threading.main_thread():  # signals are main-only
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut cleanup
        # AOTInductor's compilers (model.pt2) are our children in our process group, which
        # a SIGTERM to this process alone does not reach: they would run on, orphaned.
        for child in descendants(os.getpid()):
            with suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGTERM)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def export(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="TOML: name, checkpoint, out, fused_kernel, pt2, [model], [parity]."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="State dict of this LSTM or of torch.nn.LSTM."),
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="Features per step.")] = None,
    hidden_size: Annotated[int | None, typer.Option(help="Hidden units per layer.")] = None,
    num_layers: Annotated[int | None, typer.Option(help="Stacked layers.")] = None,
    layer_norm: Annotated[
        bool | None, typer.Option("--layer-norm/--no-layer-norm", help="LayerNorm on gates and c.")
    ] = None,
    batch_first: Annotated[
        bool | None,
        typer.Option(
            "--batch-first/--no-batch-first",
            help="x and y are [batch, seq, ...] (checkpoints never record it; default time-major).",
        ),
    ] = None,
    bidirectional: Annotated[
        bool | None,
        typer.Option(
            "--bidirectional/--no-bidirectional",
            help="Forward and reverse cells per layer (a checkpoint's keys decide; must agree).",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Model name; default the --out folder's name, else 'default'."),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Export folder; default models/<name>.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing folder.")] = False,
    fused_kernel: Annotated[
        bool | None,
        typer.Option(
            "--fused-kernel/--no-fused-kernel",
            help="LayerNorm models: also write model.fused.pt and model.fused.onnx, which run "
            "each layer in our C++ kernel, and the libraries they need (compiled on first use; "
            "model.fused.onnx needs onnxruntime's headers: LSTM_EXPORT_ORT_INCLUDE, or npm).",
        ),
    ] = None,
    pt2: Annotated[
        bool | None,
        typer.Option(
            "--pt2/--no-pt2",
            help="Also write model.pt2 (torch.export + AOTInductor, for libtorch's "
            "AOTIModelPackageLoader) and the kernel library it calls; compiling takes tens of "
            "seconds and a C++ compiler.",
        ),
    ] = None,
    atol: Atol = None,
    factor: Factor = None,
    keep_failed: Annotated[
        Path | None,
        typer.Option(
            "--keep-failed",
            help="If parity fails: write the artifacts and parity.json to this new folder.",
        ),
    ] = None,
    max_parameters: Annotated[
        int,
        typer.Option(
            min=1,
            help=f"Refuse a model of more weights (default {MAX_PARAMETERS:,}: 1 GiB of float32).",
        ),
    ] = MAX_PARAMETERS,
    max_layers: Annotated[
        int, typer.Option(min=1, help=f"Refuse more stacked layers (default {MAX_LAYERS}).")
    ] = MAX_LAYERS,
    max_size: Annotated[
        int,
        typer.Option(
            min=1, help=f"Refuse a larger input_size or hidden_size (default {MAX_SIZE:,})."
        ),
    ] = MAX_SIZE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Export model.pt (TorchScript) and model.onnx, verify their parity, write a manifest.

    With no options: the built-in default model (random weights, fixed seed) to models/default/.
    """
    settings = (read_export_config(config) if config else ExportConfig()).with_flags(
        name=name,
        checkpoint=checkpoint,
        out=out_dir,
        fused_kernel=fused_kernel,
        pt2=pt2,
        atol=atol,
        factor=factor,
    )
    settings = settings.resolve(force)  # the name, the destination, the tolerance
    if keep_failed is not None:
        from lstm_export.files import check_keep_failed  # no torch: refused at once

        check_keep_failed(keep_failed, settings.out)
    overrides = {
        key: value
        for key, value in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("layer_norm", layer_norm),
            ("batch_first", batch_first),
            ("bidirectional", bidirectional),
        )
        if value is not None
    }
    limits = SizeLimits(max_parameters, max_layers, max_size)
    settings.check_source(overrides, limits)  # a FIFO, a folder, an oversized config: no torch
    with _sigterm_exits():  # from the first slow step: SIGTERM then exits 143, cleaned up
        with status("Loading torch"):
            from lstm_export.checkpoints import model_for
            from lstm_export.pipeline import export as run_export

            model, origin, notes = model_for(settings, overrides, limits)
        with status("Exporting") as spinner:

            def progress(message: str) -> None:
                if spinner is not None:
                    spinner.update(message)

            try:
                result = run_export(
                    model,
                    settings.out,
                    name=settings.name,
                    force=force,
                    fused_kernel=settings.fused_kernel,
                    pt2=settings.pt2,
                    keep_failed=keep_failed,
                    limits=limits,
                    progress=progress,
                    **settings.tolerance(),
                )
            except ParityError as exc:
                if keep_failed is not None:
                    raise
                hint = "; rerun with --keep-failed DIR to keep the artifacts and the whole report"
                raise ParityError(f"{exc}{hint}", exc.report) from None
    for note in notes:  # after the export: a refusal stays one line
        err.print(f"[bold yellow]note[/]: {escape(note)}", highlight=False, soft_wrap=True)
    for warning in result.warnings:  # what was left out, and why; the export succeeded (exit 0)
        err.print(f"[bold yellow]warning[/]: {escape(warning)}", highlight=False, soft_wrap=True)
    if as_json:
        print_json(result.manifest)
        return
    cfg = " ".join(f"{key}={value}" for key, value in result.manifest["config"].items())
    out.print(f"[bold green]Exported[/] {settings.name} ({escape(origin)}): {cfg}")
    for artifact, entry in result.manifest["artifacts"].items():
        line = f"  {result.out_dir / artifact}  {entry['bytes']:,} bytes  ({entry['route']})"
        out.print(line, markup=False, highlight=False)
    out.print(f"[bold green]Parity passed[/]: {escape(result.report.summary())}")  # one line
    for note in result.report.notes():
        err.print(f"[bold yellow]note[/]: {escape(note)}", highlight=False, soft_wrap=True)
