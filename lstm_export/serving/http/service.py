"""The model work behind the endpoints: one shared `OnnxLSTM`, a thread pool, the streams.

No HTTP here: bodies come in as bytes, answers go out as bytes or dicts, and a request the
server refuses raises `HTTPError` with its status and one sentence (`UsageError` from the
runtime means bad input, a 400). onnxruntime, JSON parsing and JSON encoding run on the
thread pool, off the event loop, so that concurrent requests overlap. Each request's
steps x batch is capped (`max_elements`), so that one request's work and answer stay
bounded however its shape splits between the two.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from lstm_export.artifacts import (
    FUSED_ONNX_FILE,
    LENGTHS_INPUT,
    MANIFEST_FILE,
    ONNX_FILE,
    ONNX_OUTPUTS,
)
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.files import read_manifest, sha256
from lstm_export.runtime.onnx import BIDIRECTIONAL_STREAM, OnnxLSTM, Stream
from lstm_export.serving.http.codec import decode_object, encode, to_array, to_lengths
from lstm_export.serving.http.limits import (
    JSON_NUMBER_BYTES,
    TRIM_AFTER,
    HTTPError,
    Load,
    ServerLimits,
    trim_memory,
)
from lstm_export.serving.http.notices import Notices, log
from lstm_export.serving.http.streams import StreamEntry, StreamStore

STREAMS_REFUSED = f"{BIDIRECTIONAL_STREAM} (POST /v1/predict)"
"""Why /v1/streams answers 409 for a bidirectional model (and /v1/model's `streaming`)."""


def x_shape(config: LSTMConfig) -> list[str | int]:
    """x's shape in the model's own layout, as /v1/model shows it: predict and stream
    chunks take x in this layout, never transposed by the server."""
    steps = ["batch", "seq"] if config.batch_first else ["seq", "batch"]
    return [*steps, config.input_size]


def describe_model(runtime: OnnxLSTM, limits: ServerLimits) -> dict[str, Any]:
    """What GET /v1/model answers: config, signature, artifacts' sha256, limits, and what
    requests the model takes (x's layout, `lengths`, streams).

    With a manifest.json beside model.onnx (or model.fused.onnx, when that is served), its
    artifacts and signature are reported, and the served file must match it (config and
    sha256): a tampered export does not start.
    """
    path = runtime.path
    digest = sha256(path)
    manifest_path = path.parent / MANIFEST_FILE
    # Bounded: a regular file under the size limit, JSON of limited depth; None when absent.
    served_by_export = path.name in (ONNX_FILE, FUSED_ONNX_FILE)
    manifest = read_manifest(path.parent) if served_by_export else None
    if manifest is not None:
        try:
            recorded = manifest["artifacts"][path.name]["sha256"]
        except (KeyError, TypeError):
            raise UsageError(f"{manifest_path} is not a readable lstm-export manifest") from None
        if recorded != digest:
            raise UsageError(
                f"{path} does not match {manifest_path} (sha256 {digest[:12]}... but the "
                f"manifest says {str(recorded)[:12]}...); re-export it or remove the manifest"
            )
        try:  # read as every config is: a manifest from before batch_first still matches
            claimed = LSTMConfig.from_dict(manifest.get("config"), f"{manifest_path} config")
        except UsageError:
            claimed = None
        if claimed != runtime.config:
            raise UsageError(f"{path}'s config does not match {manifest_path}")
    info: dict[str, Any] = {
        "name": (manifest or {}).get("name") or (path.parent.name or path.stem),
        "config": runtime.config.to_dict(),
        "signature": (manifest or {}).get("signature") or runtime.signature(),
        "served": path.name,
        "artifacts": {path.name: {"sha256": digest, "bytes": path.stat().st_size}},
        "limits": limits.to_dict(),
        "providers": runtime.providers,
        "x_shape": x_shape(runtime.config),
        "lengths": runtime.has_lengths,
        "streaming": not runtime.config.bidirectional,
    }
    if manifest is not None:
        info["artifacts"] = {
            name: {"sha256": entry.get("sha256"), "bytes": entry.get("bytes")}
            for name, entry in manifest["artifacts"].items()
            if isinstance(entry, dict)
        }
    return info


class Service:
    """The endpoints' logic, over one shared runtime, a thread pool and the stream store."""

    def __init__(self, runtime: OnnxLSTM, limits: ServerLimits, workers: int) -> None:
        self.runtime = runtime
        self.limits = limits
        self.info = describe_model(runtime, limits)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="lstm-serve")
        self.store = StreamStore(limits.max_streams, limits.stream_ttl)
        self.load = Load(limits.max_bytes_in_flight)
        self.notice = Notices()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def sweep_forever(self) -> None:
        interval = min(max(self.limits.stream_ttl / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            closed = self.store.sweep()
            if closed:
                log.info("closed %d idle stream(s)", closed)

    async def trim_forever(self, interval: float = 0.5) -> None:
        """Once a burst of large requests is over (nothing in flight), return its memory."""
        while True:
            await asyncio.sleep(interval)
            if self.load.peak >= TRIM_AFTER and self.load.bytes == 0:
                self.load.peak = 0
                await self.call(trim_memory)

    # ---- checks on a request's arrays

    def checked_x(self, value: object) -> np.ndarray:
        """x as an array, its size checked first on the lists' lengths: an x over the limits
        is refused before numpy converts it (the costly part of reading a request).

        x is in the model's own layout: [seq][batch][...], or [batch][seq][...] for a
        batch-first model."""
        rows = value[0] if isinstance(value, list) and value else None
        if isinstance(rows, list) and rows and isinstance(rows[0], list):
            self.check_size(*self.seq_batch(len(value), len(rows)))
        x = to_array("x", value)
        if x.ndim == 3:
            self.check_size(*self.seq_batch(*x.shape[:2]))
        return x

    def seq_batch(self, first: int, second: int) -> tuple[int, int]:
        """(steps, batch) from x's first two dims, in the model's layout."""
        dims = (first, second)
        return dims[self.runtime.time_axis], dims[self.runtime.batch_axis]

    def check_size(self, seq: int, batch: int) -> None:
        """413 for too many steps, too large a batch or too many steps x batch in one x."""
        if seq > self.limits.max_seq_len:
            raise HTTPError(
                413,
                f"x has {seq} time steps; this server takes at most "
                f"{self.limits.max_seq_len} per request",
            )
        self.check_batch("x", batch)
        if seq * batch > self.limits.max_elements:
            raise HTTPError(
                413,
                f"x has {seq} steps x batch {batch} = {seq * batch} elements; this server "
                f"takes at most {self.limits.max_elements} per request: send fewer steps or "
                "a smaller batch",
            )

    def check_batch(self, name: str, batch: int) -> None:
        if batch > self.limits.max_batch:
            raise HTTPError(
                413,
                f"{name} has batch {batch}; this server takes at most {self.limits.max_batch}",
            )

    def checked_state(self, data: dict) -> tuple[np.ndarray, np.ndarray] | None:
        if ("h0" in data) != ("c0" in data):
            raise HTTPError(400, "h0 and c0 go together: send both or neither")
        if "h0" not in data:
            return None
        h0, c0 = to_array("h0", data["h0"]), to_array("c0", data["c0"])
        if h0.ndim == 3:
            self.check_batch("h0", h0.shape[1])
        return h0, c0

    def checked_lengths(self, data: dict) -> np.ndarray | None:
        """`lengths` as int64, or None when not sent. Its count and its values against x
        (each 1..seq) are `OnnxLSTM.run`'s checks, whose UsageError is a 400."""
        if LENGTHS_INPUT not in data:
            return None
        if not self.runtime.has_lengths:
            raise HTTPError(
                400,
                f"this model takes no {LENGTHS_INPUT}: {self.runtime.path.name} was exported "
                f"before {LENGTHS_INPUT} existed; re-export it, or send equal-length "
                f"sequences without {LENGTHS_INPUT}",
            )
        return to_lengths(data[LENGTHS_INPUT])

    # ---- work done on the thread pool

    def predict_work(self, body: bytes) -> bytes:
        data = decode_object(body, ("x", "h0", "c0", LENGTHS_INPUT), required=("x",))
        x = self.checked_x(data["x"])
        state = self.checked_state(data)
        lengths = self.checked_lengths(data)
        y, (h, c) = self.runtime.run(x, state, lengths)
        return encode({"y": y, "hn": h, "cn": c})

    def check_streaming(self) -> None:
        """409 for a model a stream cannot run: one with a reverse direction."""
        if self.runtime.config.bidirectional:
            raise HTTPError(409, STREAMS_REFUSED)

    def new_stream_work(self, body: bytes) -> Stream:
        data = decode_object(body, ("batch", "h0", "c0"))
        state = self.checked_state(data)
        batch = data.get("batch")
        if batch is not None:
            # Not config.positive_int: a client is told the value it sent, as JSON (true, not
            # True), with a 400 of its own.
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                raise HTTPError(400, f"batch must be an integer >= 1, got {json.dumps(batch)}")
            self.check_batch("the stream", batch)
            if state is None:
                cfg = self.runtime.config
                zeros = np.zeros((cfg.state_layers, batch, cfg.hidden_size), np.float32)
                state = (zeros, zeros)
        if state is not None:
            state = self.runtime.check_state(state, batch)
        return self.runtime.stream(state)

    def step_input(self, body: bytes) -> np.ndarray:
        """A chunk's x, read and checked against the limits (the stream checks the rest)."""
        data = decode_object(body, ("x",), required=("x",))
        return self.checked_x(data["x"])

    def step_work(self, entry: StreamEntry, x: np.ndarray) -> dict[str, Any]:
        y = entry.stream.step(x)
        h, c = entry.stream.state
        return {"y": y, "hn": h, "cn": c, "steps": entry.stream.steps}

    def output_numbers(self, steps: int, batch: int) -> dict[str, int]:
        """How many numbers each output (y, hn, cn) of `steps` x `batch` holds: what an
        answer's bytes are reserved by before a stateful step runs (/v1 and /v2)."""
        cfg = self.runtime.config
        state = cfg.state_layers * batch * cfg.hidden_size
        return dict(zip(ONNX_OUTPUTS, (steps * batch * cfg.output_size, state, state), strict=True))

    # ---- what the endpoints ask for

    def health(self) -> dict[str, Any]:
        load = self.load
        answer = {"status": "ok", "streams": len(self.store), "connections": load.connections}
        return answer | {"bytes_in_flight": load.bytes}

    async def predict(self, body: bytes) -> bytes:
        return await self.call(self.predict_work, body)

    async def open_stream(self, body: bytes) -> dict[str, Any]:
        """A new stream; its id, URL (`url`: the Location of the answer), batch and TTL."""
        self.check_streaming()  # before the body is parsed: no body makes it possible
        stream = await self.call(self.new_stream_work, body)
        entry = self.store.create(stream)
        return {
            "id": entry.id,
            "url": f"/v1/streams/{entry.id}",
            "batch": stream.batch,
            "ttl_seconds": self.limits.stream_ttl,
        }

    async def step(self, stream_id: str, body: bytes) -> tuple[bytes, Callable[[], None]]:
        """Run a chunk on a stream, after the chunks that arrived before it (FIFO): its answer,
        and what hands back the bytes reserved for it (call it once the answer is sent).

        The answer's bytes are reserved before the stream's state moves (413 or 503 before,
        never after: a client told its chunk failed must find the stream as it was)."""
        entry = self.store.get(stream_id)
        entry.busy += 1
        try:
            async with entry.lock:  # FIFO: chunks run in the order they arrived
                if entry.closed:
                    raise HTTPError(404, f"stream {entry.id!r} was deleted")
                x = await self.call(self.step_input, body)
                bound = 0
                if x.ndim == 3:  # y, hn and cn as JSON (else the stream refuses x)
                    numbers = self.output_numbers(*self.seq_batch(*x.shape[:2]))
                    bound = JSON_NUMBER_BYTES * sum(numbers.values()) + 1024
                reserved = self.load.reserve(bound, "this chunk's answer")
                try:
                    result = await self.call(self.step_work, entry, x)
                    answer = await self.call(encode, result)
                except BaseException:
                    self.load.give(reserved)
                    raise
        finally:
            entry.busy -= 1
            entry.last_used = self.store.clock()
        return answer, lambda: self.load.give(reserved)

    def describe_stream(self, stream_id: str) -> dict[str, Any]:
        """The stream's batch, steps and idle time."""
        entry = self.store.get(stream_id)
        return {
            "id": entry.id,
            "batch": entry.stream.batch,
            "steps": entry.stream.steps,
            "idle_seconds": round(self.store.clock() - entry.last_used, 3),
            "ttl_seconds": self.limits.stream_ttl,
        }

    def close_stream(self, stream_id: str) -> dict[str, Any]:
        entry = self.store.delete(stream_id)
        return {"deleted": entry.id, "steps": entry.stream.steps}
