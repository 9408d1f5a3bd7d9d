"""The Open Inference Protocol's tensors (KServe v2, as Triton speaks it over HTTP): an infer
request's JSON header and binary tensors in, checked arrays out; answers as JSON, or as a
JSON header followed by raw tensor bytes (Triton's binary tensor data extension).

Bytes in, objects out: no HTTP framework and no model. The model's side is a
`Signature` (what it takes and gives, and the name errors mention). Every refusal is an
`HTTPError` 400 with one sentence, worded after Triton's own where it has one, so that a
client sees the same reason from `serve` and from Triton.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from lstm_export.serving.http.codec import BINARY, JSON, json_type
from lstm_export.serving.http.limits import HTTPError

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {"FP32": np.dtype("<f4")}
"""The protocol's datatypes this model's tensors use, as little-endian numpy types."""
MAX_SEQUENCE_ID_LENGTH = 256
"""A string sequence id longer than this is refused: ids are kept while a sequence lives."""
UINT64_MAX = (1 << 64) - 1
FLAG_PARAMETERS = ("sequence_start", "sequence_end", "binary_data_output")
UINT_PARAMETERS = ("priority", "timeout")  # read and checked as Triton does, then unused


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the protocol's model metadata shows it: name, datatype, shape (-1:
    any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    """What a served model takes and gives, and its name for messages."""

    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class SequenceControl:
    """A request's place in a stateful sequence: its id (int or str), start and end flags."""

    id: int | str
    start: bool
    end: bool


@dataclass(frozen=True)
class InferRequest:
    """A checked infer request: its id, its input arrays by name (in the datatype's numpy
    type, shaped as sent), the outputs asked for with whether each goes binary, and its
    sequence control (None: a stateless request)."""

    id: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[tuple[str, bool], ...]
    sequence: SequenceControl | None


def bad(message: str) -> HTTPError:
    return HTTPError(400, message)


# ---- the body: decompressed, split into the JSON header and the binary tensors


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON header, the binary tensors that follow it), by Inference-Header-Content-Length
    (absent: the whole body is JSON)."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19:  # not "²": int() refuses
        raise bad(f"{HEADER_LENGTH} must be a byte count, got {header_length[:40]!r}")
    length = int(text)
    if not 0 < length <= len(body):
        raise bad(
            f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes; it must be "
            "the JSON header's size, more than 0 and at most the body's"
        )
    return body[:length], body[length:]


