"""The /v2 codec (`lstm_export.serving.http.v2_codec`) on its own: bytes in, checked arrays
or a 400/413/415 out, and answers written as Triton's binary tensor extension lays them out.

No server and no model: a `Signature` of x [-1, -1, 5] -> y [-1, -1, 8]. Every expected value
is written out here (bytes by hand, arrays by numpy), never produced by the codec itself.
"""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest

from lstm_export.serving.http.content_coding import compress, decompress
from lstm_export.serving.http.limits import HTTPError
from lstm_export.serving.http.v2_codec import (
    HEADER_LENGTH,
    SequenceControl,
    Signature,
    TensorSpec,
    encode_response,
    read_request,
    sequence_control,
    split_body,
)

SIGNATURE = Signature(
    "m",
    (TensorSpec("x", "FP32", (-1, -1, 5)),),
    (TensorSpec("y", "FP32", (-1, -1, 8)), TensorSpec("hn", "FP32", (-1, 2, 8))),
)
X = np.arange(15, dtype=np.float32).reshape(1, 3, 5) / 4  # exact in float32 and in JSON


def no_limits(name: str, shape: tuple[int, ...]) -> None:
    return None


def refusal(call, *args) -> HTTPError:
    with pytest.raises(HTTPError) as info:
        call(*args)
    return info.value


def request(
    data=None, *, shape=(1, 3, 5), outputs=None, parameters=None, binary: bytes = b""
) -> tuple[bytes, bytes]:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(shape)}
    if binary:
        tensor["parameters"] = {"binary_data_size": len(binary)}
    else:
        tensor["data"] = X.ravel().tolist() if data is None else data
    body = {"inputs": [tensor]}
    if outputs is not None:
        body["outputs"] = outputs
    if parameters is not None:
        body["parameters"] = parameters
    return json.dumps(body).encode(), binary


def read(header: bytes, binary: bytes = b""):
    return read_request(header, binary, SIGNATURE, no_limits)


# --------------------------------------------------------------------------- the body


def test_split_body_by_the_header_length():
    assert split_body(b'{"a": 1}xyz', None) == (b'{"a": 1}xyz', b"")
    assert split_body(b'{"a": 1}xyz', "8") == (b'{"a": 1}', b"xyz")
    assert split_body(b'{"a": 1}', " 8 ") == (b'{"a": 1}', b"")


@pytest.mark.parametrize(
    "value,fragment",
    [
        ("abc", "must be a byte count, got 'abc'"),
        ("-1", "must be a byte count"),
        ("+8", "must be a byte count"),
        ("8.0", "must be a byte count"),
        ("", "must be a byte count"),
        ("0", "is 0, but the body has 11 bytes"),
        ("12", "is 12, but the body has 11 bytes"),
        ("9" * 30, "must be a byte count"),
        # Latin-1 header bytes that str.isdigit() calls digits but int() refuses: still a 400.
        ("\xb2", "must be a byte count"),
        ("\xb3", "must be a byte count"),
        ("1\xb9", "must be a byte count"),
    ],
    ids=["abc", "negative", "plus", "float", "empty", "zero", "over", "30-digits", "sup2",
         "sup3", "1-sup1"],
)  # fmt: skip
def test_a_bad_header_length_is_a_400(value, fragment):
    error = refusal(split_body, b'{"a": 1}xyz', value)
    assert error.status == 400 and HEADER_LENGTH in error.message
    assert fragment in error.message


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP", " deflate "])
def test_decompress_gzip_and_deflate(encoding):
    body = b'{"inputs": []}' * 10
    packed = gzip.compress(body) if "gzip" in encoding.lower() else zlib.compress(body)
    assert decompress(packed, encoding, 1000) == body
    assert decompress(body, None, 1000) == body
    assert decompress(body, "identity", 1000) == body


def test_decompress_refuses_what_is_not_its_encoding_or_grows_too_large():
    error = refusal(decompress, b"not gzip", "gzip", 1000)
    assert error.status == 400 and "not valid gzip data" in error.message
    error = refusal(decompress, gzip.compress(b"x" * 500)[:20], "gzip", 1000)
    assert error.status == 400 and "not complete gzip data" in error.message
    error = refusal(decompress, gzip.compress(b"x" * 1001), "gzip", 1000)
    assert error.status == 413 and "more than this server's limit of 1000 bytes" in error.message
    assert decompress(gzip.compress(b"x" * 1000), "gzip", 1000) == b"x" * 1000
    error = refusal(decompress, b"abc", "br", 1000)
    assert error.status == 415 and "'br'" in error.message


def test_compress_as_asked():
    body = b"0123456789" * 20
    packed, encoding = compress(body, "gzip")
    assert encoding == "gzip" and gzip.decompress(packed) == body
    packed, encoding = compress(body, "deflate")
    assert encoding == "deflate" and zlib.decompress(packed) == body
    assert compress(body, None) == (body, None)
    assert compress(body, "br") == (body, None)


# --------------------------------------------------------------------------- sequence control


@pytest.mark.parametrize(
    "parameters,expected",
    [
        ({}, None),
        ({"sequence_id": 0}, None),
        ({"sequence_id": ""}, None),
        ({"sequence_id": 5}, SequenceControl(5, False, False)),
        ({"sequence_id": "5", "sequence_start": True}, SequenceControl("5", True, False)),
        ({"sequence_id": 2**64 - 1, "sequence_end": True}, SequenceControl(2**64 - 1, False, True)),
        ({"sequence_id": "s" * 256}, SequenceControl("s" * 256, False, False)),
    ],
)
def test_sequence_control(parameters, expected):
    assert sequence_control(parameters) == expected


