"""Listen and run uvicorn: `serve` an export until SIGINT or SIGTERM.

The listening socket is opened here (so that a taken port or an unknown host is one
`UsageError` before anything starts), with an accept backlog sized to the open files the
process may have: past that limit, accept() fails and the server stops answering new
connections. uvicorn always runs this server's own h11 protocol (`protocol.py`).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn

from lstm_export.errors import UsageError
from lstm_export.serving.http.app import create_app
from lstm_export.serving.http.limits import (
    HEAD_LIMIT,
    ServerLimits,
    spare_connections,
    tune_malloc,
)
from lstm_export.serving.http.notices import QuietParserLines, log
from lstm_export.serving.http.protocol import protocol_class

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
FD_RESERVE = 64  # file descriptors kept for the model, the log, the pool, the listener
# The listen backlog, which is also how many connections asyncio accepts in one go (each
# open until it is handled, and a few such batches can overlap): uvicorn's default, or a
# quarter of the files the limit leaves.
MAX_BACKLOG, MIN_BACKLOG, BATCHES = 2048, 16, 4
KEEP_ALIVE_SECONDS = 60
SHUTDOWN_MARGIN = 0.5  # after shutdown_timeout, for the requests answered 503 to end


def _listen(host: str, port: int, backlog: int = MAX_BACKLOG) -> socket.socket:
    """A listening socket, or a UsageError saying why not (port taken, unknown host)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UsageError(f"port must be an integer from 0 to 65535, got {port!r}")
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _files_needed(max_connections: int) -> int:
    """Open files for the cap, its spare, FD_RESERVE and batches of the smallest backlog."""
    fixed = max_connections + spare_connections(max_connections) + FD_RESERVE
    return fixed + BATCHES * MIN_BACKLOG


def _backlog(max_connections: int) -> int:
    """The accept backlog the file limit leaves room for, after raising the soft limit (up to
    the hard one); UsageError, naming the flag to lower, if that is not even MIN_BACKLOG.
    Past the limit, accept() fails and the server stops answering new connections."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return MAX_BACKLOG
    needed = _files_needed(max_connections)
    fixed = needed - BATCHES * MIN_BACKLOG
    wanted = fixed + BATCHES * MAX_BACKLOG
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(raised, soft), hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_BACKLOG
    if soft < needed:
        most = max_connections
        while most and _files_needed(most) > soft:
            most -= 1
        hint = f"lower --max-connections to {most}" if most else "raise it"
        raise UsageError(
            f"--max-connections {max_connections} needs {needed} open files (the cap, "
            f"{spare_connections(max_connections)} spare, {needed - fixed + FD_RESERVE} "
            f"more), but this process may open only {soft} (ulimit -n); {hint}"
        )
    return min(MAX_BACKLOG, (soft - fixed) // BATCHES)


def serve(
    export_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    *,
    threads: int | None = 1,
    workers: int | None = None,
    optimization: str = "all",
    log_level: str = "info",
    access_log: bool = True,
    on_ready: Callable[[str], None] | None = None,
    name: str | None = None,
    expose_state: bool = False,
    fused_kernel: bool = False,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully and return (exit code 0).

    Everything that can fail for a user reason (export folder, port, options, too low a file
    limit for `max_connections`) fails with `UsageError` before the server starts. `on_ready`
    gets the URL once the port is listening (default: one line on stderr); port 0 picks a
    free port. `name` and `expose_state` shape the /v2 API, and `fused_kernel` serves
    model.fused.onnx (see `create_app`). Sets glibc's
    mmap threshold for the process (see `tune_malloc`).
    """
    if log_level not in LOG_LEVELS:
        raise UsageError(f"log_level must be one of {list(LOG_LEVELS)}, got {log_level!r}")
    limits = limits or ServerLimits()
    backlog = _backlog(limits.max_connections)
    app = create_app(
        export_dir,
        limits,
        threads=threads,
        workers=workers,
        optimization=optimization,
        name=name,
        expose_state=expose_state,
        fused_kernel=fused_kernel,
    )
    tune_malloc()
    sock = _listen(host, port, backlog)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown}:{bound_port}"
    config = uvicorn.Config(
        app,
        # Our h11 subclass: deadlines, the connection cap, the byte budget, JSON errors.
        http=protocol_class(app.state.service),
        ws="none",
        h11_max_incomplete_event_size=HEAD_LIMIT,
        backlog=backlog,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        # The protocol ends what is still open after shutdown_timeout; uvicorn cancels what
        # still runs after this (a computation; the request is answered 503 already).
        timeout_graceful_shutdown=limits.shutdown_timeout + SHUTDOWN_MARGIN,
        # uvicorn's 5 s default closes a keep-alive connection under a client that pauses
        # between requests on a busy machine; its next request then dies mid-send.
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    server = uvicorn.Server(config)
    quiet = QuietParserLines(app.state.service.notice)
    log.addFilter(quiet)
    name = app.state.inference.name
    if on_ready is not None:
        on_ready(url)
    else:
        served = app.state.service.runtime.path.name
        print(
            f"lstm-export: serving {name!r} ({served}) on {url} (Ctrl+C to stop)", file=sys.stderr
        )
        sys.stderr.flush()

    # uvicorn handles SIGINT/SIGTERM itself, then re-raises the signal once it has shut down
    # so that the default action (KeyboardInterrupt, death by SIGTERM) follows. A graceful
    # stop should be exit code 0, so the handler beneath uvicorn's just asks it to stop.
    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.removeFilter(quiet)
        sock.close()
