"""Connections, bounded below the app: uvicorn's h11 protocol with deadlines, caps and a budget.

uvicorn itself has no deadline for receiving a request (its keep-alive timer restarts on
every byte), its `limit_concurrency` answers plain text and does not bound open sockets, and
its parser errors are plain text. Here a request's line and headers must arrive within
`header_timeout` (counted from the connection's opening, or from the request's first byte on
a kept-alive connection) and its body within `body_timeout` of the headers, else a JSON 408;
an answer that backs up in the server (a client that does not read) must drain within
`write_timeout`, else the connection is dropped. Past `max_connections`, a new connection is
answered a JSON 503 (GET /healthz and /v2/health/* are still answered); past
`spare_connections` more it is closed at once. Request bodies (by Content-Length) and
answers not yet handed to the kernel count against `max_bytes_in_flight`: a request or
answer that would pass it gets a JSON 503 with `Retry-After`. On SIGINT/SIGTERM requests in
flight get `shutdown_timeout`; connections still open then are answered 503 (or dropped).

Over 400 lines because it is one class: uvicorn's protocol, whose hooks (connection made
and lost, data received, writing paused and resumed, shutdown, the app call) share one
connection's timers and byte counts.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from lstm_export.serving.http.codec import JSON, error_body
from lstm_export.serving.http.limits import (
    COMMITTED,
    HEAD_LIMIT,
    SMALL_ANSWER,
    Load,
    ServerLimits,
    spare_connections,
)
from lstm_export.serving.http.notices import Notices
from lstm_export.serving.http.service import Service
from lstm_export.serving.http.v2_endpoints import HEALTH_ROUTES

OVER_CAP_HEAD_SECONDS = 1.0  # a connection past the cap has this long to send its head
RETRY = [("retry-after", "1")]
PROBES = ("/healthz", *HEALTH_ROUTES)  # answered past the connection cap too
CLOSE = [("connection", "close")]


def raw_answer(status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A whole `Connection: close` answer as bytes, for where h11 cannot send one."""
    body = error_body(message)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"content-type: {JSON}"]
    lines += [f"content-length: {len(body)}", "connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_start(status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> dict:
    """The ASGI start message of a JSON answer of `body`."""
    pairs = [("content-type", JSON), ("content-length", str(len(body))), *headers]
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs],
    }


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with this server's deadlines, caps and budget (see above); use
    `protocol_class`, which binds them."""

    limits: ClassVar[ServerLimits]
    load: ClassVar[Load]
    notice: ClassVar[Notices]
    spare: ClassVar[int]  # connections read past the cap (then closed at once)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inner_app, self.app = self.app, self.guarded_app
        self.dropped = False  # closed at accept, past the cap and its spare
        self.over_cap = False
        self.lost = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind: str | None = None  # "head" or "body"
        self.write_timer: asyncio.TimerHandle | None = None
        self.answer_bytes = 0  # this connection's answers not yet handed to the kernel
        self.answered: object = None  # the cycle this protocol answered itself
        self.jobs: set[asyncio.Task] = set()

    # ---- the connection's life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        open_now = len(self.server_state.connections)
        if open_now >= self.limits.max_connections + self.spare:
            self.dropped = True
            transport.abort()
            self.notice(
                "dropped",
                f"closed a new connection unanswered: {open_now} are open, the cap "
                f"(--max-connections {self.limits.max_connections}) and {self.spare} spare",
            )
            return
        super().connection_made(transport)
        self.load.connections = len(self.connections)
        # Told when the write buffer is empty (resume_writing): answers are counted until
        # then, and one that does not drain in write_timeout drops the connection.
        transport.set_write_buffer_limits(high=0)
        self.over_cap = open_now >= self.limits.max_connections
        self.update_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.dropped:
            return
        self.lost = True
        self.cancel_timer()
        self.cancel_write_timer()
        self.release_answers()
        super().connection_lost(exc)
        self.load.connections = len(self.connections)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.update_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.update_timer()

    # ---- deadlines for receiving a request

    def update_timer(self) -> None:
        """Head deadline while a request's head is awaited (on a fresh connection, or once a
        kept-alive one has sent a byte of it); body deadline while its body is awaited."""
        state = self.conn.their_state
        if self.transport.is_closing():
            kind = None
        elif state is h11.SEND_BODY:
            kind = "body"
        elif state is h11.IDLE and (self.cycle is None or self.conn.trailing_data[0]):
            kind = "head"
        else:
            kind = None
        if kind == self.timer_kind:
            return
        self.cancel_timer()
        if kind is not None:
            if kind == "body":
                seconds = self.limits.body_timeout
            elif self.over_cap:
                seconds = min(self.limits.header_timeout, OVER_CAP_HEAD_SECONDS)
            else:
                seconds = self.limits.header_timeout
            self.timer = self.loop.call_later(seconds, self.timed_out, kind)
            self.timer_kind = kind

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.timer_kind = None

    def timed_out(self, kind: str) -> None:
        self.timer = self.timer_kind = None
        if self.transport.is_closing():
            return
        if kind == "head" and self.over_cap:
            self.refuse_raw(503, self.over_cap_message(), RETRY)
        elif kind == "head":
            self.notice(
                "head", f"cut off a request head slower than {self.limits.header_timeout:g} s"
            )
            self.refuse_raw(
                408,
                f"the request line and headers did not arrive within "
                f"{self.limits.header_timeout:g} s (--header-timeout)",
            )
        elif self.cycle is not None and not self.cycle.response_started:
            self.notice(
                "body", f"cut off a request body slower than {self.limits.body_timeout:g} s"
            )
            self.answer(
                self.cycle,
                408,
                f"the request body did not arrive within {self.limits.body_timeout:g} s of its "
                "headers (--body-timeout)",
            )
        else:  # answered already; the rest of the body is late
            self.transport.close()

    def over_cap_message(self) -> str:
        return (
            f"the server has too many connections open (limit {self.limits.max_connections}, "
            "--max-connections); retry shortly"
        )

    def refuse_raw(
        self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Answer outside h11 (which sends a response only to a request it has parsed)."""
        self.transport.write(raw_answer(status, message, headers))
        self.transport.close()

    def answer(
        self, cycle: Any, status: int, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Answer the request of `cycle` now, with Connection: close; the app's own answer,
        if it ever comes, is dropped."""
        self.answered = cycle
        cycle.keep_alive = False

        async def send() -> None:
            body = error_body(message)
            try:
                await cycle.send(json_start(status, body, [*headers, *CLOSE]))
                await cycle.send({"type": "http.response.body", "body": body})
            except (h11.LocalProtocolError, RuntimeError):  # h11 cannot answer now
                self.transport.abort()

        job = self.loop.create_task(send())
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: JSON with h11's reason (called while handling its
        RemoteProtocolError) and its status hint (400, or 431 for a head too large)."""
        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400)
        # h11's reason without the raw bytes it quotes ("illegal header line: bytearray(...)")
        reason = str(exc or "").split(": bytearray(")[0][:200] or "it could not be parsed"
        message = f"the request is not valid HTTP/1.1: {reason}"
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # mid-answer: nothing can be said any more
                self.transport.abort()
            else:  # a bad chunk in a body the app is reading
                self.answer(cycle, status, message)
            return
        self.refuse_raw(status, message)

    # ---- answers leaving the server

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.limits.write_timeout, self.write_timed_out)

    def resume_writing(self) -> None:  # the write buffer is empty (high water 0)
        super().resume_writing()
        self.cancel_write_timer()
        self.release_answers()

    def cancel_write_timer(self) -> None:
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def release_answers(self) -> None:
        self.load.give(self.answer_bytes)
        self.answer_bytes = 0

    def write_timed_out(self) -> None:
        self.write_timer = None
        seconds = self.limits.write_timeout
        self.notice("write", f"dropped a connection whose answer was not read within {seconds:g} s")
        self.transport.abort()  # close() would wait for the buffer to drain

    # ---- shutdown

    def shutdown(self) -> None:
        self.load.shutting_down = True
        try:
            super().shutdown()
        except h11.LocalProtocolError:  # answered and closing already
            self.transport.abort()
        self.loop.call_later(self.limits.shutdown_timeout, self.force_close)

    def force_close(self) -> None:
        """shutdown_timeout after SIGINT/SIGTERM: answer 503 to a request not yet answered,
        drop anything else still open (a client not reading, a slow body)."""
        if self.lost:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and self.answered is not cycle:
            self.answer(cycle, 503, "the server is shutting down; retry later")
            self.loop.call_later(0.2, self.transport.abort)
        else:
            self.transport.abort()

    # ---- the app, guarded: admission, the budget, answers counted

    async def guarded_app(self, scope: Any, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.inner_app(scope, receive, send)
        cycle = self.cycle
        refusal = self.admit(scope)
        if refusal is not None:
            status, message, headers = refusal
            body = error_body(message)
            await send(json_start(status, body, [*headers, *CLOSE]))
            await send({"type": "http.response.body", "body": body})
            return
        reserved = self.request_bytes(scope)
        if reserved and not self.load.take(reserved):
            self.notice("budget", self.load.busy_message(reserved, "a request body"))
            message = self.load.busy_message(reserved, "this request's body")
            body = error_body(message)
            await send(json_start(503, body, [*RETRY, *CLOSE]))
            await send({"type": "http.response.body", "body": body})
            return
        start: dict | None = None

        async def counted_send(message: Any) -> None:
            nonlocal start
            if self.answered is cycle:
                return
            if message["type"] == "http.response.start":
                start = message  # held until the body's size is known
                return
            if message["type"] == "http.response.body":
                size = len(message.get("body", b""))
                if start is not None:
                    head, start = start, None
                    committed = head.pop(COMMITTED, False)  # its bytes were reserved
                    if committed:
                        self.load.add(size)
                    elif size > SMALL_ANSWER and not self.load.take(size):
                        self.notice("budget", self.load.busy_message(size, "an answer"))
                        status = 413 if size > self.load.max_bytes else 503
                        text = self.load.busy_message(size, "this answer")
                        if status == 413:
                            text = (
                                f"the answer would be {size} bytes, more than this "
                                f"server's limit of {self.load.max_bytes} bytes in flight; "
                                "send fewer steps or a smaller batch"
                            )
                        body = error_body(text)
                        await send(json_start(status, body, RETRY if status == 503 else []))
                        await send({"type": "http.response.body", "body": body})
                        return
                    if size <= SMALL_ANSWER and not committed:
                        self.load.add(size)
                    self.answer_bytes += size
                    if self.over_cap:  # /healthz past the cap: then closed
                        head = {
                            **head,
                            "headers": [*head["headers"], (b"connection", b"close")],
                        }
                    await send(head)
                else:
                    self.load.add(size)
                    self.answer_bytes += size
                await send(message)
                if self.transport.get_write_buffer_size() == 0:
                    self.release_answers()  # all handed to the kernel already
                return
            await send(message)

        try:
            await self.inner_app(scope, receive, counted_send)
        except asyncio.CancelledError:
            if not self.load.shutting_down:
                raise
            # uvicorn cancels what still runs past its graceful timeout: end quietly.
            self.notice("cancelled", "cancelled a request still running at shutdown")
            cycle.disconnected = True
            self.transport.abort()
        finally:
            if reserved:
                self.load.give(reserved)

    def admit(self, scope: Any) -> tuple[int, str, list] | None:
        """Why this request is refused before the app sees it, or None."""
        head = len(scope["raw_path"]) + len(scope["query_string"])
        head += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if head > HEAD_LIMIT:
            return (
                431,
                f"the request line and headers are {head} bytes; this server takes at "
                f"most {HEAD_LIMIT}",
                [],
            )
        if self.over_cap:
            if scope["path"] in PROBES and scope["method"] in ("GET", "HEAD"):
                return None  # answered, then closed
            self.notice("cap", self.over_cap_message())
            return 503, self.over_cap_message(), RETRY
        return None

    def request_bytes(self, scope: Any) -> int:
        """What a request's body counts against the budget: its Content-Length (at most the
        body limit, beyond which it is refused unread), or the body limit when chunked."""
        length = chunked = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        if chunked:
            return self.limits.max_body_bytes
        return min(length or 0, self.limits.max_body_bytes)


def protocol_class(service: Service) -> type[LimitedH11Protocol]:
    """The protocol for one server: its instances share `service`'s limits, load and log."""
    bound = {
        "limits": service.limits,
        "load": service.load,
        "notice": service.notice,
        "spare": spare_connections(service.limits.max_connections),
    }
    return type("LimitedH11Protocol", (LimitedH11Protocol,), bound)
