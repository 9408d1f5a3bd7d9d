"""JSON in and out: request bodies as checked objects and float64 arrays, answers as bytes.

Every refusal is an `HTTPError` 400 whose one sentence names what was wrong, so that a
client can fix its request from the answer alone. orjson (the `serve` extra) does the bulk
of the work; the stdlib's json only explains what orjson refuses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from lstm_export.serving.http.limits import HTTPError

JSON = "application/json"
BINARY = "application/octet-stream"


def _reject_constant(name: str) -> None:
    raise HTTPError(
        400, f"the body holds {name}, which is not a finite number; send finite numbers"
    )


def json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _parse(text: str) -> Any:
    """JSON text as Python values: orjson first, the stdlib for what orjson refuses.

    Parsing holds the GIL, so while a large body parses, the event loop (and /healthz) waits:
    orjson takes a third to a half of the time. It refuses NaN, Infinity and deep nesting without
    saying why, so anything it refuses goes to json.loads, whose errors name the problem.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text, parse_constant=_reject_constant)


def decode_object(body: bytes, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
    """The body as a JSON object with only `allowed` keys; 400 with the reason otherwise.

    Only UTF-8 is read (RFC 8259; a BOM is skipped): json.loads would also read UTF-16 and
    UTF-32 bytes, in which the boolean check below could not see a `true`.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HTTPError(
            400,
            f"the request body is not valid JSON: it must be UTF-8, but byte {exc.start} "
            f"is not ({exc.reason})",
        ) from None
    if not text.strip():
        if required:
            raise HTTPError(
                400, f"the request body is empty; send a JSON object with {required[0]!r}"
            )
        return {}
    try:
        data = _parse(text)
    except HTTPError:
        raise
    except RecursionError:
        raise HTTPError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, an int of 4300+ digits
        raise HTTPError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, f"the request body must be a JSON object, got {json_type(data)}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise HTTPError(400, f"unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    missing = [key for key in required if key not in data]
    if missing:
        raise HTTPError(400, f"missing key {missing[0]!r} in the request body")
    # Every value this API takes is a number or a list of numbers, and every key is checked
    # above, so a true/false literal anywhere in the text is a boolean where a number belongs
    # (numpy would otherwise read [1.5, true] as [1.5, 1.0]). json.loads of a str reads a
    # boolean only from these exact letters, so scanning the text parsed misses none.
    if "true" in text or "false" in text:
        raise HTTPError(400, "the body holds true or false where a number belongs; send numbers")
    return data


_KIND_NAMES = {"b": "booleans", "U": "strings", "S": "strings", "O": "null, objects or huge ints"}


def to_array(name: str, value: object) -> np.ndarray:
    """A JSON nested list of numbers as a float64 array; 400 for anything else."""
    if not isinstance(value, list):
        raise HTTPError(400, f"{name} must be a nested list of numbers, got {json_type(value)}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise HTTPError(
            400, f"{name} must be a rectangular nested list of numbers (every row the same length)"
        ) from None
    if array.dtype.kind not in "iuf":
        found = _KIND_NAMES.get(array.dtype.kind, str(array.dtype))
        raise HTTPError(400, f"{name} must hold only numbers, found {found}")
    return array.astype(np.float64, copy=False)


INT64_MAX = (1 << 63) - 1


def to_lengths(value: object) -> np.ndarray:
    """`lengths` as int64 [batch]: a flat JSON list of integers, one per batch row.

    Only JSON integers: 2.0 and 2.5 are refused alike (a length counts steps; numpy would
    read [2, 2.5] as floats and int64 would cut 2.5 to 2). Booleans never get here (see
    `decode_object`). Whether the count and the values fit x is the runtime's check.
    """
    if not isinstance(value, list) or not value:
        shown = "an empty list" if value == [] else json_type(value)
        raise HTTPError(400, f"lengths must be a list of integers, one per batch row, got {shown}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or abs(item) > INT64_MAX:
            shown = _short_json(item) if isinstance(item, int | float) else json_type(item)
            raise HTTPError(
                400, f"lengths must be a list of integers, one per batch row, got {shown}"
            )
    return np.asarray(value, dtype=np.int64)


def _short_json(value: object, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode(data: dict[str, Any]) -> bytes:
    """JSON with arrays as nested lists. orjson writes each float32 in its shortest form that
    reads back to the same float32 (0.1, not 0.10000000149011612): exact, and ~15x faster and
    half the size of the stdlib's float64 digits."""
    plain = {
        k: np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v for k, v in data.items()
    }
    return orjson.dumps(plain, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(message: str) -> bytes:
    """Every error answer's body, whoever sends it (app, protocol): one sentence."""
    return encode({"error": message})


def is_json_type(content_type: str) -> bool:
    """Whether a Content-Type is application/json, with no charset or a UTF-8 one."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != JSON:
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            return False
    return True
