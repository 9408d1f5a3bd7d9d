"""Open streams by id: each keeps its (h, c) on the server between chunks.

Each stream has an asyncio lock (FIFO), so concurrent chunks to one stream run one after
another in the order they arrived. Idle streams expire after a TTL, checked on access and
by the service's sweeper; the number of open streams is capped (then 429).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lstm_export.serving.http.limits import HTTPError

if TYPE_CHECKING:
    from lstm_export.runtime.onnx import Stream


@dataclass(eq=False)
class StreamEntry:
    id: str
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
            self._close(entry)
        return len(expired)

    def _close(self, entry: StreamEntry) -> None:
        entry.closed = True
        self._streams.pop(entry.id, None)

    def create(self, stream: Stream) -> StreamEntry:
        if len(self._streams) >= self.max_streams:
            self.sweep()
        if len(self._streams) >= self.max_streams:
            retry = max(1, math.ceil(self.ttl))
            raise HTTPError(
                429,
                f"too many open streams (limit {self.max_streams}); delete one, or retry once "
                f"idle streams expire (after {self.ttl:g} s)",
                {"Retry-After": str(retry)},
            )
        entry = StreamEntry(secrets.token_urlsafe(16), stream, self.clock())
        self._streams[entry.id] = entry
        return entry

    def get(self, stream_id: str) -> StreamEntry:
        entry = self._streams.get(stream_id)
        if entry is not None and self._expired(entry, self.clock()):
            self._close(entry)
            entry = None
        if entry is None:
            raise HTTPError(
                404,
                f"no open stream {stream_id!r}: it was never created, was deleted, "
                f"or expired after {self.ttl:g} s idle",
            )
        return entry

    def delete(self, stream_id: str) -> StreamEntry:
        entry = self.get(stream_id)
        self._close(entry)
        return entry
