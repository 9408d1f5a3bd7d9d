"""Files: bounded reads of text and JSON, and the rules for where an export may be written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import not_regular_files
from lstm_export.errors import UsageError
from lstm_export.files import (
    MAX_JSON_DEPTH,
    check_destination,
    check_export_folder,
    parse_json,
    read_manifest,
    read_text,
    replaceable_export,
)


def _an_export(folder):
    """The files an export writes, by name and kind (contents do not matter here)."""
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"artifacts": {}}))
    (folder / "model.pt").write_bytes(b"pt")
    (folder / "model.onnx").write_bytes(b"onnx")
    return folder


def test_read_text_refuses_devices_fifos_folders_and_big_files(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 2000)
    cases = {
        **dict(not_regular_files(tmp_path)),
        tmp_path / "big": "2,000 bytes; expected at most 1,000",
        tmp_path / "missing": "does not exist",
    }
    for path, reason in cases.items():
        with pytest.raises(UsageError, match=reason):
            read_text(path, "config", limit=1000)


def test_parse_json_bounds_nesting_but_not_brackets_in_strings():
    with pytest.raises(UsageError, match=f"expected at most {MAX_JSON_DEPTH}"):
        parse_json("[" * 100_000, "manifest")
    text = json.dumps({"note": "[" * 1000, "nested": [[[1]]]})
    assert parse_json(text, "manifest") == {"note": "[" * 1000, "nested": [[[1]]]}
    assert parse_json(text.encode(), "extra file")["nested"] == [[[1]]]
    with pytest.raises(UsageError, match="not UTF-8"):
        parse_json(b"\xff{}", "extra file")


def test_read_manifest_is_none_only_when_there_is_none(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="expected a JSON object, got list"):
        read_manifest(tmp_path)


def test_an_artifact_that_is_a_fifo_is_said_to_be_one(tmp_path):
    folder = _an_export(tmp_path / "m")
    (folder / "model.onnx").unlink()
    os.mkfifo(folder / "model.onnx")
    with pytest.raises(UsageError, match=r"model\.onnx must be a regular file, but it is a named"):
        check_export_folder(folder)


def test_force_replaces_only_an_exports_own_regular_files(tmp_path):
    replaceable_export(_an_export(tmp_path / "ok"))  # accepted: nothing else in it
    (tmp_path / "empty").mkdir()
    replaceable_export(tmp_path / "empty")

    thesis = _an_export(tmp_path / "thesis")
    (thesis / "model.pt").unlink()
    (thesis / "model.pt").mkdir()  # a folder named like an artifact holds the user's files
    (thesis / "model.pt" / "thesis.txt").write_text("precious")
    with pytest.raises(UsageError, match=r"'model\.pt'"):
        replaceable_export(thesis)

    linked = _an_export(tmp_path / "linked")
    (linked / "model.onnx").unlink()
    (linked / "model.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(UsageError, match=r"'model\.onnx'"):
        replaceable_export(linked)


def test_destination_through_a_missing_folder_and_dot_dot_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    with pytest.raises(UsageError, match="goes through nx, which is not an existing folder"):
        check_destination(Path("nx") / ".." / "base", force=False)  # relative, as typed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert check_destination(tmp_path / "base" / ".." / "new", force=False)  # base exists


def test_a_symlinked_destination_is_named_as_a_link(tmp_path):
    _an_export(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UsageError, match="is a symbolic link; give the folder it points to"):
        check_destination(tmp_path / "link", force=True)
