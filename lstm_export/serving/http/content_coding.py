"""Content codings of request and response bodies: gzip and deflate, as tritonclient sends
and accepts them (`request_compression_algorithm`, `response_compression_algorithm`).

Inflating is bounded: a small body cannot grow into a large one unchecked.
"""

from __future__ import annotations

import gzip
import zlib

from lstm_export.serving.http.limits import HTTPError


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body under its Content-Encoding (gzip or deflate, as tritonclient sends them),
    refused with 413 once it inflates past `limit` bytes: a small body cannot grow into a
    large one unchecked."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ("gzip", "deflate"):
        raise HTTPError(
            415, f"unsupported Content-Encoding {encoding[:40]!r}; send gzip, deflate or none"
        )
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if name == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
        if not inflater.eof and len(data) <= limit:
            raise HTTPError(400, f"the request body is not complete {name} data")
    except zlib.error as exc:
        raise HTTPError(400, f"the request body is not valid {name} data: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise HTTPError(
            413,
            f"the request body inflates to more than this server's limit of {limit} bytes",
            {"Connection": "close"},
        )
    return data


def compress(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """The answer compressed as the client accepts (the first of gzip and deflate its
    Accept-Encoding lists without q=0), and the Content-Encoding to say so; else as it is."""
    for item in (accept_encoding or "").lower().split(","):
        coding, _, params = item.partition(";")
        refused = params.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000")
        if coding.strip() == "gzip" and not refused:
            return gzip.compress(body, compresslevel=1), "gzip"
        if coding.strip() == "deflate" and not refused:
            return zlib.compress(body, 1), "deflate"
    return body, None