@pytest.mark.parametrize(
    "parameters,fragment",
    [
        ({"sequence_id": -1}, "Unable to parse 'sequence_id'"),
        ({"sequence_id": 2**64}, "Unable to parse 'sequence_id'"),
        ({"sequence_id": 1.0}, "Unable to parse 'sequence_id'"),
        ({"sequence_id": True}, "Unable to parse 'sequence_id'"),
        ({"sequence_id": None}, "Unable to parse 'sequence_id'"),
        ({"sequence_id": [1]}, "Unable to parse 'sequence_id'"),
        ({"sequence_id": "s" * 257}, "at most 256"),
        ({"sequence_start": True}, "need a non-zero or non-empty 'sequence_id'"),
        ({"sequence_id": "", "sequence_end": True}, "need a non-zero or non-empty"),
        ({"sequence_id": 1, "sequence_start": 1}, "Unable to parse 'sequence_start'"),
        ({"sequence_id": 1, "sequence_end": "true"}, "Unable to parse 'sequence_end'"),
    ],
)
def test_bad_sequence_control_is_a_400(parameters, fragment):
    error = refusal(sequence_control, parameters)
    assert error.status == 400 and fragment in error.message


# --------------------------------------------------------------------------- requests


def test_json_data_flat_nested_and_integers():
    for data in (X.ravel().tolist(), X.tolist(), X[0].tolist()):
        parsed = read(request(data)[0])
        np.testing.assert_array_equal(parsed.inputs["x"], X)
        assert parsed.inputs["x"].dtype == np.float32
    ints = read(request(list(range(15)))[0]).inputs["x"]
    np.testing.assert_array_equal(ints, np.arange(15, dtype=np.float32).reshape(1, 3, 5))


def test_binary_data():
    parsed = read(*request(binary=X.astype("<f4").tobytes()))
    np.testing.assert_array_equal(parsed.inputs["x"], X)
    assert parsed.inputs["x"].dtype == np.float32 and parsed.sequence is None


@pytest.mark.parametrize(
    "data",
    [
        [*X.ravel().tolist()[:-1], True],  # floats and a boolean
        [0] * 14 + [True],  # integers and a boolean: numpy makes it an integer array
        [[0] * 5, [0] * 5, [0] * 4 + [False]],
        [True] * 15,
        [*X.ravel().tolist()[:-1], "1"],
        [*X.ravel().tolist()[:-1], None],
    ],
    ids=["float-true", "int-true", "int-false-nested", "all-bool", "string", "null"],
)
def test_data_must_hold_only_numbers(data):
    error = refusal(read, request(data)[0])
    assert error.status == 400 and "must hold only numbers" in error.message


def test_outputs_asked_for():
    assert read(request()[0]).outputs == (("y", False), ("hn", False))
    binary = read(request(parameters={"binary_data_output": True})[0])
    assert binary.outputs == (("y", True), ("hn", True))
    one = read(request(outputs=[{"name": "hn", "parameters": {"binary_data": True}}])[0])
    assert one.outputs == (("hn", True),)


def test_an_empty_outputs_list_names_no_output_so_all_come_back():
    """Triton (InferenceRequest::Normalize): no requested outputs means all of them; the
    README: "only the requested outputs returned (all of them when none are named)"."""
    assert read(request(outputs=[])[0]).outputs == (("y", False), ("hn", False))


# --------------------------------------------------------------------------- answers


def test_a_binary_answer_is_the_header_then_raw_float32():
    y = np.arange(6, dtype=np.float32).reshape(1, 2, 3) - 2.5
    h = np.full((1, 2, 2), 0.25, dtype=np.float32)
    body, headers = encode_response("m", "1", "r", [("y", y, True), ("hn", h, False)])
    length = int(headers[HEADER_LENGTH])
    assert headers["Content-Type"] == "application/octet-stream"
    header = json.loads(body[:length])
    assert header == {
        "model_name": "m",
        "model_version": "1",
        "id": "r",
        "outputs": [
            {
                "name": "y",
                "datatype": "FP32",
                "shape": [1, 2, 3],
                "parameters": {"binary_data_size": 24},
            },
            {"name": "hn", "datatype": "FP32", "shape": [1, 2, 2], "data": [0.25] * 4},
        ],
    }
    assert body[length:] == b"".join(
        np.float32(v).tobytes() for v in [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    )


def test_a_json_answer_has_no_header_length_and_no_empty_id():
    y = np.array([[[0.1, 1e-8, -3.0]]], dtype=np.float32)
    body, headers = encode_response("m", "1", "", [("y", y, False)])
    assert headers == {"Content-Type": "application/json"}
    answer = json.loads(body)
    assert "id" not in answer
    # JSON numbers that read back as the very same float32 values
    np.testing.assert_array_equal(np.asarray(answer["outputs"][0]["data"], np.float32), y.ravel())


def test_keys_beyond_the_protocols_are_ignored_as_triton_ignores_them():
    header, binary = request()
    body = json.loads(header) | {"model_name": "m", "extra": {"anything": [1, True]}}
    parsed = read_request(json.dumps(body).encode(), binary, SIGNATURE, no_limits)
    np.testing.assert_array_equal(parsed.inputs["x"], X)


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("gzip, deflate", "gzip"),
        ("deflate, gzip", "deflate"),
        ("br, deflate;q=0.5", "deflate"),
        ("gzip;q=0, deflate", "deflate"),
        ("GZIP", "gzip"),
        ("br, identity", None),
        ("gzip;q=0", None),
        (None, None),
    ],
)
def test_the_first_accepted_encoding_we_have_is_used(accept, chosen):
    body = b'{"outputs": []}' * 10
    packed, encoding = compress(body, accept)
    assert encoding == chosen
    unpacked = {"gzip": gzip.decompress, "deflate": zlib.decompress, None: bytes}[chosen]
    assert unpacked(packed) == body
