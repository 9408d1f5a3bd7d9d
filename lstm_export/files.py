"""Files: content hashes, and folders that appear whole or not at all.

No torch here: the Triton writer and the runtime use this too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lstm_export.artifacts import ONNX_FILE, TORCHSCRIPT_FILE
from lstm_export.errors import UsageError


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
    missing = [n for n in (TORCHSCRIPT_FILE, ONNX_FILE) if not (folder / n).is_file()]
    if missing:
        raise UsageError(f"export folder {folder} lacks {', '.join(missing)}")


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Build into a hidden folder beside `final`; move it into place only if the block succeeds.

    An existing `final` is replaced (callers decide whether that is allowed) and
    survives until the new folder is complete; on any failure the staging folder
    is removed, and so are the parent folders this call created, so `final` and
    everything around it are left as they were.
    """
    created = _missing_parents(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    except OSError as exc:
        _remove_empty(created)
        raise UsageError(f"cannot create {final}: {exc.strerror or exc}") from None
    try:
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide the folder from other users
        yield staging
        _move_into_place(staging, final)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        _remove_empty(created)
        raise


def _missing_parents(final: Path) -> list[Path]:
    """The ancestors of `final` that do not exist yet, deepest first."""
    missing = []
    for parent in final.absolute().parents:
        if parent.exists() or parent.is_symlink():
            break
        missing.append(parent)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders deepest first, stopping at the first that is not empty (someone's files)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _move_into_place(staging: Path, final: Path) -> None:
    backup = None
    if final.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        backup.rmdir()
        os.replace(final, backup)
    try:
        os.replace(staging, final)
    except OSError:
        if backup is not None:
            os.replace(backup, final)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
