"""The Open Inference Protocol's model work: metadata, and infer requests, stateless or in
sequences kept the way Triton's sequence batcher keeps them.

No HTTP here, as in `service`: this rides on the `Service` the /v1 API uses (its runtime,
thread pool, limits and stream store). The model shows the signature of the Triton model
`lstm-export triton` writes for the same export (x [batch, seq, input_size] -> y, and hn/cn
with `expose_state`), batch-first whatever the export's own layout: x and y are transposed
here for a time-major model, the states made batch-major.

Sequences (request parameters `sequence_id`, `sequence_start`, `sequence_end`) follow
Triton's rules: the first request of a sequence must carry `sequence_start` (a 400
otherwise), which starts from zeros; a `sequence_start` on an open sequence starts it anew
once the requests before it have run; `sequence_end` releases it; one sequence element per
request (batch 1). A request without `sequence_id` runs whole, from zeros, at any batch: the
one thing `serve` takes that Triton's sequence batcher refuses.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

import lstm_export
from lstm_export.artifacts import check_model_name
from lstm_export.errors import UsageError
from lstm_export.exporters.batch_first import (
    INPUT,
    OUTPUT,
    STATE_OUTPUTS,
    VERSION,
    batch_first_onnx,
)
from lstm_export.runtime.onnx import BIDIRECTIONAL_STREAM, OnnxLSTM, load_onnx
from lstm_export.serving.http.content_coding import compress, decompress
from lstm_export.serving.http.limits import JSON_NUMBER_BYTES, HTTPError
from lstm_export.serving.http.service import Service
from lstm_export.serving.http.streams import ArrivalOrder, StreamEntry
from lstm_export.serving.http.v2_codec import (
    InferRequest,
    SequenceControl,
    Signature,
    TensorSpec,
    encode_response,
    read_request,
    split_body,
)
from lstm_export.serving.triton.model_config import PLATFORM, TritonTensor, model_signature

SERVER_NAME = "lstm-export"
EXTENSIONS = ("binary_tensor_data", "sequence")
"""The protocol extensions served: Triton's binary tensors, and its sequence parameters."""
SEQUENCE = "sequence"  # the first element of a sequence's key in the stream store


def protocol_spec(tensor: TritonTensor) -> TensorSpec:
    """A Triton config tensor as Triton's model metadata shows it for a model that batches:
    -1 for the batch dim first, the datatype without its TYPE_ prefix."""
    return TensorSpec(tensor.name, tensor.data_type.removeprefix("TYPE_"), (-1, *tensor.dims))


def protocol_signature(runtime: OnnxLSTM, name: str, expose_state: bool) -> Signature:
    """The model's inputs and outputs as Triton reports them for the repository
    `lstm-export triton` writes: read off the same batch-first graph by the same function."""
    graph = batch_first_onnx(load_onnx(runtime.path))
    inputs, outputs = model_signature(graph, expose_state=expose_state)
    return Signature(name, tuple(map(protocol_spec, inputs)), tuple(map(protocol_spec, outputs)))


def default_name(name: str) -> str:
    """The export's name as the /v2 model's, if Triton would take it (as `triton` does)."""
    try:
        return check_model_name(name, "the model's name under /v2 (the export's)")
    except UsageError as exc:
        raise UsageError(f"{exc}; pass --name to name it as `lstm-export triton` does") from None


