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
    title = escape(printable(f"{entry['path']} ({entry['kind']})"))
    table = Table(title=title, show_header=False)
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
        if key in ("config", "opset"):  # one key=value each: batch_first, a custom domain
            value = " ".join(f"{name}={setting}" for name, setting in value.items())
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        table.add_row(key, escape(printable(str(text))))  # text from the file: escaped
    return table


def load_table(report: dict[str, Any]) -> Table:
    """`serve-bench`'s runs side by side, one section per API: all its requests (requests/s,
    latency and errors, with the ratios against the baseline run in brackets), then its
    predicts and its stream steps; fits 80 columns."""
    clients = report["clients"]
    share = f"{report['stream_fraction']:.0%} stream steps at batch {report['stream_batch']}"
    table = Table(
        title=f"One server on loopback, one API after the other: {clients} "
        f"client{'s' * (clients != 1)} x {report['requests_per_client']} requests\n"
        f"seq {report['seq']}, batch {report['batch']}, {share}; "
        f"(ratio) against {report['baseline']}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
    )
    columns = ("api", "count", "req/s (ratio)", "p50 ms (ratio)", "p99 ms", "mean ms")
    for column in (*columns, "errors"):
        table.add_column(column, justify="left" if column == "api" else "right", no_wrap=True)

    def number(value: float | None, digits: int, ratio: float | None = None) -> str:
        text = "-" if value is None else f"{value:.{digits}f}"
        return text if ratio is None else f"{text} ({ratio:.2f}x)"

    for position, (api, run) in enumerate(report["runs"].items()):
        if position:
            table.add_section()
        versus, latency = run["vs_baseline"], run["latency"]
        table.add_row(
            f"[bold]{escape(api)}[/]",
            str(latency["count"]),
            number(run["requests_per_s"], 0, versus["requests_per_s"]),
            number(latency["p50_ms"], 2, versus["p50"]),
            number(latency["p99_ms"], 2),
            number(latency["mean_ms"], 2),
            f"[bold red]{run['errors']}[/]" if run["errors"] else "0",
        )
        for kind, label in (("predict", "predicts"), ("stream_step", "steps")):
            row = run[kind]
            table.add_row(
                f"  {label}",
                str(row["count"]),
                "",
                number(row["p50_ms"], 2, versus[f"{kind}_p50"]),
                number(row["p99_ms"], 2),
                number(row["mean_ms"], 2),
                "",
            )
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
