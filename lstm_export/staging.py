"""Staged folders: built beside their destination, swapped in whole or not at all.

No torch here: export, `--keep-failed` and the Triton writer all write through this.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lstm_export.errors import UsageError

Check = Callable[[Path], None]
"""Raises UsageError unless an existing folder may be replaced (callers' rules)."""


@contextlib.contextmanager
def staged_folder(final: Path, replaceable: Check | None = None) -> Iterator[Path]:
    """Build into a hidden folder beside `final`; move it into place only if the block succeeds.

    - One writer at a time: a lock beside `final` is taken first; a second writer is
      refused at once, never silently replaced.
    - `final` may exist only if `replaceable` is given and accepts it, checked at the
      start and again at the swap (UsageError otherwise, nothing replaced).
    - The swap is one atomic exchange of the two folders (Linux renameat2), so at every
      point `final` holds either the old folder or the new one, complete; the old one is
      then removed. Where the exchange is missing, two renames with a window between.
    - On any failure (an exception, SIGINT/SIGTERM turned into one, a full disk) the
      staging folder is removed, and so are the parent folders this call created. After
      kill -9 the next writer to `final` cleans up what was left (see `_clean_leftovers`).
    """
    created = _missing_parents(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise UsageError(f"cannot create {final}: {exc.strerror or exc}") from None
    try:
        with _writer_lock(final):
            _clean_leftovers(final)
            _check_replaceable(final, replaceable)
            try:
                staging = Path(
                    tempfile.mkdtemp(prefix=f".{final.name}{_PARTIAL}", dir=final.parent)
                )
            except OSError as exc:
                raise UsageError(f"cannot create {final}: {exc.strerror or exc}") from None
            try:
                staging.chmod(0o755)  # mkdtemp's 0o700 would hide the folder from other users
                try:
                    yield staging
                except OSError as exc:  # a full disk, a read-only folder: one line, not a trace
                    where = f" ({_shown(exc.filename, staging)})" if exc.filename else ""
                    raise UsageError(
                        f"writing {final} failed: {exc.strerror or exc}{where}; nothing was changed"
                    ) from None
                _check_replaceable(final, replaceable)
                _swap_into_place(staging, final)
            finally:
                # After the swap `staging` holds the old folder; before it, the half-built one.
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        _remove_empty(created)
        raise


_PARTIAL = ".partial-"  # .NAME.partial-XXXX: a folder being built, or the old one being deleted
_OLD = ".old-"  # .NAME.old-XXXX: the old folder between two plain renames (no exchange here)


def _shown(filename: str | bytes, staging: Path) -> str:
    """A file inside the staging folder by its name there (model.pt), others in full."""
    path = Path(os.fsdecode(filename))
    return str(path.relative_to(staging)) if staging in path.parents else str(path)


def _check_replaceable(final: Path, replaceable: Check | None) -> None:
    if not (final.exists() or final.is_symlink()):
        return
    if replaceable is None:
        raise UsageError(f"{final} already exists; nothing was replaced")
    replaceable(final)


@contextlib.contextmanager
def _writer_lock(final: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `final` (flock, never blocking); removed when done.

    The lock file is unlinked while held, so a writer that opened it before must check
    that the file it locked is still the one at the path, and retry if not.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = final.parent / f".{final.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot create {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"another lstm-export process is writing {final} right now (it holds {path}); "
                "try again when it has finished"
            ) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the last holder removed it after we opened it: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _clean_leftovers(final: Path) -> None:
    """Remove what interrupted writers to `final` left beside it; we hold the lock, so
    nothing there is in use. An old folder between two renames is put back first when
    `final` is missing: it was complete, and the new one never arrived."""
    # mkdtemp's 8 random characters: `.m.partial-x.partial-abcd1234` is not a leftover of `m`
    ours = re.compile(rf"\.{re.escape(final.name)}({re.escape(_PARTIAL)}|{re.escape(_OLD)})\w{{8}}")
    leftovers = sorted(
        p for p in final.parent.iterdir() if ours.fullmatch(p.name) and not p.is_symlink()
    )
    for old in (p for p in leftovers if p.name.startswith(f".{final.name}{_OLD}")):
        if not (final.exists() or final.is_symlink()):
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for partial in (p for p in leftovers if p.name.startswith(f".{final.name}{_PARTIAL}")):
        shutil.rmtree(partial, ignore_errors=True)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux's renameat2; False where it is missing or the filesystem refuses the flag."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), flags) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(target))


def _swap_into_place(staging: Path, final: Path) -> None:
    """Put `staging` at `final`; an existing `final` ends up at `staging` (to be removed)."""
    if not (final.exists() or final.is_symlink()):
        if not _renameat2(staging, final, _RENAME_NOREPLACE):
            os.rename(staging, final)
        return
    if _renameat2(staging, final, _RENAME_EXCHANGE):
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}{_OLD}", dir=final.parent))
    old.rmdir()
    try:
        os.replace(final, old)
        os.replace(staging, final)
    except BaseException:  # interrupted between the two: put the old folder back
        if old.exists() and not (final.exists() or final.is_symlink()):
            os.replace(old, final)
        raise
    os.replace(old, staging)


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