def parse_header(header: bytes) -> dict[str, Any]:
    """The JSON header as an object; 400 naming what is wrong with it. Keys other than
    the protocol's (id, inputs, outputs, parameters) are ignored, as Triton ignores them."""
    try:
        data = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise bad(f"the inference request header is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad(f"the inference request must be a JSON object, got {json_type(data)}")
    return data


# ---- the header's fields


def _object(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{what} must be a JSON object, got {json_type(value)}")
    return value


def _flag(parameters: dict[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise bad(f"Unable to parse '{name}': expected true or false, got {json_type(value)}")
    return value


def _uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX


def sequence_control(parameters: dict[str, Any]) -> SequenceControl | None:
    """The request's sequence parameters, or None for a request outside any sequence
    (no sequence_id, or Triton's "none": 0 or "")."""
    start, end = _flag(parameters, "sequence_start"), _flag(parameters, "sequence_end")
    sequence_id = parameters.get("sequence_id", 0)
    if isinstance(sequence_id, str):
        if len(sequence_id) > MAX_SEQUENCE_ID_LENGTH:
            raise bad(
                f"'sequence_id' is a string of {len(sequence_id)} characters; this server "
                f"takes at most {MAX_SEQUENCE_ID_LENGTH}"
            )
    elif not _uint(sequence_id):
        shown = sequence_id if isinstance(sequence_id, int | float) else json_type(sequence_id)
        raise bad(
            f"Unable to parse 'sequence_id': expected an unsigned 64-bit integer or a string, "
            f"got {str(shown)[:40]}"
        )
    if sequence_id in (0, ""):
        if start or end:
            raise bad("sequence_start and sequence_end need a non-zero or non-empty 'sequence_id'")
        return None
    return SequenceControl(sequence_id, start, end)


def _shape(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_uint(d) for d in value):
        raise bad(f"Unable to parse 'shape' of input '{name}': expected a list of integers >= 0")
    return tuple(value)


def _matches(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    return len(shape) == len(spec.shape) and all(
        want in (-1, got) for got, want in zip(shape, spec.shape, strict=True)
    )


def _json_data(value: object, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A tensor's JSON `data` (flat, or nested in any row-major way) as an array of `shape`.

    Only numbers: numpy would read [1.5, true] as [1.5, 1.0], so the numbers are written
    back out (orjson, in C) and any letter t or f there is a boolean where a number belongs.
    """
    if not isinstance(value, list):
        raise bad(f"'data' of input '{name}' must be a list of numbers, got {json_type(value)}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise bad(
            f"'data' of input '{name}' must be a list of numbers (nested rectangularly)"
        ) from None
    if array.dtype.kind not in "iuf" or (array.size and _has_booleans(value)):
        raise bad(f"'data' of input '{name}' must hold only numbers")
    count = math.prod(shape)
    if array.size != count:
        raise bad(
            f"unexpected number of elements for input '{name}': its shape {list(shape)} "
            f"holds {count}, its 'data' {array.size}"
        )
    return array.reshape(shape).astype(dtype)


def _has_booleans(value: list) -> bool:
    """Whether numbers read by numpy hid a boolean ([1.5, true] reads as floats, [1, true]
    as integers): written back out by orjson, numbers hold no letter t or f."""
    text = orjson.dumps(value)
    return b"t" in text or b"f" in text


def read_inputs(
    data: dict[str, Any],
    binary: bytes,
    signature: Signature,
    check_shape: Callable[[str, tuple[int, ...]], None],
) -> dict[str, np.ndarray]:
    """The request's inputs, each checked against the signature (name, datatype, shape)
    and `check_shape` (the server's size limits) before its data is read; binary tensors
    are taken from `binary` in the order of the inputs that carry `binary_data_size`, which
    must add up to exactly its length."""
    inputs = data.get("inputs")
    if not isinstance(inputs, list):
        raise bad(f"Unable to parse 'inputs': expected a list, got {json_type(inputs)}")
    specs = {spec.name: spec for spec in signature.inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for item in inputs:
        if not isinstance(item, dict):
            raise bad(f"each of 'inputs' must be a JSON object, got {json_type(item)}")
        name = item.get("name")
        if not isinstance(name, str):
            raise bad(f"Unable to parse 'name' of an input: got {json_type(name)}")
        spec = specs.get(name)
        if spec is None:
            raise bad(
                f"unexpected inference input '{name[:60]}' for model '{signature.model}'; "
                f"it takes {sorted(specs)}"
            )
        if name in arrays:
            raise bad(f"input '{name}' is given twice")
        datatype = item.get("datatype")
        if datatype != spec.datatype:
            shown = datatype[:20] if isinstance(datatype, str) else json_type(datatype)
            raise bad(
                f"unexpected datatype {shown} for inference input '{name}', expecting "
                f"{spec.datatype} for model '{signature.model}'"
            )
        shape = _shape(item.get("shape"), name)
        if not _matches(shape, spec):
            raise bad(
                f"unexpected shape for input '{name}' for model '{signature.model}'. "
                f"Expected {list(spec.shape)}, got {list(shape)}"
            )
        check_shape(name, shape)
        parameters = _object(item.get("parameters"), f"'parameters' of input '{name}'")
        if "shared_memory_region" in parameters:
            raise bad("shared memory is not supported by this server; send the tensor's data")
        dtype = DATATYPES[spec.datatype]
        size = parameters.get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise bad(f"input '{name}' has both 'data' and 'binary_data_size'; send one")
            if not _uint(size):
                raise bad(f"Unable to parse 'binary_data_size' of input '{name}'")
            expected = math.prod(shape) * dtype.itemsize
            if size != expected:
                raise bad(
                    f"unexpected size {size} for input '{name}': its shape {list(shape)} of "
                    f"{spec.datatype} takes {expected} bytes"
                )
            if offset + size > len(binary):
                raise bad(
                    f"unexpected size for input '{name}', expecting {offset + size - len(binary)} "
                    f"additional bytes for model '{signature.model}'"
                )
            chunk = binary[offset : offset + size]
            arrays[name] = (
                np.frombuffer(chunk, dtype).reshape(shape).astype(dtype.newbyteorder("="))
            )
            offset += size
        elif "data" in item:
            arrays[name] = _json_data(item["data"], name, shape, dtype.newbyteorder("="))
        else:
            raise bad(f"input '{name}' has no 'data' and no 'binary_data_size'")
    if offset != len(binary):
        raise bad(f"unexpected additional input data for model '{signature.model}'")
    missing = [name for name in specs if name not in arrays]
    if missing:
        raise bad(
            f"expected {len(specs)} inputs but got {len(arrays)} inputs for model "
            f"'{signature.model}': missing {missing}"
        )
    return arrays


def read_outputs(
    data: dict[str, Any], signature: Signature, binary_default: bool
) -> tuple[tuple[str, bool], ...]:
    """The outputs asked for, each with whether it goes binary; all of them (binary if the
    request's `binary_data_output` says so) when the request names none."""
    outputs = data.get("outputs")
    names = [spec.name for spec in signature.outputs]
    if outputs is None or outputs == []:  # none named: all of them (Triton's Normalize)
        return tuple((name, binary_default) for name in names)
    if not isinstance(outputs, list):
        raise bad(f"Unable to parse 'outputs': expected a list, got {json_type(outputs)}")
    chosen: dict[str, bool] = {}
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad("each of 'outputs' must be a JSON object with a 'name'")
        name = item["name"]
        if name not in names:
            raise bad(
                f"unexpected inference output '{name[:60]}' for model '{signature.model}'; "
                f"it gives {names}"
            )
        if name in chosen:
            raise bad(f"output '{name}' is asked for twice")
        parameters = _object(item.get("parameters"), f"'parameters' of output '{name}'")
        if parameters.get("classification"):
            raise bad("the classification extension is not supported by this server")
        if "shared_memory_region" in parameters:
            raise bad("shared memory is not supported by this server; ask for the data")
        chosen[name] = (
            _flag(parameters, "binary_data") if "binary_data" in parameters else (binary_default)
        )
    return tuple(chosen.items())


def read_request(
    header: bytes,
    binary: bytes,
    signature: Signature,
    check_shape: Callable[[str, tuple[int, ...]], None],
) -> InferRequest:
    """A whole infer request, checked: no part of it is acted on before all of it is read."""
    data = parse_header(header)
    request_id = data.get("id", "")
    if not isinstance(request_id, str):
        raise bad(f"Unable to parse 'id': expected a string, got {json_type(request_id)}")
    parameters = _object(data.get("parameters"), "'parameters' of the request")
    reserved = [key for key in parameters if key.startswith("triton_")]
    if reserved:
        raise bad(
            "parameter keys starting with 'triton_' are reserved for Triton usage and should "
            "not be specified"
        )
    for name in UINT_PARAMETERS:
        if name in parameters and not _uint(parameters[name]):
            raise bad(f"Unable to parse '{name}': expected an unsigned integer")
    sequence = sequence_control(parameters)
    binary_default = _flag(parameters, "binary_data_output")
    inputs = read_inputs(data, binary, signature, check_shape)
    outputs = read_outputs(data, signature, binary_default)
    return InferRequest(request_id, inputs, outputs, sequence)


# ---- the answer


def encode_response(
    model: str,
    version: str,
    request_id: str,
    tensors: Sequence[tuple[str, np.ndarray, bool]],
) -> tuple[bytes, dict[str, str]]:
    """The answer's body and its headers: JSON, or, when any tensor goes binary, the JSON
    header (its size in Inference-Header-Content-Length) followed by those tensors' raw
    little-endian bytes in the order the header lists them."""
    outputs, blobs = [], []
    for name, array, binary in tensors:
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array, DATATYPES["FP32"]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = np.ascontiguousarray(array).ravel()
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id:
        answer["id"] = request_id
    answer["outputs"] = outputs
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"Content-Type": JSON}
    headers = {"Content-Type": BINARY, HEADER_LENGTH: str(len(header))}
    return b"".join([header, *blobs]), headers