class OpenInference:
    """The /v2 endpoints' logic over a `Service`: one model, version 1."""

    def __init__(self, service: Service, name: str | None = None, expose_state: bool = False):
        self.service = service
        self.runtime = service.runtime
        self.name = name or default_name(service.info["name"])
        self.signature = protocol_signature(self.runtime, self.name, expose_state)
        self.arrivals = ArrivalOrder()

    # ---- metadata

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": SERVER_NAME,
            "version": lstm_export.__version__,
            "extensions": list(EXTENSIONS),
        }

    def check_model(self, name: str, version: str | None = None) -> None:
        """404 unless `name` (and `version`, if given) is the served model's."""
        if name != self.name:
            raise HTTPError(
                404,
                f"Request for unknown model: '{name[:100]}' is not found; this server "
                f"serves '{self.name}'",
            )
        if version is not None and version != VERSION:
            raise HTTPError(
                404,
                f"Request for unknown model: '{name}' version {version[:20]} is not found; "
                f"it has version {VERSION}",
            )

    def model_metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": PLATFORM,  # Triton fills it in from backend onnxruntime
            "inputs": [spec.to_dict() for spec in self.signature.inputs],
            "outputs": [spec.to_dict() for spec in self.signature.outputs],
        }

    # ---- inference

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """The server's limits on x [batch, seq, input_size], before its data is read."""
        batch, seq = shape[0], shape[1]
        if batch < 1 or seq < 1:
            raise HTTPError(
                400,
                f"input '{name}' must hold at least one sequence of one step, got {list(shape)}",
            )
        self.service.check_size(seq, batch)

    def read(self, body: bytes, header_length: str | None, encoding: str | None) -> InferRequest:
        """The request read and checked whole; a sequence's x also as the runtime will run it
        (finite numbers, its shape), so that nothing is refused once its state may move."""
        body = decompress(body, encoding, self.service.limits.max_body_bytes)
        header, binary = split_body(body, header_length)
        request = read_request(header, binary, self.signature, self.check_shape)
        if request.sequence is not None:  # a stateless request is checked as it runs
            x = request.inputs[INPUT]
            self.runtime.check(self.to_model(x))  # UsageError: a 400, before the queue
            self.check_sequence_request(x)
        return request

    def check_sequence_request(self, x: np.ndarray) -> None:
        if self.runtime.config.bidirectional:
            raise HTTPError(400, f"sequences are refused: {BIDIRECTIONAL_STREAM}")
        if x.shape[0] != 1:
            raise HTTPError(
                400,
                f"inference request to model '{self.name}' must specify batch-size 1 due to "
                "requirements of sequence batcher",
            )

    def answer_bound(self, request: InferRequest) -> int:
        """The most bytes the answer to `request` can take (JSON numbers at their longest),
        reserved before a sequence's state moves."""
        x = request.inputs[INPUT]  # batch-first
        numbers = self.service.output_numbers(steps=x.shape[1], batch=x.shape[0])
        bound = 2048 + 6 * len(request.id)  # the JSON header, the id escaped at worst
        for name, binary in request.outputs:
            bound += numbers[name] * (4 if binary else JSON_NUMBER_BYTES)
        return bound

    def to_model(self, x: np.ndarray) -> np.ndarray:
        """Batch-first x in the model's own layout (a view)."""
        return x if self.runtime.batch_axis == 0 else x.transpose(1, 0, 2)

    def from_model(self, y: np.ndarray, state: tuple[np.ndarray, np.ndarray]) -> dict:
        """The model's y and (h, c) as the protocol's outputs: batch-first, batch-major."""
        if self.runtime.batch_axis != 0:
            y = y.transpose(1, 0, 2)
        h, c = (s.transpose(1, 0, 2) for s in state)
        return dict(zip((OUTPUT, *STATE_OUTPUTS), (y, h, c), strict=True))

    def run_whole(self, x: np.ndarray) -> dict:
        y, state = self.runtime.run(self.to_model(x))
        return self.from_model(y, state)

    def run_step(self, entry: StreamEntry, x: np.ndarray, start: bool) -> dict:
        y = entry.stream.step(self.to_model(x), restart=start)
        return self.from_model(y, entry.stream.state)

    def not_started(self, sequence: SequenceControl) -> HTTPError:
        return HTTPError(
            400,
            f"inference request for sequence {str(sequence.id)[:100]} to model '{self.name}' "
            "must specify the START flag on the first request of the sequence",
        )

    async def run_in_sequence(self, request: InferRequest, ticket: int) -> tuple[dict, int]:
        """Run the request as the next of its sequence, after the requests of that sequence
        that arrived before it (`ticket`, taken on arrival): its outputs, and the bytes
        reserved for its answer. Nothing about the sequence changes before that reservation
        holds, and a request that fails leaves its sequence as it was (a first request
        leaves none)."""
        sequence, x = request.sequence, request.inputs[INPUT]
        assert sequence is not None
        store, load = self.service.store, self.service.load
        await self.arrivals.turn(ticket)  # every earlier arrival is queued where it goes
        key = (SEQUENCE, sequence.id)
        entry = store.find(key)
        if entry is None and not sequence.start:
            raise self.not_started(sequence)
        reserved = load.reserve(self.answer_bound(request), "this request's answer")
        try:
            fresh = entry is None
            if entry is None:
                entry = store.create(self.runtime.stream(), key)  # 429 at the cap
            if sequence.end:  # later arrivals under this id start a new sequence
                store.detach(entry)
            entry.busy += 1
            try:
                acquired = asyncio.ensure_future(entry.lock.acquire())  # queued in order now
                self.arrivals.finish(ticket)
                try:
                    await acquired
                except asyncio.CancelledError:
                    if acquired.done() and not acquired.cancelled():
                        entry.lock.release()
                    raise
                try:
                    if entry.closed and not sequence.start:  # its first request failed
                        raise self.not_started(sequence)
                    if entry.closed:  # a start queued behind a first request that failed
                        raise HTTPError(
                            409,
                            f"sequence {str(sequence.id)[:100]} was closed while this request "
                            "waited (the request that opened it failed); send it again",
                        )
                    outputs = await self.service.call(self.run_step, entry, x, sequence.start)
                except BaseException:
                    if fresh:  # a sequence whose first request failed never began
                        store.close(entry)
                    elif sequence.end and not entry.closed and store.find(key) is None:
                        store.reattach(entry)  # its end failed: the sequence goes on
                    raise
                finally:
                    entry.lock.release()
                if sequence.end:
                    store.close(entry)
                return outputs, reserved
            finally:
                entry.busy -= 1
                entry.last_used = store.clock()
        except BaseException:
            load.give(reserved)
            raise

    def answer(
        self, request: InferRequest, outputs: dict, accept_encoding: str | None
    ) -> tuple[bytes, dict[str, str]]:
        tensors = [(name, outputs[name], binary) for name, binary in request.outputs]
        body, headers = encode_response(self.name, VERSION, request.id, tensors)
        body, encoding = compress(body, accept_encoding)
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        return body, headers

    async def infer(
        self,
        body: bytes,
        header_length: str | None,
        encoding: str | None,
        accept_encoding: str | None = None,
    ) -> tuple[bytes, dict[str, str], int]:
        """The answer (body, headers) to an infer request's body and its headers
        (Inference-Header-Content-Length, Content-Encoding, Accept-Encoding), and the bytes
        reserved for it (a sequence's answer: hand them back once it is sent)."""
        service = self.service
        ticket = self.arrivals.take()  # its place among the requests that arrived
        try:
            request = await service.call(self.read, body, header_length, encoding)
            reserved = 0
            if request.sequence is None:
                self.arrivals.finish(ticket)  # a stateless request waits for no one
                outputs = await service.call(self.run_whole, request.inputs[INPUT])
            else:
                outputs, reserved = await self.run_in_sequence(request, ticket)
        finally:
            self.arrivals.finish(ticket)
        try:
            body, headers = await service.call(self.answer, request, outputs, accept_encoding)
        except BaseException:
            service.load.give(reserved)
            raise
        return body, headers, reserved
