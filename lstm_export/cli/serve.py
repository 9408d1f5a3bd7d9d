"""`lstm-export serve` and `serve-bench`: the HTTP server, and a load test against it.

Whether a load test passed is the library's call (`lstm_export.benchmarks.load`); this
module only maps the options and renders the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lstm_export.cli.base import app, err, out, print_json, status
from lstm_export.cli.render import load_table
from lstm_export.serving.http.limits import ServerLimits

DEFAULT = ServerLimits()
"""The server's limits as the library sets them: each flag's default is read from here."""


@app.command()
def serve(
    folder: Annotated[Path, typer.Argument(help="An export folder or a .onnx file.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 8000,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body.")
    ] = DEFAULT.max_body_bytes,
    max_seq_len: Annotated[
        int, typer.Option(min=1, help="Most steps per request.")
    ] = DEFAULT.max_seq_len,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Most sequences per request.")
    ] = DEFAULT.max_batch,
    max_elements: Annotated[
        int, typer.Option(min=1, help="Most steps x sequences per predict or chunk.")
    ] = DEFAULT.max_elements,
    max_streams: Annotated[
        int, typer.Option(min=1, help="Most open streams.")
    ] = DEFAULT.max_streams,
    stream_ttl: Annotated[
        float, typer.Option(help="Seconds an idle stream lives.")
    ] = DEFAULT.stream_ttl,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds for a request's line and headers to arrive.")
    ] = DEFAULT.header_timeout,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds for a request's body to arrive after its headers.")
    ] = DEFAULT.body_timeout,
    write_timeout: Annotated[
        float, typer.Option(help="Seconds for an answer backed up in the server to drain.")
    ] = DEFAULT.write_timeout,
    max_connections: Annotated[
        int, typer.Option(min=1, help="Connections open at once (then 503).")
    ] = DEFAULT.max_connections,
    max_bytes_in_flight: Annotated[
        int, typer.Option(min=1, help="Request bodies plus unsent answers held (then 503).")
    ] = DEFAULT.max_bytes_in_flight,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds requests in flight get after SIGINT/SIGTERM.")
    ] = DEFAULT.shutdown_timeout,
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
    name: Annotated[
        str | None,
        typer.Option(help="The model's name under /v2 (default: the export's); as triton --name."),
    ] = None,
    expose_state: Annotated[
        bool,
        typer.Option(
            "--expose-state",
            help="List hn and cn among /v2's outputs, as triton --expose-state does.",
        ),
    ] = False,
    fused_kernel: Annotated[
        bool,
        typer.Option(
            "--fused-kernel",
            help="Serve model.fused.onnx (export --fused-kernel; the fused kernel's op, "
            "our own build of its library) instead of model.onnx.",
        ),
    ] = False,
) -> None:
    """Serve an export over HTTP: our /v1 JSON API and the Open Inference Protocol (/v2, as
    Triton speaks it) side by side (needs the serve extra); Ctrl+C stops it."""
    from lstm_export.serving.http import serve as run_serve

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
        name=name,
        expose_state=expose_state,
        fused_kernel=fused_kernel,
    )


@app.command("serve-bench")
def serve_bench(
    folder: Annotated[Path, typer.Argument(help="An export folder.")],
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients.")] = 8,
    requests: Annotated[int, typer.Option(min=1, help="Requests per client, per API.")] = 50,
    seq: Annotated[int, typer.Option(min=1, help="Steps per request.")] = 20,
    batch: Annotated[int, typer.Option(min=1, help="Sequences per predict (stream steps: 1).")] = 4,
    stream_fraction: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Share of each client's requests that are stream steps."
        ),
    ] = 0.5,
    apis: Annotated[
        str,
        typer.Option(
            help="APIs to load, one after the other on one server, the first the baseline: "
            "v1 (JSON), v2-json, v2-binary (Open Inference Protocol tensors), comma-separated."
        ),
    ] = "v1,v2-json,v2-binary",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Start `serve` once on a free loopback port and load it with one workload per API (/v1
    JSON, /v2 JSON tensors, /v2 binary tensors): requests/s, p50/p99 latency and errors side
    by side, with ratios against the first.

    Exit code 1 when every request failed, or every request to one API: a run that measured
    nothing must not pass in CI.
    """
    from lstm_export.benchmarks.load import (
        all_failed,
        checked_apis,
        error_lines,
        first_error_reason,
        serve_and_load_test,
    )

    chosen = checked_apis([name.strip() for name in apis.split(",")])
    with status("Serving and loading"):
        report = serve_and_load_test(
            folder,
            clients=clients,
            requests=requests,
            seq=seq,
            batch=batch,
            stream_fraction=stream_fraction,
            apis=chosen,
        )
    failed = all_failed(report)
    # A side of the comparison that measured nothing fails the run too.
    empty = [api for api, run in report["runs"].items() if all_failed(run)]
    if as_json:
        print_json(report)
    else:
        out.print(load_table(report))
        for note in report["notes"]:
            err.print(f"[bold yellow]note[/]: {escape(note)}", highlight=False, soft_wrap=True)
    for line in error_lines(report):  # each API's errors, whether or not all failed
        err.print(escape(line), highlight=False, soft_wrap=True)
    if failed:
        err.print(
            f"[bold red]error[/]: every request failed ({report['errors']} of "
            f"{report['requests']}); {escape(first_error_reason(report))}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    if empty:
        err.print(
            f"[bold red]error[/]: every request to {escape(', '.join(empty))} failed; "
            "a comparison with a side that measured nothing does not pass",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
