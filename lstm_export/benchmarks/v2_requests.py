"""The Open Inference Protocol's infer requests as `serve-bench` sends them (KServe v2, as
Triton speaks it over HTTP), and the check of their answers: tensors as JSON or as Triton's
binary tensor data, stateless or in a sequence.

Written from the protocol, not from the server's codec: benchmarks do not import serving
(sibling layers), and a load generator sharing the server's codec would not notice when both
were wrong in the same way. Stdlib and numpy only.
"""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import quote

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT, OUTPUT = "x", "y"
FP32 = np.dtype("<f4")  # the protocol's FP32: little-endian float32, whatever this machine's


def model_path(model: str) -> str:
    """The model's metadata route; its infer route is this plus /infer."""
    return f"/v2/models/{quote(model, safe='')}"


def sequence_parameters(sequence_id: int, *, start: bool, end: bool) -> dict[str, Any]:
    """A request's parameters that make it the next of sequence `sequence_id` (Triton's
    sequence extension): `start` on its first request, `end` on its last."""
    return {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end}


def infer_request(
    x: np.ndarray, *, binary: bool, parameters: dict[str, Any] | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an infer request of batch-first x [batch, seq, input_size]
    that asks for y alone, both in the same encoding: the JSON `data` of each (`binary`
    False), or the JSON header followed by x's raw bytes, its length in
    Inference-Header-Content-Length, and y asked back as raw bytes (`binary` True)."""
    x = np.ascontiguousarray(x, dtype=FP32)
    tensor: dict[str, Any] = {"name": INPUT, "shape": list(x.shape), "datatype": "FP32"}
    blob = x.tobytes() if binary else b""
    if binary:
        tensor["parameters"] = {"binary_data_size": len(blob)}
    else:
        tensor["data"] = x.ravel().tolist()
    request: dict[str, Any] = {
        "inputs": [tensor],
        "outputs": [{"name": OUTPUT, "parameters": {"binary_data": binary}}],
    }
    if parameters:
        request["parameters"] = parameters
    header = json.dumps(request, separators=(",", ":")).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return header + blob, headers


def answer_problem(
    body: bytes, header_length: str | None, shape: tuple[int, ...], binary: bool
) -> str | None:
    """Why a 200 answer to `infer_request(..., binary=binary)` is not y of `shape` (FP32) in
    the encoding asked for, in one clause; None when it is."""
    if binary:
        if header_length is None or not header_length.strip().isdigit():
            return f"a binary answer came without a valid {HEADER_LENGTH} ({header_length!r})"
        length = int(header_length)
        if not 0 < length <= len(body):
            return f"{HEADER_LENGTH} is {length}, but the answer has {len(body)} bytes"
        header, blob = body[:length], body[length:]
    else:
        if header_length is not None:
            return f"y was asked for as JSON, but the answer has {HEADER_LENGTH}: {header_length}"
        header, blob = body, b""
    try:
        data = json.loads(header)
    except ValueError:
        return f"the answer's header is not JSON: {header[:80]!r}"
    outputs = data.get("outputs") if isinstance(data, dict) else None
    names = (
        [o.get("name") for o in outputs if isinstance(o, dict)] if isinstance(outputs, list) else []
    )
    if names != [OUTPUT] or len(outputs) != 1:
        return f"the answer's outputs are not just {OUTPUT!r}: {str(outputs)[:120]}"
    (y,) = outputs
    if y.get("datatype") != "FP32" or y.get("shape") != list(shape):
        return f"{OUTPUT!r} is {y.get('datatype')} {y.get('shape')}, expected FP32 {list(shape)}"
    count = math.prod(shape)
    if binary:
        size = (y.get("parameters") or {}).get("binary_data_size")
        if "data" in y or size != count * FP32.itemsize or len(blob) != size:
            return (
                f"{OUTPUT!r} came as {len(blob)} raw bytes (binary_data_size {size}, "
                f"'data' {'present' if 'data' in y else 'absent'}); "
                f"its shape takes {count * FP32.itemsize}"
            )
        return None
    values = y.get("data")
    if not isinstance(values, list) or len(values) != count:
        got = len(values) if isinstance(values, list) else type(values).__name__
        return f"{OUTPUT!r}'s 'data' holds {got} values, its shape {count}"
    try:
        np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError):
        return f"{OUTPUT!r}'s 'data' is not a flat list of numbers"
    return None
