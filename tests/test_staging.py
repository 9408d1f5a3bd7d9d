"""Staged folders: appear whole or not at all, one writer at a time, and leave nothing behind."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from helpers import run_python
from lstm_export import staging
from lstm_export.errors import UsageError
from lstm_export.staging import staged_folder


def test_a_completed_block_moves_the_folder_into_place(tmp_path):
    final = tmp_path / "a" / "b" / "m"
    with staged_folder(final) as staging:
        (staging / "file.txt").write_text("done")
    assert (final / "file.txt").read_text() == "done"
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["m"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(143)])
def test_a_failure_removes_staging_and_the_parents_it_created(tmp_path, error):
    final = tmp_path / "a" / "b" / "c" / "m"
    with pytest.raises(type(error)), staged_folder(final) as staging:
        (staging / "half.txt").write_text("half")
        raise error
    assert list(tmp_path.iterdir()) == []


def test_a_failure_keeps_parents_that_existed_or_that_others_filled(tmp_path):
    existing = tmp_path / "exports"
    existing.mkdir()
    final = existing / "new" / "deeper" / "m"
    with pytest.raises(RuntimeError), staged_folder(final):
        (existing / "new" / "someone-elses.txt").write_text("keep me")
        raise RuntimeError("boom")
    assert [p.name for p in existing.iterdir()] == ["new"]
    assert [p.name for p in (existing / "new").iterdir()] == ["someone-elses.txt"]


def _complete(folder: Path, version: str) -> None:
    """A stand-in for a whole export: two files that must arrive together."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(version)
    (folder / "b.txt").write_text(version)


def _version(folder: Path) -> str:
    """The version `folder` holds, asserting it is whole (both files, one version)."""
    texts = {p.name: p.read_text() for p in folder.iterdir()}
    assert sorted(texts) == ["a.txt", "b.txt"], texts
    assert texts["a.txt"] == texts["b.txt"], texts
    return texts["a.txt"]


def _accept(_folder: Path) -> None:
    """A `replaceable` check that allows any replacement."""


def test_an_existing_folder_is_refused_without_a_replaceable_check(tmp_path):
    final = tmp_path / "m"
    _complete(final, "old")
    with pytest.raises(UsageError, match="already exists"), staged_folder(final):
        pytest.fail("the block must not run")
    assert _version(final) == "old"


def test_a_folder_that_appears_while_building_is_not_replaced(tmp_path):
    final = tmp_path / "m"
    with pytest.raises(UsageError, match="already exists"), staged_folder(final) as staging:
        _complete(staging, "new")
        _complete(final, "someone else's")  # made by another program meanwhile
    assert _version(final) == "someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_replaceable_is_asked_again_at_the_swap(tmp_path):
    final = tmp_path / "m"
    _complete(final, "old")
    asked = []

    def replaceable(folder: Path) -> None:
        asked.append(folder)
        if len(asked) == 2:
            raise UsageError("now it holds something of the user's")

    with pytest.raises(UsageError, match="of the user's"), staged_folder(final, replaceable) as s:
        _complete(s, "new")
    assert asked == [final, final]
    assert _version(final) == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_second_writer_is_refused_while_the_first_writes(tmp_path):
    final = tmp_path / "m"
    refused = pytest.raises(UsageError, match="another lstm-export process is writing")
    with staged_folder(final) as first:
        with refused, staged_folder(final, _accept):
            pytest.fail("the second writer must not run")
        _complete(first, "first")
    assert _version(final) == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # the lock file is gone too


def test_an_os_error_while_building_is_one_line_and_changes_nothing(tmp_path):
    final = tmp_path / "m"
    _complete(final, "old")
    full = OSError(errno.ENOSPC, "No space left on device", str(final / "model.pt"))
    with pytest.raises(UsageError) as caught, staged_folder(final, _accept):
        raise full
    assert "No space left on device" in str(caught.value)
    assert "nothing was changed" in str(caught.value)
    assert _version(final) == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(143)], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", ["before-swap", "after-swap", "while-removing-old"])
def test_an_interrupted_swap_leaves_the_old_or_the_new_folder_whole(
    tmp_path, monkeypatch, exchange, error, when
):
    final = tmp_path / "m"
    _complete(final, "old")
    real_renameat2, real_rmtree, real_replace = staging._renameat2, shutil.rmtree, os.replace

    def renameat2(source: Path, target: Path, flags: int) -> bool:
        if when == "before-swap":
            raise error
        done = real_renameat2(source, target, flags) if exchange else False
        if exchange and when == "after-swap":
            raise error  # the signal lands right after the exchange returned
        return done

    def replace(source, target):  # the two-renames route: interrupted between them
        real_replace(source, target)
        if when == "after-swap" and Path(target).name.startswith(".m.old-"):
            raise error

    def rmtree(path, *args, **kwargs):
        if when == "while-removing-old" and not getattr(rmtree, "hit", False):
            rmtree.hit = True
            raise error
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(staging, "_renameat2", renameat2)
    monkeypatch.setattr(staging.os, "replace", replace)
    monkeypatch.setattr(staging.shutil, "rmtree", rmtree)
    with pytest.raises(type(error)), staged_folder(final, _accept) as building:
        _complete(building, "new")

    assert _version(final) in ("old", "new")
    if when == "before-swap":
        assert _version(final) == "old"
    monkeypatch.undo()
    with staged_folder(final, _accept) as building:  # the next writer cleans what was left
        _complete(building, "next")
    assert _version(final) == "next"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


_KILLED = """
import os, sys
from pathlib import Path
from lstm_export import staging

final, when = Path(sys.argv[1]), sys.argv[2]
real_renameat2, real_replace = staging._renameat2, os.replace

def renameat2(source, target, flags):
    if when == "two-renames":
        return False
    done = real_renameat2(source, target, flags)
    if when == "after-exchange":
        os._exit(137)  # as kill -9: no cleanup at all
    return done

def replace(source, target):
    real_replace(source, target)
    if Path(target).name.startswith(".m.old-"):
        os._exit(137)

staging._renameat2, staging.os.replace = renameat2, replace
with staging.staged_folder(final, lambda folder: None) as building:
    for name in ("a.txt", "b.txt"):
        (building / name).write_text("new")
    if when == "while-building":
        os._exit(137)
"""


@pytest.mark.parametrize("when", ["while-building", "after-exchange", "two-renames"])
def test_after_kill_9_the_folder_is_whole_and_the_next_writer_cleans_up(tmp_path, when):
    final = tmp_path / "m"
    _complete(final, "old")
    killed = run_python(_KILLED, final, when)
    assert killed.returncode == 137, killed.stderr
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "m")
    assert left, "the kill left nothing to clean: the test did not interrupt anything"
    if when == "two-renames":  # killed between the renames: only the hidden old copy exists
        assert not final.exists()
    else:
        assert _version(final) == ("old" if when == "while-building" else "new")

    with staged_folder(final, _accept) as building:
        _complete(building, "next")
    assert _version(final) == "next"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_the_next_writer_puts_back_an_old_folder_that_lost_its_place(tmp_path):
    final = tmp_path / "m"
    _complete(tmp_path / ".m.old-abcd1234", "old")  # what kill -9 between two renames leaves
    _complete(tmp_path / ".m.partial-efgh5678", "new, never moved")
    _complete(tmp_path / ".m.partial-x.partial-abcd1234", "m.partial-x's, not ours")
    refused = pytest.raises(UsageError, match="already exists")
    with refused, staged_folder(final):  # restored first, so a no-replace writer is refused
        pytest.fail("must not run")
    assert _version(final) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.partial-x.partial-abcd1234", "m"]
