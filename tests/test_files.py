"""Staged folders: appear whole or not at all, and leave no folders they created behind."""

from __future__ import annotations

import pytest

from lstm_export.files import staged_folder


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
