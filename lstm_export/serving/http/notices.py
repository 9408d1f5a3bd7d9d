"""The server's log lines about abusive clients, rate-limited so that a flood of bad
connections cannot flood the log. Stdlib only."""

from __future__ import annotations

import asyncio
import logging
import math
import time

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: configured, shown with its lines


class Notices:
    """Warnings about abusive clients, at most one line per kind every `every` seconds (with
    the count since the last line), so that a flood of bad connections cannot flood the log."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def __call__(self, kind: str, message: str) -> None:
        now = time.monotonic()
        self._count[kind] = self._count.get(kind, 0) + 1
        if now - self._last.get(kind, -math.inf) >= self.every:
            count = self._count.pop(kind)
            self._last[kind] = now
            more = f" ({count} times in the last {self.every:g} s)" if count > 1 else ""
            log.warning("%s%s", message, more)


class QuietParserLines(logging.Filter):
    """uvicorn's warning for each request its parser refuses (or an upgrade it cannot do), as
    one line per 10 s: a client sending garbage in a loop must not grow the log by a line each."""

    LINES = ("Invalid HTTP request received.", "Unsupported upgrade request.")

    def __init__(self, notice: Notices) -> None:
        super().__init__()
        self.notice = notice

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.LINES:
            self.notice(message, f"uvicorn: {message}")
            return False
        return True


def loop_error(notice: Notices, loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's errors, but out of file descriptors in accept() (asyncio retries it every
    second) as one line at most every 10 s, not a traceback each time."""
    if context.get("message") == "socket.accept() out of system resource":
        notice("accept", f"cannot accept connections: {context.get('exception')}; retrying")
    else:
        loop.default_exception_handler(context)
