"""The `lstm-export` command: a thin typer layer over the library.

Nothing heavy is imported at module level: `lstm-export --help` must not pay
for torch. Errors the user can fix are one line on stderr with exit code 2
(1 for a parity breach), never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperArgument, TyperCommand

from lstm_export import __version__
from lstm_export.artifacts import ATOL, FACTOR
from lstm_export.config import (
    DEFAULT_LIMITS,
    MAX_LAYERS,
    MAX_PARAMETERS,
    MAX_SIZE,
    ExportConfig,
    LSTMConfig,
    SizeLimits,
    check_size,
    printable,
    read_export_config,
)
from lstm_export.errors import LSTMExportError, ParityError, UsageError

PROG = "lstm-export"

app = typer.Typer(
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


def _tolerance(atol: float | None, factor: float | None) -> dict[str, float]:
    """The parity keywords a library call takes, for the options that were given."""
    return {k: v for k, v in (("atol", atol), ("factor", factor)) if v is not None}


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
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _status(message: str) -> AbstractContextManager:
    """A spinner on an interactive stderr; nothing when piped (CI logs stay clean)."""
    return err.status(message) if err.is_terminal else nullcontext()


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")


def _version(value: bool) -> None:
    if value:
        out.print(f"lstm-export {__version__}")
        raise typer.Exit()


# Set by --debug (or LSTM_EXPORT_DEBUG=1): an error shows its traceback before its line.
_debug = {"on": False}


def _debug_from_environment() -> bool:
    return os.environ.get("LSTM_EXPORT_DEBUG", "") not in ("", "0")


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show an error's traceback before its one line.")
    ] = False,
) -> None:
    """Export a scratch PyTorch LSTM to TorchScript and ONNX, with proven parity."""
    _debug["on"] = debug or _debug_from_environment()


def _resolve_model(
    file_config: ExportConfig,
    checkpoint: Path | None,
    overrides: dict[str, Any],
    limits: SizeLimits = DEFAULT_LIMITS,
) -> tuple[Any, str]:
    """config -> model: from a checkpoint (sizes read off it) or random from a fixed seed.

    Either way the size is checked against `limits` before a model is built; for random
    weights even before torch is imported, so an oversized config is refused at once.
    """
    if checkpoint is None:
        base = file_config.model or LSTMConfig()
        config = LSTMConfig(**{**base.to_dict(), **overrides})
        check_size(config, limits)
    from lstm_export.checkpoints import build_model, model_from_state_dict, read_checkpoint

    if checkpoint is not None:
        state, inferred = read_checkpoint(checkpoint, limits)
        base = file_config.model or inferred
        config = LSTMConfig(**{**base.to_dict(), **overrides})
        model = model_from_state_dict(state, config, f"checkpoint {checkpoint}", limits)
        return model, f"checkpoint {checkpoint}"
    return build_model(config, limits=limits), "random weights (seed 0)"


@app.command()
def export(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="TOML: name, checkpoint, out, fused_kernel, [model], [parity]."
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
            help="LayerNorm models: also write model.fused.pt, which runs each layer in our "
            "C++ kernel, and lstm_export_kernels.so it needs (compiled on first use).",
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
    from lstm_export.artifacts import check_model_name

    file_config = read_export_config(config) if config else ExportConfig()
    name = file_config.name if name is None else name
    if name is not None:
        check_model_name(name, "--name")
    overrides = {
        key: value
        for key, value in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("layer_norm", layer_norm),
        )
        if value is not None
    }
    file_config = replace(file_config, checkpoint=checkpoint or file_config.checkpoint)
    destination = out_dir or file_config.out or Path("models") / (name or "default")
    from lstm_export.files import check_destination

    checkpoint_path = file_config.checkpoint
    if checkpoint_path is not None and destination.resolve() in checkpoint_path.resolve().parents:
        raise UsageError(
            f"the checkpoint {checkpoint_path} is inside --out {destination}, which the "
            "export would replace; export to another folder"
        )
    check_destination(destination, force)  # fail before any slow work
    # Without a name the export is called after its folder, as the library's export() does.
    if name is None:
        name = check_model_name(
            destination.resolve().name, f"the model name (from --out {destination}; or pass --name)"
        )
    tolerance = {
        **_tolerance(file_config.atol, file_config.factor),
        **_tolerance(atol, factor),
    }
    from lstm_export.verification.parity import Tolerance

    Tolerance(**tolerance)  # a bad value is refused before any slow work
    if keep_failed is not None:
        from lstm_export.pipeline import check_keep_failed

        check_keep_failed(keep_failed, destination)

    if file_config.checkpoint is not None:  # a FIFO or a folder: said before torch loads
        from lstm_export.files import check_regular_file

        check_regular_file(file_config.checkpoint, "checkpoint", allow_empty=True)
    with _sigterm_exits():  # from the first slow step: SIGTERM then exits 143, cleaned up
        with _status("Loading torch"):
            limits = SizeLimits(max_parameters, max_layers, max_size)
            model, origin = _resolve_model(file_config, file_config.checkpoint, overrides, limits)
            from lstm_export.pipeline import export as run_export
        with _status("Exporting") as status:

            def progress(message: str) -> None:
                if status is not None:
                    status.update(message)

            try:
                result = run_export(
                    model,
                    destination,
                    name=name,
                    force=force,
                    fused_kernel=file_config.fused_kernel if fused_kernel is None else fused_kernel,
                    keep_failed=keep_failed,
                    limits=limits,
                    progress=progress,
                    **tolerance,
                )
            except ParityError as exc:
                if keep_failed is not None:
                    raise
                hint = "; rerun with --keep-failed DIR to keep the artifacts and the whole report"
                raise ParityError(f"{exc}{hint}", exc.report) from None
    if as_json:
        _print_json(result.manifest)
        return
    cfg = result.manifest["config"]
    out.print(
        f"[bold green]Exported[/] {name} ({escape(origin)}): input_size={cfg['input_size']} "
        f"hidden_size={cfg['hidden_size']} num_layers={cfg['num_layers']} "
        f"layer_norm={cfg['layer_norm']}"
    )
    for artifact, entry in result.manifest["artifacts"].items():
        line = f"  {result.out_dir / artifact}  {entry['bytes']:,} bytes  ({entry['route']})"
        out.print(line, markup=False, highlight=False)
    out.print(f"[bold green]Parity passed[/]: {escape(result.report.summary())}")
    for note in result.report.notes():
        err.print(f"[bold yellow]note[/]: {escape(note)}", highlight=False, soft_wrap=True)


def _report_table(report: Any, every_case: bool) -> Table:
    """Each backend's worst case (every case with `every_case`); fits 100 columns."""
    from lstm_export.verification.parity import RULE

    which = "every case" if every_case else "each backend's worst case"
    table = Table(
        title=f"Parity vs eager float64, {which}\npass: {RULE}; {report.tolerance}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in ("backend", "case", "out", "error", "allowed", "floor", "result"):
        numeric = column in ("error", "allowed", "floor")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=True)
    rows = report.results if every_case else report.worst_by_backend()
    for result in rows:
        o = result.worst_output
        verdict = "[green]ok[/]" if result.passed else "[bold red]FAIL[/]"
        numbers = (f"{v[o]:.1e}" for v in (result.error, result.allowed, result.floor))
        table.add_row(escape(result.backend), result.case, o, *numbers, verdict)
    return table


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
    with _status("Verifying parity"):
        from lstm_export.verification.folder import verify as run_verify

        report = run_verify(folder, **_tolerance(atol, factor))
    if as_json:
        _print_json(report.to_dict())
    else:
        if not out.is_terminal and out.width < 100:  # rich pipes 80 columns; the table needs 100
            out.width = 100
        out.print(_report_table(report, every_case))
        for problem in report.problems:  # may quote the manifest: escaped
            out.print(f"[bold red]problem[/]: {escape(printable(problem))}")
        for note in report.notes():  # prose: wrapped to the table's width, unlike paths
            out.print(f"[bold yellow]note[/]: {escape(printable(note))}", soft_wrap=False)
    given = "".join(f" --{k} {v:g}" for k, v in _tolerance(atol, factor).items())
    report.raise_if_failed(
        str(folder), f"run `lstm-export verify {folder}{given} --json` for the whole table"
    )
    if not as_json:
        out.print(f"[bold green]Parity passed[/]: {escape(report.summary())}")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A model.pt, a model.onnx or an export folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show config, signature, opset and sizes of an artifact or export folder."""
    from lstm_export.inspection import inspect as run_inspect

    info = run_inspect(path)
    if as_json:
        _print_json(info)
        return
    described = info["files"].values() if info["kind"] == "export folder" else [info]
    if "manifest" in info:  # a record anyone could have written: labelled, clipped, escaped
        manifest = info["manifest"]
        out.print(f"[bold]{escape(info['path'])}[/]: export folder; its manifest.json says")
        out.print(f"  ({manifest['note']}):", markup=False, highlight=False)
        for key in ("name", "config", "parity", "versions"):
            value = manifest.get(key)
            text = printable(repr(value) if isinstance(value, str) else str(value))
            text = text if len(text) <= 300 else text[:297] + "..."
            label = "parity at export" if key == "parity" else key
            out.print(f"  {label} (recorded): {text}", markup=False, highlight=False)
        for warning in manifest["warnings"]:
            out.print(f"[bold yellow]warning[/]: {escape(printable(warning))}", highlight=False)
    for entry in described:
        table = Table(title=f"{entry['path']} ({entry['kind']})", show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value")
        for key, value in entry.items():
            if key in ("path", "kind"):
                continue
            if key == "signature":
                for direction, values in value.items():
                    for tensor, spec in values.items():
                        shape = ", ".join(map(str, spec["shape"]))
                        table.add_row(
                            f"{direction[:-1]} {tensor}", escape(f"[{shape}] {spec['dtype']}")
                        )
                continue
            text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
            table.add_row(key, escape(str(text)))
        out.print(table)


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
    with _status("Building the C++ example and comparing"):
        from lstm_export.runtime.cpp import cpp_check as run_cpp_check

        report = run_cpp_check(folder, build_dir=build_dir, **_tolerance(atol, factor))
    if as_json:
        _print_json(report.to_dict())
    else:
        for line in report.lines():
            out.print(line, markup=False, highlight=False)
    report.raise_if_failed()


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
) -> None:
    """Write a Triton model repository (onnxruntime backend, sequence batcher keeping h/c).

    <repo>/<name>/config.pbtxt and 1/model.onnx (batch-first), validated with
    tritonclient's ModelConfig against the graph.
    """
    with _status("Writing the Triton model"):
        from lstm_export.serving.triton import validate_triton_repo, write_triton_repo

        model_dir = write_triton_repo(
            folder,
            repo,
            name,
            max_batch_size=max_batch_size,
            force=force,
            expose_state=expose_state,
            **_tolerance(atol, factor),
        )
        summary = validate_triton_repo(model_dir)
    if as_json:
        _print_json(summary)
        return
    out.print(
        f"[bold green]Wrote[/] {escape(str(model_dir))}: config.pbtxt and "
        f"1/model.onnx (batch-first), validated against tritonclient's ModelConfig"
    )


@app.command()
def serve(
    folder: Annotated[Path, typer.Argument(help="An export folder or a .onnx file.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 8000,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body.")] = 8 << 20,
    max_seq_len: Annotated[int, typer.Option(min=1, help="Most steps per request.")] = 4096,
    max_batch: Annotated[int, typer.Option(min=1, help="Most sequences per request.")] = 64,
    max_elements: Annotated[
        int, typer.Option(min=1, help="Most steps x sequences per predict or chunk.")
    ] = 8192,
    max_streams: Annotated[int, typer.Option(min=1, help="Most open streams.")] = 256,
    stream_ttl: Annotated[float, typer.Option(help="Seconds an idle stream lives.")] = 300.0,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds for a request's line and headers to arrive.")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds for a request's body to arrive after its headers.")
    ] = 30.0,
    write_timeout: Annotated[
        float, typer.Option(help="Seconds for an answer backed up in the server to drain.")
    ] = 30.0,
    max_connections: Annotated[
        int, typer.Option(min=1, help="Connections open at once (then 503).")
    ] = 256,
    max_bytes_in_flight: Annotated[
        int, typer.Option(min=1, help="Request bodies plus unsent answers held (then 503).")
    ] = 256 << 20,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds requests in flight get after SIGINT/SIGTERM.")
    ] = 1.0,
    threads: Annotated[
        int, typer.Option(min=1, help="onnxruntime threads per request; at most CPU count.")
    ] = 1,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Requests computed at once; default CPU count, at most 4x."),
    ] = None,
    optimization: Annotated[
        str, typer.Option(help="Graph optimization: disable, basic, extended, all.")
    ] = "all",
    log_level: Annotated[str, typer.Option(help="critical ... debug, trace.")] = "info",
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="Log every request.")
    ] = True,
) -> None:
    """Serve an export over HTTP, JSON in and out (needs the serve extra); Ctrl+C stops it."""
    from lstm_export.serving.http.server import ServerLimits
    from lstm_export.serving.http.server import serve as run_serve

    limits = ServerLimits(
        max_body_bytes=max_body_bytes,
        max_seq_len=max_seq_len,
        max_batch=max_batch,
        max_elements=max_elements,
        max_streams=max_streams,
        stream_ttl=stream_ttl,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        write_timeout=write_timeout,
        max_connections=max_connections,
        max_bytes_in_flight=max_bytes_in_flight,
        shutdown_timeout=shutdown_timeout,
    )
    run_serve(
        folder,
        host,
        port,
        limits,
        threads=threads,
        workers=workers,
        optimization=optimization,
        log_level=log_level,
        access_log=access_log,
    )


@app.command("serve-bench")
def serve_bench(
    folder: Annotated[Path, typer.Argument(help="An export folder.")],
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients.")] = 8,
    requests: Annotated[int, typer.Option(min=1, help="Requests per client.")] = 50,
    seq: Annotated[int, typer.Option(min=1, help="Steps per request.")] = 20,
    batch: Annotated[int, typer.Option(min=1, help="Sequences per request.")] = 4,
    stream_fraction: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Share of each client's requests that are stream steps."
        ),
    ] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Start `serve` on a free loopback port, load it, report requests/s and p50/p99 latency.

    Exit code 1 when every request failed: a run that measured nothing must not pass in CI.
    """
    from lstm_export.serving.http.server import serve_and_load_test

    with _status("Serving and loading"):
        report = serve_and_load_test(
            folder,
            clients=clients,
            requests=requests,
            seq=seq,
            batch=batch,
            stream_fraction=stream_fraction,
        )
    first = report["first_error"]
    reason = "" if first is None else f"the first answered {first['status']}: {first['error']}"
    all_failed = report["requests"] > 0 and report["errors"] == report["requests"]
    if as_json:
        _print_json(report)
    else:
        table = Table(
            title=f"HTTP on loopback: {clients} clients x {requests} requests, "
            f"seq {seq}, batch {batch}, {report['requests_per_s']:.0f} requests/s, "
            f"{report['errors']} errors"
        )
        for column in ("kind", "count", "p50 ms", "p99 ms", "mean ms"):
            table.add_column(column, justify="left" if column == "kind" else "right")
        for kind in ("predict", "stream_step"):
            row = report[kind]
            cells = [row.get(k) for k in ("p50_ms", "p99_ms", "mean_ms")]
            shown = ["-" if v is None else f"{v:.2f}" for v in cells]
            table.add_row(kind, str(row["count"]), *shown)
        out.print(table)
        if first is not None and not all_failed:
            err.print(
                f"{report['errors']} errors; {escape(reason)}", highlight=False, soft_wrap=True
            )
    if all_failed:
        err.print(
            f"[bold red]error[/]: every request failed ({report['errors']} of "
            f"{report['requests']}); {escape(reason)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


def _bench_table(report: Any) -> Table:
    from lstm_export.benchmarks.latency import ROUNDS

    table = Table(
        title=f"Median latency, {report.threads} threads, {report.repeats} repeats "
        f"in {ROUNDS} rounds (config {report.config})"
    )
    for column in ("shape", "backend", "median ms", "p10-p90 ms", "x best anchor", "target"):
        table.add_column(
            column, justify="left" if column in ("shape", "backend", "target") else "right"
        )
    for t in report.timings:
        target = ""
        if t.target is not None:
            mark = "[green]ok[/]" if t.meets_target else "[bold red]MISSED[/]"
            target = f"{t.target_ratio:.2f}x ({t.target}) {mark}"
        table.add_row(
            f"{t.seq}x{t.batch}",
            t.backend,
            f"{t.median_ms:.2f}",
            f"{t.p10_ms:.2f}-{t.p90_ms:.2f}",
            f"{t.ratio_to_best_anchor:.2f}",
            target,
        )
    return table


@app.command()
def bench(
    folder: Annotated[
        Path | None,
        typer.Argument(help="Export folder; default: export the default model to a temp folder."),
    ] = None,
    shapes: Annotated[str, typer.Option(help="seq x batch list.")] = "100x1,100x16,500x4",
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

    with _status("Loading torch"):
        from lstm_export.benchmarks.latency import bench as run_bench
        from lstm_export.benchmarks.latency import parse_shapes, plot, save_json

    parsed = parse_shapes(shapes)
    with tempfile.TemporaryDirectory() as tmp, _status("Benchmarking") as status:

        def progress(message: str) -> None:
            if status is not None:
                status.update(message)

        if folder is None:
            from lstm_export.checkpoints import build_model
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
    out.print(_bench_table(report))
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


class _Command(TyperCommand):
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


for _info in app.registered_commands:  # every command, without touching each decorator
    if _info.cls in (None, TyperCommand):
        _info.cls = _Command


def _fail(message: str, code: int, exc: BaseException | None = None) -> NoReturn:
    """One line on stderr and the exit code: the whole error report, no traceback, no box
    (with --debug, the traceback first)."""
    if exc is not None and _debug["on"]:
        traceback.print_exception(exc)
    line = printable(" ".join(message.split()), MAX_ERROR_LINE)  # short, even quoting a file
    err.print(f"[bold red]error[/]: {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(code)


MAX_ERROR_LINE = 2000
INTERNAL_ERROR = 3
"""Exit code of a bug of ours, kept apart from 1 (a parity breach) and 2 (bad input)."""
INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
TERMINATED = 143  # 128 + SIGTERM


def _os_error_line(exc: OSError) -> str:
    """An OSError about a path the user gave (too long, a full disk, no permission)."""
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {exc.strerror or exc}"


def main() -> None:
    """Console-script entry point: every error becomes one line and an exit code.

    2: bad input (ours, click's usage errors, an OSError about a path); 1: a parity breach;
    3: anything else, a bug, with a hint to rerun with --debug for the traceback.
    """
    _debug["on"] = _debug_from_environment()  # until the options are parsed
    try:
        code = app(prog_name=PROG, standalone_mode=False)
    except LSTMExportError as exc:
        _fail(str(exc), exc.exit_code, exc)
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave
            _internal(exc)
        _fail(_os_error_line(exc), UsageError.exit_code, exc)
    except (typer.Abort, KeyboardInterrupt) as exc:
        _interrupted(exc)
    except SystemExit as exc:
        if exc.code == TERMINATED:
            _fail("terminated (SIGTERM); the export cleaned up after itself", TERMINATED)
        raise
    except typer.TyperException as exc:  # click's usage errors (typer vendors click)
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already shown (typer's test)
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path if ctx is not None else PROG} --help)"
        _fail(exc.format_message() + hint, exc.exit_code, exc)
    except Exception as exc:  # a bug of ours: one line, the traceback on request
        if _out_of_memory(exc):
            _fail(
                f"out of memory: {_first_line(exc)}; a smaller model or more memory is needed",
                UsageError.exit_code,
                exc,
            )
        _internal(exc)
    if code == INTERRUPTED:  # typer turns Ctrl-C into exit code 130 itself, silently
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


def _interrupted(exc: BaseException | None = None) -> NoReturn:
    """Ctrl-C, whether typer turned it into exit code 130 or it reached us as an exception."""
    _fail("interrupted (Ctrl-C)", INTERRUPTED, exc)


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or libtorch's allocator failing (a RuntimeError): limits raised too far."""
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


def _internal(exc: BaseException) -> NoReturn:
    _fail(
        f"internal error: {type(exc).__name__}: {_first_line(exc)}; this is a bug in lstm-export: "
        f"rerun with `{PROG} --debug ...` for the traceback and report it",
        INTERNAL_ERROR,
        exc,
    )


if __name__ == "__main__":
    main()
