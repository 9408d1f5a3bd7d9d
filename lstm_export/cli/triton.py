"""`lstm-export triton`: an export folder into a Triton model repository, validated."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lstm_export.cli.base import Atol, Factor, app, out, print_json, status, tolerance


@app.command()
def triton(
    folder: Annotated[Path, typer.Argument(help="An export folder.")],
    repo: Annotated[
        Path, typer.Option(help="Triton model repository (never an export folder).")
    ] = Path("triton_models"),
    name: Annotated[str | None, typer.Option(help="Model name; default the manifest's.")] = None,
    max_batch_size: Annotated[int, typer.Option(help="Streams batched per execution.")] = 64,
    expose_state: Annotated[
        bool, typer.Option("--expose-state", help="Also list hn/cn as outputs.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model.")] = False,
    atol: Atol = None,
    factor: Factor = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the validation summary.")] = False,
    fused_kernel: Annotated[
        bool,
        typer.Option(
            "--fused-kernel",
            help="Serve model.fused.onnx (export --fused-kernel) and ship its op library; "
            "Triton then needs that library, model.onnx runs anywhere.",
        ),
    ] = False,
) -> None:
    """Write a Triton model repository (onnxruntime backend, sequence batcher keeping h/c).

    <repo>/<name>/config.pbtxt and 1/model.onnx (batch-first), validated with
    tritonclient's ModelConfig against the graph. A bidirectional model is refused: a
    stream cannot run backwards from an end it has not seen. With --fused-kernel, 1/model.onnx
    is model.fused.onnx's batch-first graph and liblstm_export_ort_ops.so ships beside
    config.pbtxt, which names it (model_operations).
    """
    with status("Writing the Triton model"):
        from lstm_export.serving.triton import validate_triton_repo, write_triton_repo

        model_dir = write_triton_repo(
            folder,
            repo,
            name,
            max_batch_size=max_batch_size,
            force=force,
            expose_state=expose_state,
            fused_kernel=fused_kernel,
            **tolerance(atol, factor),
        )
        summary = validate_triton_repo(model_dir)
    if as_json:
        print_json(summary)
        return
    graph = "model.fused.onnx's batch-first graph" if fused_kernel else "batch-first"
    library = " and its op library" if fused_kernel else ""
    out.print(
        f"[bold green]Wrote[/] {escape(str(model_dir))}: config.pbtxt, "
        f"1/model.onnx ({graph}){library}, validated against tritonclient's ModelConfig"
    )
