"""Open streams by key: each keeps its (h, c) on the server between chunks.

Two APIs keep state here under one cap and one TTL: /v1's streams, keyed by a random id the
server made (a str), and /v2's sequences, keyed by the client's sequence id (a tuple, so
that neither API can reach the other's). Each has an asyncio lock (FIFO), so concurrent
chunks to one stream run one after another in the order they arrived. Idle streams expire
after a TTL, checked on access and by the service's sweeper; the number open is capped
(then 429).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lstm_export.serving.http.limits import HTTPError

if TYPE_CHECKING:
    from lstm_export.runtime.onnx import Stream


@dataclass(eq=False)
class StreamEntry:
    id: Hashable  # a /v1 stream's str, or a /v2 sequence's ("sequence", its id)
    stream: Stream
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy: int = 0  # requests holding or waiting for this stream: never expired while > 0
    closed: bool = False


class StreamStore:
    """Open streams by id. Used from the event loop thread only, so it needs no lock."""

    def __init__(self, max_streams: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.max_streams = max_streams
        self.ttl = ttl
        self.clock = clock
        self._streams: dict[str, StreamEntry] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def _expired(self, entry: StreamEntry, now: float) -> bool:
        return entry.busy == 0 and now - entry.last_used > self.ttl

    def sweep(self) -> int:
        """Close idle streams past their TTL; how many were closed."""
        now = self.clock()
        expired = [e for e in self._streams.values() if self._expired(e, now)]
        for entry in expired:
            self.close(entry)
        return len(expired)

    def close(self, entry: StreamEntry) -> None:
        entry.closed = True
        self.detach(entry)

    def create(self, stream: Stream, key: Hashable | None = None) -> StreamEntry:
        """A new entry under `key` (default: a new random id), replacing none: the caller
        has found no open entry under it."""
        if len(self._streams) >= self.max_streams:
            self.sweep()
        if len(self._streams) >= self.max_streams:
            retry = max(1, math.ceil(self.ttl))
            raise HTTPError(
                429,
                f"too many open streams (limit {self.max_streams}); /v1 streams and /v2 "
                "sequences count together: end or delete one, or retry once idle ones expire "
                f"(after {self.ttl:g} s)",
                {"Retry-After": str(retry)},
            )
        entry = StreamEntry(secrets.token_urlsafe(16) if key is None else key, stream, self.clock())
        self._streams[entry.id] = entry
        return entry

    def find(self, key: Hashable) -> StreamEntry | None:
        """The open entry under `key`, or None (never opened, closed, or expired now)."""
        entry = self._streams.get(key)
        if entry is not None and self._expired(entry, self.clock()):
            self.close(entry)
            entry = None
        return entry

    def detach(self, entry: StreamEntry) -> None:
        """Forget `entry`'s key, but not the entry: requests already queued on it still run
        on it, and the key can start a new entry at once (a /v2 sequence's end, as Triton's
        sequence batcher forgets a correlation id once its END request is queued)."""
        if self._streams.get(entry.id) is entry:
            del self._streams[entry.id]

    def reattach(self, entry: StreamEntry) -> None:
        """Put a detached entry back under its key (the key must be free)."""
        assert entry.id not in self._streams
        self._streams[entry.id] = entry

    def get(self, stream_id: str) -> StreamEntry:
        entry = self.find(stream_id)
        if entry is None:
            raise HTTPError(
                404,
                f"no open stream {stream_id!r}: it was never created, was deleted, "
                f"or expired after {self.ttl:g} s idle",
            )
        return entry

    def delete(self, stream_id: str) -> StreamEntry:
        entry = self.get(stream_id)
        self.close(entry)
        return entry


class ArrivalOrder:
    """Tickets in the order requests arrived, and each request's turn once every earlier one
    has finished its part: so that requests parsed in parallel (a large body takes longer)
    still queue on their sequence in the order they arrived. Event loop thread only."""

    def __init__(self) -> None:
        self.issued = 0
        self.head = 0  # the earliest ticket not yet finished
        self.finished: set[int] = set()
        self.waiting: dict[int, asyncio.Future[None]] = {}

    def take(self) -> int:
        ticket = self.issued
        self.issued += 1
        return ticket

    async def turn(self, ticket: int) -> None:
        """Return once every ticket before `ticket` is finished."""
        if self.head == ticket:
            return
        future = asyncio.get_running_loop().create_future()
        self.waiting[ticket] = future
        try:
            await future
        finally:
            self.waiting.pop(ticket, None)

    def finish(self, ticket: int) -> None:
        """`ticket` is done with its turn (or needs none); a second call is a no-op."""
        if ticket < self.head or ticket in self.finished:
            return
        self.finished.add(ticket)
        while self.head in self.finished:
            self.finished.discard(self.head)
            self.head += 1
        future = self.waiting.get(self.head)
        if future is not None and not future.done():
            future.set_result(None)
