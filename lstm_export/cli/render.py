"""The commands' tables: a library result in, rich output out, no decisions of their own.

Text that comes from files (a manifest, a checkpoint's keys) is escaped for rich markup
and has its control characters shown (`printable`): it must not restyle the terminal.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lstm_export.config import printable


def parity_table(report: Any, every_case: bool) -> Table:
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


def print_inspection(console: Console, info: dict[str, Any]) -> None:
    """`inspect`'s answer: what a folder's manifest claims (labelled as a claim), then a
    table per artifact of what the file itself says."""
    described = info["files"].values() if info["kind"] == "export folder" else [info]
    if "manifest" in info:  # a record anyone could have written: labelled, clipped, escaped
        manifest = info["manifest"]
        console.print(f"[bold]{escape(info['path'])}[/]: export folder; its manifest.json says")
        console.print(f"  ({manifest['note']}):", markup=False, highlight=False)
        for key in ("name", "config", "parity", "versions"):
            value = manifest.get(key)
            text = printable(repr(value) if isinstance(value, str) else str(value))
            text = text if len(text) <= 300 else text[:297] + "..."
            label = "parity at export" if key == "parity" else key
            console.print(f"  {label} (recorded): {text}", markup=False, highlight=False)
        for warning in manifest["warnings"]:
            console.print(f"[bold yellow]warning[/]: {escape(printable(warning))}", highlight=False)
    for entry in described:
        console.print(_artifact_table(entry))


def _artifact_table(entry: dict[str, Any]) -> Table:
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
        if key == "config":  # one key=value each, batch_first and bidirectional in sight
            value = " ".join(f"{name}={setting}" for name, setting in value.items())
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        table.add_row(key, escape(str(text)))
    return table


def load_table(report: dict[str, Any], clients: int, requests: int, seq: int, batch: int) -> Table:
    """`serve-bench`'s latency per request kind."""
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
    return table


def latency_table(report: Any) -> Table:
    """`bench`'s median latency per shape and backend, against the anchors and targets."""
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
            t.shape,
            t.backend,
            f"{t.median_ms:.2f}",
            f"{t.p10_ms:.2f}-{t.p90_ms:.2f}",
            f"{t.ratio_to_best_anchor:.2f}",
            target,
        )
    return table
