"""Files: content hashes, and folders that appear whole or not at all.

No torch here: the Triton writer and the runtime use this too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from lstm_export.artifacts import EXPORT_FILES, MANIFEST_FILE, ONNX_FILE, TORCHSCRIPT_FILE
from lstm_export.errors import UsageError

# Configs, manifests and metadata we write are a few KiB; 1 MiB is room for any honest one
# and a bound on what a hostile one (/dev/zero, a 3 GB file) can make us read.
MAX_TEXT_BYTES = 1 << 20
# Our JSON nests 5 deep; deeper is not ours, and unbounded nesting is a RecursionError.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def artifact(path: Path | str, filename: str) -> Path:
    """`path` itself, or `path/filename` when `path` is an export folder; refused if missing."""
    path = Path(path)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise UsageError(
            f"expected an export folder or a {Path(filename).suffix} file, "
            f"but {path} does not exist"
        )
    return path


def check_export_folder(folder: Path) -> None:
    """Refuse what is not an export folder holding both model.pt and model.onnx."""
    if not folder.is_dir():
        raise UsageError(f"expected an export folder, but {folder} is not a directory")
    missing = [n for n in (TORCHSCRIPT_FILE, ONNX_FILE) if not (folder / n).exists()]
    if missing:
        raise UsageError(f"export folder {folder} lacks {', '.join(missing)}{_why_not(folder)}")
    for name in (TORCHSCRIPT_FILE, ONNX_FILE):  # a FIFO or a device there: said as such
        check_regular_file(folder / name, "artifact")


def _why_not(folder: Path) -> str:
    """What the folder's manifest says was not written (torch.jit.script refused model.pt),
    escaped and clipped, to end a one-line error; "" when it says nothing readable."""
    try:
        manifest = read_manifest(folder)
    except UsageError:
        return ""
    said = manifest.get("export_warnings") if isinstance(manifest, dict) else None
    said = [w for w in said if isinstance(w, str)] if isinstance(said, list) else []
    if not said:
        return ""
    text = repr(said[0])[1:-1]  # control characters escaped
    return f" (its {MANIFEST_FILE} says: {text[:300]})"


@contextlib.contextmanager
def locked_folder(folder: Path) -> Iterator[None]:
    """Serialize builds into one folder (parallel pytest workers, two CLI calls)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, builds are rare enough
        yield
        return
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_file(path: Path, data: bytes | bytearray | memoryview | str) -> None:
    """Write `data` to `path`; an OSError names the file (a plain write's does not, and
    "File too large" alone does not say which of an export's files hit the limit)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """A manifest's vouching for one artifact: its sha256 and size."""
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def write_json(path: Path, data: dict) -> None:
    """A manifest or report as strict JSON (no NaN or Infinity, which other parsers refuse)."""
    write_file(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def file_kind(mode: int) -> str:
    """What a non-regular file is, for an error line ("a named pipe", "a device", ...)."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path: Path, what: str, *, allow_empty: bool = False) -> os.stat_result:
    """`path`'s stat (links followed), refused with one line unless it is a regular file
    (and not empty, unless `allow_empty`): before a reader opens it, a FIFO would block it
    forever and /dev/zero would feed it without end."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as exc:  # a name too long, no permission, a link loop
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(
            f"{what} {path} must be a regular file, but it is {file_kind(info.st_mode)}"
        )
    if info.st_size == 0 and not allow_empty:
        raise UsageError(f"{what} {path} is empty (0 bytes)")
    return info


def read_bytes(path: Path, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of `path`, refused unless it is a regular file of at most `limit` bytes.

    Opened without blocking and checked on the open descriptor, so a FIFO or a device
    (`/dev/zero` behind a symlink) is refused instead of read until memory runs out.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UsageError(
            f"{what} {path} must be a regular file, but it is {file_kind(info.st_mode)}"
        )
    if info.st_size > limit:
        os.close(fd)
        raise UsageError(f"{what} {path} is {info.st_size:,} bytes; expected at most {limit:,}")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:  # grew while we read it
        raise UsageError(f"{what} {path} is over {limit:,} bytes")
    return data


def read_text(path: Path, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """`read_bytes` decoded as UTF-8, refused with one line if it is not."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None


def parse_json(text: str | bytes, source: str) -> object:
    """JSON text parsed, refused with one line if malformed or nested beyond MAX_JSON_DEPTH.

    Bytes (TorchScript's extra files, ONNX metadata read raw) must be UTF-8.
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{source} is not UTF-8 text (byte {exc.start})") from None
    depth = deepest = 0
    for char in _JSON_STRING.sub("", text):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise UsageError(f"{source} nests {deepest} levels deep; expected at most {MAX_JSON_DEPTH}")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from None


def read_manifest(folder: Path) -> dict | None:
    """`folder`'s manifest.json as an object, None if the folder has none; refused if unreadable."""
    path = Path(folder) / MANIFEST_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    manifest = parse_json(read_text(path, "manifest"), str(path))
    if not isinstance(manifest, dict):
        raise UsageError(
            f"{path} is not a valid manifest: expected a JSON object, got {type(manifest).__name__}"
        )
    return manifest


def replaceable_export(folder: Path) -> None:
    """Refuse to replace `folder` unless it is empty or an export holding only what an
    export writes: siblings, checkpoints and notes of the user's are never deleted."""
    _check_not_a_link_or_file(folder)
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    if MANIFEST_FILE not in entries:
        raise UsageError(
            f"{folder} is neither empty nor an lstm-export export (no {MANIFEST_FILE}); "
            "--force replaces only those, so choose another --out"
        )
    read_manifest(folder)  # a manifest that does not parse is not one we wrote
    # By name and kind: a folder called model.pt holds someone's files, not an artifact.
    foreign = [
        name
        for name in entries
        if name not in (*EXPORT_FILES, MANIFEST_FILE)
        or not stat.S_ISREG((folder / name).lstat().st_mode)
    ]
    if foreign:
        shown = ", ".join(map(repr, foreign[:5]))
        if len(foreign) > 5:
            shown += f" and {len(foreign) - 5} more"
        raise UsageError(
            f"{folder} holds files an export did not write ({shown}); --force replaces "
            "only an export's own files: move those out first"
        )


def check_destination(out_dir: Path, force: bool) -> Path:
    """`out_dir` if an export may be written there: new, or replaceable with `force`.

    The current folder and its ancestors are refused: replacing them would pull the
    ground from under the shell that ran us.
    """
    out_dir = Path(out_dir)
    for i, part in enumerate(out_dir.parts):
        # mkdir would make `new/` to reach `new/../m`; the OS alone cannot say what it means
        if part == ".." and not Path(*out_dir.parts[:i]).is_dir():
            raise UsageError(
                f"--out {out_dir} goes through {Path(*out_dir.parts[:i])}, which is not an "
                "existing folder; write the path without '..'"
            )
    _check_not_a_link_or_file(out_dir)
    if not out_dir.exists():
        return out_dir
    if not force:
        raise UsageError(f"{out_dir} already exists; pass --force to replace it")
    here, resolved = Path.cwd().resolve(), out_dir.resolve()
    if resolved == here or resolved in here.parents:
        raise UsageError(
            f"--out {out_dir} is the current folder or holds it; run from elsewhere or "
            "choose another --out"
        )
    replaceable_export(out_dir)
    return out_dir


def check_keep_failed(keep_failed: Path | str, out_dir: Path) -> Path:
    """Where a refused export's files may go: a new folder that can be made, outside the
    destination (which a refused export leaves untouched)."""
    keep_failed = Path(keep_failed)
    if keep_failed.exists() or keep_failed.is_symlink():
        raise UsageError(f"{keep_failed} already exists; --keep-failed needs a new folder")
    kept, destination = keep_failed.resolve(), Path(out_dir).resolve()
    if kept == destination or destination in kept.parents:
        raise UsageError(
            f"--keep-failed {keep_failed} is inside the export's destination {out_dir}; "
            "choose a folder elsewhere"
        )
    if kept in destination.parents:  # the export would create it on its way to out_dir
        raise UsageError(
            f"--keep-failed {keep_failed} holds the export's destination {out_dir}; "
            "choose a folder beside it instead"
        )
    parent = next(p for p in kept.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"--keep-failed {keep_failed} cannot be created: {parent} is not a writable folder"
        )
    return keep_failed


def _check_not_a_link_or_file(out_dir: Path) -> None:
    if out_dir.is_symlink():  # replacing a link would replace the link, not its folder
        raise UsageError(
            f"--out {out_dir} is a symbolic link; give the folder it points to "
            f"({out_dir.resolve()}) or another --out"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a folder; choose another --out")
