"""`python -m lstm_export.serving.http EXPORT_DIR [--port 0 ...]`: the server, without the CLI.

What a child process runs (`serve-bench` starts one): the library's entry point, so that
nothing in the library runs `lstm_export.cli`. Its flags are `lstm-export serve`'s, and so
are its ready line on stderr and its errors (one line `error: ...`, exit code 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from lstm_export.errors import LSTMExportError
from lstm_export.serving.http.limits import ServerLimits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lstm_export.serving.http",
        description=(
            "Serve an export over HTTP: the /v1 JSON API and the Open Inference Protocol "
            "(/v2, as Triton speaks it); SIGINT or SIGTERM stops it."
        ),
    )
    parser.add_argument("folder", help="An export folder or a .onnx file.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8000, help="Port; 0 picks a free one.")
    for f in fields(ServerLimits):  # one flag per limit, named and typed as the field
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=float if f.type == "float" else int,
            default=f.default,
            help=f"default {f.default}",
        )
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads/request.")
    parser.add_argument("--workers", type=int, default=None, help="Requests computed at once.")
    parser.add_argument("--optimization", default="all", help="disable, basic, extended, all.")
    parser.add_argument("--log-level", default="info", help="critical ... debug, trace.")
    parser.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True, help="Log requests."
    )
    parser.add_argument("--name", default=None, help="The model's name under /v2.")
    parser.add_argument(
        "--expose-state", action="store_true", help="List hn and cn among /v2's outputs."
    )
    parser.add_argument(
        "--fused-kernel",
        action="store_true",
        help="Serve model.fused.onnx (the fused kernel's op, our own build of its library).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        from lstm_export.serving.http import serve

        limits = ServerLimits(**{f.name: getattr(args, f.name) for f in fields(ServerLimits)})
        serve(
            args.folder,
            args.host,
            args.port,
            limits,
            threads=args.threads,
            workers=args.workers,
            optimization=args.optimization,
            log_level=args.log_level,
            access_log=args.access_log,
            name=args.name,
            expose_state=args.expose_state,
            fused_kernel=args.fused_kernel,
        )
    except LSTMExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
