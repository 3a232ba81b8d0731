"""Result folders that never lose what is not ours (issue 17): the user's files, links, leftovers."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest

from basalseg.errors import OutputExistsError, OutputWriteError
from basalseg.results import RESULT_FILES
from basalseg.staging import OWNER_FILE, StagedOutputDir, clean_leftovers


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _user_files(folder):
    """A user's own folder: an input image, notes, a subfolder; returns {relative path: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_t1.nii.gz").write_bytes(b"\x1f\x8b not really an image, but the user's")
    (folder / "notes.txt").write_text("scanned 2026-01-05, patient moved")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.txt").write_text("nested")
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _still_there(folder, files):
    for rel, data in files.items():
        assert (folder / rel).read_bytes() == data, f"{rel} changed or lost"


def _write_result(out, content="v1", overwrite=False, **kw):
    """A minimal result the way results.write_result records it: files + provenance with sha256."""
    with StagedOutputDir(out, overwrite=overwrite, owned=RESULT_FILES, **kw) as stage:
        (stage.path / "volumes.csv").write_text(f"structure,volume\nx,{content}\n")
        (stage.path / "segmentation.nii.gz").write_bytes(content.encode())
        files = {n: _sha(stage.path / n) for n in ("volumes.csv", "segmentation.nii.gz")}
        (stage.path / "provenance.json").write_text(json.dumps({"basalseg": "test", "files": files}))


def test_results_into_a_users_folder_keep_every_user_file(tmp_path):
    out = tmp_path / "mine"
    files = _user_files(out)
    _write_result(out, "v1")
    _still_there(out, files)
    assert (out / "volumes.csv").read_text().endswith("v1\n")
    _write_result(out, "v2", overwrite=True)
    _still_there(out, files)
    assert (out / "volumes.csv").read_text().endswith("v2\n")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["my_t1.nii.gz", "notes.txt", "sub", "volumes.csv", "segmentation.nii.gz", "provenance.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "no staging or .old leftovers"


def test_without_overwrite_a_folder_with_results_is_refused_and_untouched(tmp_path):
    out = tmp_path / "mine"
    _write_result(out, "v1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _write_result(out, "v2")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_overwrite_refuses_a_result_named_file_that_is_not_ours(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "volumes.csv").write_text("my own spreadsheet")
    with pytest.raises(OutputExistsError, match="volumes.csv.*BasalSegSAM's own"):
        _write_result(out, overwrite=True)
    assert (out / "volumes.csv").read_text() == "my own spreadsheet"
    assert [p.name for p in out.iterdir()] == ["volumes.csv"]


def test_overwrite_refuses_a_result_file_changed_since(tmp_path):
    out = tmp_path / "mine"
    _write_result(out, "v1")
    (out / "volumes.csv").write_text("edited by hand")
    with pytest.raises(OutputExistsError, match="changed since"):
        _write_result(out, "v2", overwrite=True)
    assert (out / "volumes.csv").read_text() == "edited by hand"
    # an explicit redo of a damaged result replaces files with result names (and nothing else)
    (out / "keep.txt").write_text("k")
    _write_result(out, "v3", overwrite=True, replace="named")
    assert (out / "volumes.csv").read_text().endswith("v3\n") and (out / "keep.txt").read_text() == "k"


def test_an_input_inside_the_folder_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    _write_result(out, "v1")
    with pytest.raises(OutputExistsError, match="input of this run"):
        _write_result(out, "v2", overwrite=True, protect=[out / "segmentation.nii.gz"])
    assert (out / "segmentation.nii.gz").read_bytes() == b"v1"


def test_a_stale_result_file_of_ours_is_removed_on_overwrite(tmp_path):
    out = tmp_path / "mine"
    _write_result(out, "v1")
    files = json.loads((out / "provenance.json").read_text())["files"]
    (out / "qc.png").write_bytes(b"png")
    files["qc.png"] = _sha(out / "qc.png")
    (out / "provenance.json").write_text(json.dumps({"basalseg": "test", "files": files}))
    _write_result(out, "v2", overwrite=True)  # this run writes no qc.png: the old one must not linger
    assert not (out / "qc.png").exists()


def test_symlinked_output_folder_results_land_where_it_points(tmp_path):
    target = tmp_path / "real"
    files = _user_files(target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    _write_result(link, "v1")
    _write_result(link, "v2", overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "volumes.csv").read_text().endswith("v2\n")
    _still_there(target, files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"], "no hidden .link.old-* entries"
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


def test_broken_link_and_empty_name_are_refused(tmp_path):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputWriteError, match="does not exist"):
        StagedOutputDir(link, owned=RESULT_FILES)
    with pytest.raises(OutputWriteError, match="empty name"):
        StagedOutputDir("", owned=RESULT_FILES)


def test_current_folder_as_output(tmp_path, monkeypatch):
    files = _user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    _write_result(".", "v1")
    _write_result(".", "v2", overwrite=True)
    assert (tmp_path / "volumes.csv").read_text().endswith("v2\n")
    _still_there(tmp_path, files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not [p for p in tmp_path.parent.iterdir() if ".staging-" in p.name]


def test_concurrent_overwrite_loses_to_the_first(tmp_path):
    out = tmp_path / "mine"
    _write_result(out, "v1")
    with pytest.raises(OutputExistsError, match="changed by something else"):
        with StagedOutputDir(out, overwrite=True, owned=RESULT_FILES) as stage:
            (stage.path / "volumes.csv").write_text("late")
            _write_result(out, "winner", overwrite=True)  # another run commits first
    assert (out / "volumes.csv").read_text().endswith("winner\n")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(folder, pid):
    folder.mkdir(parents=True)
    (folder / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    (folder / "volumes.csv").write_text("half")
    return folder


def test_leftovers_of_a_killed_run_are_removed_and_reported(tmp_path, caplog):
    out = tmp_path / "out"
    beside = _leftover(tmp_path / ".out.staging-abcd1234", _dead_pid())
    _write_result(out, "v1")
    inside = _leftover(out / ".basalseg.staging-dead0000", _dead_pid())
    alive = _leftover(out / ".basalseg.staging-live0000", os.getppid())
    with caplog.at_level("WARNING", logger="basalseg"):
        _write_result(out, "v2", overwrite=True)
    assert not beside.exists() and not inside.exists()
    assert alive.exists(), "a staging folder whose process still runs is left alone"
    text = caplog.text
    assert "interrupted run" in text and "alone" in text


def test_interrupted_commit_puts_the_old_results_back(tmp_path):
    """Power loss after the old results were set aside, before the new ones moved in."""
    out = tmp_path / "out"
    _write_result(out, "v1")
    old = out / ".basalseg.old-0000"
    old.mkdir()
    (old / OWNER_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    for name in ("volumes.csv", "segmentation.nii.gz", "provenance.json"):
        os.replace(out / name, old / name)
    messages = clean_leftovers(out, RESULT_FILES)
    assert any(m["action"] == "restored" and "put back" in m["message"] for m in messages)
    assert (out / "volumes.csv").read_text().endswith("v1\n") and not old.exists()
