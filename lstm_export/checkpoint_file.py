"""Reading a checkpoint file: a `torch.save` state dict, as data and never as code.

Only a regular file is read, with `torch.load(weights_only=True)`; anything else it could
hold (a whole pickled model, another object, a truncated file, tensors without dense data)
is refused in one line saying what it holds and what to save instead. Which model the
weights belong to is `lstm_export.checkpoints`' business.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from lstm_export.config import printable
from lstm_export.errors import UsageError
from lstm_export.files import file_kind

# Wrappers training scripts commonly put around the state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes DataParallel and torch.compile add to every key.
_KEY_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED = 5
"""Keys an error line names before "and N more": 20,000 stray keys are one short line."""
_KEY_CHARS = 80  # a key longer than this is cut in an error line


def shown_key(key: str) -> str:
    """A key from the file as an error line shows it: escaped, and cut if very long."""
    return printable(key, _KEY_CHARS)


def listing(items: Iterable[str], limit: int = MAX_LISTED) -> str:
    """`a, b, c and 19,997 more`: at most `limit` items (already formatted) in one line."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit:,} more" if len(items) > limit else "")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a state dict from `path` without unpickling arbitrary objects.

    Only a regular file is read (a FIFO would block, /dev/zero never end): the file is
    opened without blocking and its type checked on the open descriptor, then torch reads
    that same descriptor. No size limit: checkpoints are as large as their weights.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"checkpoint {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UsageError(f"checkpoint {path} must be a regular file, but it is {file_kind(mode)}")
    with os.fdopen(fd, "rb") as handle:
        try:
            head = handle.read(2)
            handle.seek(0)
        except OSError as exc:
            raise UsageError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
        # torch.save writes a zip archive ("PK") or, in its legacy format, a pickle (0x80).
        if head != b"PK" and not head.startswith(b"\x80"):
            what = "it is empty" if not head else "neither a zip archive nor a pickle"
            raise UsageError(
                f"checkpoint {path} is not a torch.save file ({what}); "
                f"save one with torch.save(model.state_dict(), path)"
            )
        try:
            with warnings.catch_warnings():  # torch warns about old pickle protocols
                warnings.simplefilter("ignore")
                data = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file; all mean the same
            raise UsageError(_refusal(path, exc, zipped=head == b"PK", handle=handle)) from None
    state = _unwrap(data, str(path))
    check_tensor_kinds(state, f"checkpoint {path}")
    return state


# torch's load errors advise unpickling anyway (weights_only=False, add_safe_globals): never
# repeat that, a checkpoint from an untrusted source must stay data.
_ADVICE = re.compile(r"weights.only|safe_globals|trust|documentation|file an issue", re.IGNORECASE)
# Classes whose pickle means `torch.save(model)` rather than `torch.save(model.state_dict())`.
_MODULE_PREFIXES = ("torch.nn.", "lstm_export.")


_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# What a pickle cut short makes the unpickler say (the legacy, non-zip format).
_CUT_SHORT = re.compile(r"EOF|unpack requires a buffer|index out of range|truncated", re.I)


def _refusal(
    path: Path, exc: Exception, *, zipped: bool = False, handle: BinaryIO | None = None
) -> str:
    """One line on why torch's safe loader refused `path`, and what to save instead."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    # A zip archive's directory is at its very end: a cut-short copy has none, and torch
    # then reports anything from "failed finding central directory" to "[Errno 22]".
    if zipped and handle is not None and not _has_zip_end(handle):
        return _truncated(path, "a zip archive without its end record")
    if not zipped and (isinstance(exc, EOFError) or _CUT_SHORT.search(text)):
        return _truncated(path, "its pickle ends early")
    found = re.search(r"GLOBAL\s+(\S*)", text)
    if found and not _could_be_real(found.group(1)):  # a name cut short: "collections.Order"
        name = printable(found.group(1), _KEY_CHARS)
        return _truncated(path, f"its pickle names {name!r}, which does not exist")
    if found and found.group(1).startswith(_MODULE_PREFIXES):
        return (
            f"checkpoint {path} holds a whole pickled model ({found.group(1)}), "
            f"not a plain state dict; save model.state_dict() instead"
        )
    if found:
        return (
            f"checkpoint {path} is not a plain state dict: it contains a pickled object "
            f"({found.group(1)}), which is never loaded here; save model.state_dict() instead"
        )
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return (
            f"checkpoint {path} is not a plain state dict written by torch.save: its pickle "
            f"uses an instruction (opcode {found.group(1)}) that the safe loader does not read; "
            f"save model.state_dict() with torch.save instead"
        )
    text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)  # libtorch's C++ location
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line.split(". ")[0].rstrip(".") for line in lines if not _ADVICE.search(line)]
    reason = reasons[0] if reasons else type(exc).__name__
    return (
        f"checkpoint {path} is not a readable torch.save file of a state dict: "
        f"{printable(reason, 200)}"
    )


def _truncated(path: Path, why: str) -> str:
    return (
        f"checkpoint {path} is truncated or corrupt: {why} (an interrupted save or copy?); "
        f"save or copy it again"
    )


def _could_be_real(name: str) -> bool:
    """False for a dotted name that cannot be a real class: an empty part, or a name missing
    from a module already loaded. Nothing is imported for this (the name is from the file)."""
    if not _DOTTED_NAME.fullmatch(name):
        return False
    module, _, attr = name.rpartition(".")
    loaded = sys.modules.get(module)
    return loaded is None or attr in vars(loaded)


def _has_zip_end(handle: BinaryIO) -> bool:
    """Whether the open file ends with a zip archive's end record, as a whole one does."""
    try:
        handle.seek(0)
        return zipfile.is_zipfile(handle)
    except (OSError, ValueError):
        return False


def _unwrap(data: object, source: str) -> dict[str, Tensor]:
    if isinstance(data, Mapping) and not _all_tensors(data):
        for key in _WRAPPER_KEYS:
            if isinstance(data.get(key), Mapping) and _all_tensors(data[key]):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not data or not _all_tensors(data):
        raise UsageError(
            f"checkpoint {source} must hold a state dict (a mapping of names to tensors), "
            f"got {_describe(data)}"
        )
    state = {str(k): v for k, v in data.items()}
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _all_tensors(data: Mapping) -> bool:
    return all(isinstance(v, Tensor) for v in data.values())


def _describe(data: object) -> str:
    if isinstance(data, Mapping):
        kinds = sorted({type(v).__name__ for v in data.values() if not isinstance(v, Tensor)})
        return f"a mapping with non-tensor values ({', '.join(kinds)})" if kinds else "an empty one"
    return f"a {type(data).__name__}"


def check_tensor_kinds(state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Refuse tensors that hold no plain dense data: meta (a shape without numbers),
    sparse (COO, CSR, ...) and quantized ones. They claim shapes they do not store, and
    everything downstream (shapes, sums, load_state_dict) assumes dense numbers."""
    for key, tensor in state.items():
        if tensor.is_meta or tensor.device.type == "meta":
            what = "a meta tensor (a shape without data)"
        elif tensor.layout != torch.strided:
            what = f"a sparse tensor ({str(tensor.layout).removeprefix('torch.')})"
        elif tensor.is_quantized:
            what = "a quantized tensor"
        else:
            continue
        raise UsageError(
            f"{source}: {shown_key(key)} is {what}; expected a dense tensor of numbers "
            f"(save the model's own state_dict())"
        )
