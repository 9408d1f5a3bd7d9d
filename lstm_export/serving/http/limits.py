"""What the server may hold, and the error a request gets when it would pass a limit.

`ServerLimits` is the whole set of knobs (per request, per connection, for the process);
`Load` counts what is held now (connections, bytes in flight); glibc is asked to hand freed
memory back so that the process shrinks once abusive clients are gone. Stdlib only: the CLI
builds `ServerLimits` before it knows whether the `serve` extra is installed.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from lstm_export.errors import UsageError

MiB = 1024 * 1024
HEAD_LIMIT = 16 * 1024  # request line + headers: h11's own bound on an incomplete head
SMALL_ANSWER = 64 * 1024  # answers this small (errors, /healthz) are counted, never refused
TRIM_AFTER = 16 * MiB  # bytes in flight after which memory is handed back once they are gone
JSON_NUMBER_BYTES = 16  # the most one float32 takes in an answer's JSON: -1.1754944e-38,
COMMITTED = "lstm_export.committed"
"""A key on an answer's ASGI start message: its bytes were reserved before a stateful step
changed a stream's or sequence's state, so the connection protocol must send it, never
replace it with a 413 or 503 (the step cannot be undone)."""


@dataclass(frozen=True)
class ServerLimits:
    """What one request, one connection and the whole server may hold or take.

    Over a request's limit is a 413 (streams: 429); a request too slow to arrive is a 408;
    past the connection cap or the bytes in flight, a 503 with Retry-After.
    """

    max_body_bytes: int = 8 * MiB  # request body, checked before parsing
    max_seq_len: int = 4096  # time steps in one predict request or one stream chunk
    max_batch: int = 64  # sequences per request or stream
    # steps x batch per predict or chunk: bounds one request's compute and its answer
    # (8192 x hidden 256 floats is ~24 MB of JSON), which seq and batch alone do not.
    max_elements: int = 8192
    max_streams: int = 256  # open streams at once
    stream_ttl: float = 300.0  # seconds a stream may stay idle before it expires
    # Connections (see lstm_export.serving.http.protocol).
    header_timeout: float = 10.0  # seconds for a request's line and headers to arrive
    body_timeout: float = 30.0  # seconds for its body to arrive, counted from its headers
    write_timeout: float = 30.0  # seconds for an answer backed up in the server to drain
    max_connections: int = 256  # connections open at once (and spare_connections more)
    # Request bodies (by Content-Length) plus answers not yet handed to the kernel.
    max_bytes_in_flight: int = 256 * MiB
    shutdown_timeout: float = 1.0  # seconds requests in flight get after SIGINT/SIGTERM

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise UsageError(f"{f.name} must be a positive number, got {value!r}")
            if f.type != "float" and not isinstance(value, int):
                raise UsageError(f"{f.name} must be an integer, got {value!r}")
        if self.max_bytes_in_flight < self.max_body_bytes:
            raise UsageError(
                f"max_bytes_in_flight ({self.max_bytes_in_flight}) must be at least "
                f"max_body_bytes ({self.max_body_bytes}): a largest body would never fit"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spare_connections(max_connections: int) -> int:
    """Connections past the cap that are still read (and answered 503, or /healthz)."""
    return max(16, max_connections // 4)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one): the most
    onnxruntime threads per request, and a quarter of the most requests computed at once."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class HTTPError(Exception):
    """An answer other than 200, with one sentence for the client: the one error type the
    server's model work raises; the app turns it into `{"error": message}` with its status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class Load:
    """What the server holds now: connections and bytes in flight (request bodies, answers).

    Used from the event loop thread only. `take` refuses what would pass the budget; `add`
    counts what is let through anyway (small answers); `peak` is the most held since memory
    was last trimmed.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.peak = 0
        self.connections = 0
        self.shutting_down = False

    def take(self, size: int) -> bool:
        if self.bytes + size > self.max_bytes:
            return False
        self.add(size)
        return True

    def add(self, size: int) -> None:
        self.bytes += size
        self.peak = max(self.peak, self.bytes)

    def give(self, size: int) -> None:
        self.bytes -= size

    def reserve(self, size: int, what: str) -> int:
        """Take `size` bytes for an answer before the work that makes it changes any state:
        a 413 if it could never fit, a 503 (Retry-After) if it does not fit now. Small
        answers are never refused, so nothing is reserved for them (0)."""
        if size <= SMALL_ANSWER:
            return 0
        if size > self.max_bytes:
            raise HTTPError(
                413,
                f"{what} could take up to {size} bytes, more than this server's limit of "
                f"{self.max_bytes} bytes in flight; send fewer steps or a smaller batch",
            )
        if not self.take(size):
            raise HTTPError(503, self.busy_message(size, what), {"Retry-After": "1"})
        return size

    def busy_message(self, size: int, what: str) -> str:
        return (
            f"the server is busy: {self.bytes} bytes of requests and answers are in flight, and "
            f"{what} of {size} bytes would pass its limit of {self.max_bytes} "
            "(--max-bytes-in-flight); retry shortly"
        )


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt, malloc_trim), else None (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Serve large blocks (answers, bodies, arrays) from their own mappings, which free()
    returns to the OS at once: glibc otherwise raises its mmap threshold to the largest block
    freed (up to 32 MiB), and 24 MB answers then stay in the heap after they are freed."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MiB)


def trim_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; elsewhere nothing)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
