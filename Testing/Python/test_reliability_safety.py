"""Reliability matrix, issue 17 rows: the user's own files, links, leftovers, non-T1 input, geometry.

Run through the command line in this process with the matrix's stand-ins (``BoxFill`` foundation,
``MaskStudent``), so each row takes a second or two; see docs/RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti, write_nrrd_lps
from test_reliability_matrix import StandIns, assert_failed_cleanly, box_prompts, cli, leftovers, seg_args, snapshot

from basalseg.results import RESULT_FILES
from basalseg.prompts import save_prompts
from basalseg.spatial import canonical_grid
from basalseg.staging import OWNER_FILE


@pytest.fixture
def stand_ins(monkeypatch):
    return StandIns(monkeypatch)


@pytest.fixture(scope="module")
def prompts_path(small_t1, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("safety_prompts") / "prompts.json"
    save_prompts(box_prompts(canonical_grid(small_t1.shape, small_t1.affine), [14, 20]), path)
    return path


def user_folder(folder: Path, small_t1) -> dict[str, str]:
    """The user's own folder: the input T1, notes and a subfolder. Returns {path: sha256}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_t1.nii.gz").write_bytes(Path(small_t1.path).read_bytes())
    (folder / "notes.txt").write_text("patient moved in run 2")
    (folder / "old_analysis").mkdir()
    (folder / "old_analysis" / "table.csv").write_text("a,b\n1,2\n")
    return digests(folder)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def assert_user_files_intact(folder: Path, before: dict[str, str]) -> None:
    now = digests(folder)
    for rel, digest in before.items():
        assert now.get(rel) == digest, f"{rel} was lost or changed"


def test_row_overwrite_into_the_users_folder_keeps_every_user_file(stand_ins, small_t1, prompts_path, weights_dir,
                                                                    tmp_path):
    folder = tmp_path / "DIR"
    before = user_folder(folder, small_t1)
    image = folder / "my_t1.nii.gz"
    for extra in ([], ["--overwrite"], ["--overwrite"]):
        status, _, err = cli([*seg_args(image, weights_dir, prompts_path), "--out", folder, *extra])
        assert status == 0, err
        assert_user_files_intact(folder, before)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        {"my_t1.nii.gz", "notes.txt", "old_analysis"} | set(RESULT_FILES) - {"qc.png"})
    assert leftovers(folder) == [] and not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_row_overwrite_never_replaces_the_input_prompts(stand_ins, small_t1, prompts_path, weights_dir, tmp_path):
    out = tmp_path / "out"
    status, _, err = cli([*seg_args(small_t1.path, weights_dir, prompts_path), "--out", out])
    assert status == 0, err
    before = snapshot(out)
    status, _, err = cli([*seg_args(small_t1.path, weights_dir, out / "prompts.json"), "--out", out, "--overwrite"])
    assert_failed_cleanly(status, err, out, "input of this run", before=before)


def test_row_overwrite_refuses_result_names_that_are_not_ours(stand_ins, small_t1, prompts_path, weights_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "volumes.csv").write_text("my own volumes, typed by hand")
    before = digests(out)
    status, _, err = cli([*seg_args(small_t1.path, weights_dir, prompts_path), "--out", out, "--overwrite"])
    assert status == 2 and "volumes.csv" in err and "BasalSegSAM's own" in err
    assert digests(out) == before and leftovers(out) == []


def test_row_symlinked_output_folder(stand_ins, small_t1, prompts_path, weights_dir, tmp_path):
    target = tmp_path / "real"
    before = user_folder(target, small_t1)
    link = tmp_path / "LINK"
    link.symlink_to(target, target_is_directory=True)
    for extra in ([], ["--overwrite"]):
        status, _, err = cli([*seg_args(small_t1.path, weights_dir, prompts_path), "--out", link, *extra])
        assert status == 0, err
    assert link.is_symlink() and (target / "segmentation.nii.gz").is_file()
    assert_user_files_intact(target, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LINK", "real"], "no .LINK.old-* or staging entries"


def test_row_current_folder_and_empty_out(stand_ins, small_t1, prompts_path, weights_dir, tmp_path, monkeypatch):
    folder = tmp_path / "cwd"
    before = user_folder(folder, small_t1)
    monkeypatch.chdir(folder)
    for extra in ([], ["--overwrite"]):
        status, _, err = cli([*seg_args(small_t1.path, weights_dir, prompts_path), "--out", ".", *extra])
        assert status == 0, err
    assert_user_files_intact(folder, before)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(SystemExit) as info:  # argparse: usage error, status 2
        cli([*seg_args(small_t1.path, weights_dir, prompts_path), "--out", ""])
    assert info.value.code == 2


def test_row_leftovers_of_a_killed_run_are_cleaned_and_reported(stand_ins, small_t1, prompts_path, weights_dir,
                                                                tmp_path, caplog):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    staging = tmp_path / ".out.staging-killed01"  # what a SIGKILLed first run into a new folder leaves
    staging.mkdir()
    (staging / OWNER_FILE).write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname()}))
    (staging / "segmentation.nii.gz").write_bytes(b"half")
    with caplog.at_level("WARNING", logger="basalseg"):
        status, _, err = cli([*seg_args(small_t1.path, weights_dir, prompts_path), "--out", out])
    assert status == 0, err
    assert not staging.exists() and "interrupted run" in caplog.text
    assert leftovers(out) == []


def test_row_label_image_as_t1_is_refused(stand_ins, small_t1, dk_sampler, weights_dir, tmp_path):
    labels = dk_sampler(small_t1.shape, small_t1.affine).astype(np.int16)
    image = write_nifti(tmp_path / "aseg.nii.gz", labels, small_t1.affine)
    for extra in ([], ["--no-qc"]):
        out = tmp_path / f"out{len(extra)}"
        status, _, err = cli([*seg_args(image, weights_dir), "--out", out, *extra])
        assert_failed_cleanly(status, err, out, "label image")


def test_row_thin_slab_is_refused(stand_ins, small_t1, weights_dir, tmp_path):
    image = write_nifti(tmp_path / "slab.nii.gz", small_t1.data[:, :, 8:10], small_t1.affine)
    out = tmp_path / "out"
    status, _, err = cli([*seg_args(image, weights_dir), "--out", out])
    assert_failed_cleanly(status, err, out, "thick")


def test_row_partial_coverage_is_flagged(stand_ins, small_t1, prompts_path, weights_dir, tmp_path):
    """The test crop ends where the structures continue: a QC flag in provenance and the summary."""
    out = tmp_path / "out"
    status, stdout, err = cli([*seg_args(small_t1.path, weights_dir, prompts_path), "--out", out])
    assert status == 0, err
    labels = np.asarray(nib.load(str(out / "segmentation.nii.gz")).dataobj)
    edge = any(np.take(labels, i, axis=a).any() for a in range(3) for i in (0, labels.shape[a] - 1))
    flags = [f for f in json.loads((out / "provenance.json").read_text())["qc_flags"] if f["kind"] == "partial_coverage"]
    assert bool(flags) == edge
    if edge:
        assert "QC partial_coverage" in stdout


def test_row_sheared_nrrd_gets_a_labelmap_without_a_squared_up_qform(stand_ins, small_t1, prompts_path, weights_dir,
                                                                     tmp_path, caplog):
    shear = np.eye(4)
    shear[0, 1] = 0.25  # x depends on j: the voxel axes are not perpendicular
    affine = shear @ small_t1.affine
    path = tmp_path / "sheared.nrrd"
    write_nrrd_lps(path, small_t1.data, affine)
    sheared_prompts = tmp_path / "sheared_prompts.json"
    save_prompts(box_prompts(canonical_grid(small_t1.shape, affine), [14, 20]), sheared_prompts)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="basalseg"):
        status, _, err = cli([*seg_args(path, weights_dir, sheared_prompts), "--out", out])
    assert status == 0, err
    img = nib.load(str(out / "segmentation.nii.gz"))
    assert int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 1
    assert np.allclose(img.get_sform(), affine, atol=1e-4)
    assert "sheared" in caplog.text
    record = json.loads((out / "provenance.json").read_text())
    assert any("sheared" in n for n in record["input"]["notes"])


def test_row_singular_sform_falls_back_to_the_qform(small_t1, tmp_path, caplog):
    from basalseg.imageio import load_volume

    img = nib.Nifti1Image(small_t1.data, small_t1.affine)
    img.set_qform(small_t1.affine, code=1)
    singular = small_t1.affine.copy()
    singular[:3, 2] = 0.0
    img.set_sform(singular, code=1)
    path = tmp_path / "singular_sform.nii.gz"
    nib.save(img, str(path))
    with caplog.at_level("WARNING", logger="basalseg"):
        volume = load_volume(path)
    assert np.allclose(volume.affine, small_t1.affine, atol=1e-4)
    assert "qform is used instead" in caplog.text and volume.meta["notes"]


def test_row_qform_sform_disagreement_is_warned(small_t1, tmp_path, caplog):
    from basalseg.imageio import load_volume

    img = nib.Nifti1Image(small_t1.data, small_t1.affine)
    moved = small_t1.affine.copy()
    moved[:3, 3] += [0.0, 5.0, 0.0]
    img.set_qform(moved, code=1)
    img.set_sform(small_t1.affine, code=1)
    path = tmp_path / "disagree.nii.gz"
    nib.save(img, str(path))
    with caplog.at_level("WARNING", logger="basalseg"):
        volume = load_volume(path)
    assert np.allclose(volume.affine, small_t1.affine)
    assert "disagree" in caplog.text and "5.0 mm" in caplog.text


@pytest.mark.parametrize("field, value, words", [
    ("box", "1234", "must be a list"),
    ("box", [True, 0, 5, 5], "must be numbers"),
    ("structure", 12, "structure must be"),
    ("points", [["1", "2"]], "must be numbers"),
    ("point_labels", [True], "must be an integer"),
    ("slice", True, "must be an integer"),
])
def test_row_prompts_with_wrong_types(field, value, words, prompts_path, tmp_path):
    from basalseg.errors import PromptsError
    from basalseg.prompts import load_prompts

    data = json.loads(prompts_path.read_text())
    data["prompts"][0][field] = value
    if field == "point_labels":
        data["prompts"][0]["points"] = [[10.0, 10.0]]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PromptsError, match=words) as info:
        load_prompts(path)
    assert "prompt 0" in str(info.value)


def test_row_empty_user_prompts_are_not_blamed_on_the_prompt_generator(stand_ins, small_t1, prompts_path,
                                                                        weights_dir, tmp_path):
    data = json.loads(prompts_path.read_text())
    data["prompts"] = []
    path = tmp_path / "empty_prompts.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    status, _, err = cli([*seg_args(small_t1.path, weights_dir, path), "--out", out])
    line = assert_failed_cleanly(status, err, out, "given prompts")
    assert "prompt generator found" not in line


def test_row_batch_removes_its_lock_and_names_skipped_subjects(stand_ins, small_t1, prompts_path, weights_dir,
                                                               tmp_path, caplog):
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(Path(small_t1.path).read_bytes())
    (bids / "sub-02" / "anat").mkdir(parents=True)
    (bids / "sub-02" / "anat" / "sub-02_T2w.nii.gz").write_bytes(b"not a T1")
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="basalseg"):
        status, _, err = cli(["batch", bids, "--out", out, "--weights", weights_dir, "--prompts", prompts_path,
                              "--device", "cpu", "--progress", "none", "--no-qc"])
    assert status == 0, err
    assert "sub-02" in caplog.text and "no T1w image" in caplog.text
    assert not (out / ".basalseg-batch.lock").exists()


def test_row_compare_of_different_scans_warns(stand_ins, small_t1, prompts_path, weights_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    status, _, err = cli([*seg_args(small_t1.path, weights_dir, prompts_path), "--out", a])
    assert status == 0, err
    bigger = np.pad(small_t1.data, ((0, 0), (0, 0), (0, 8)), mode="edge")  # another field of view
    image = write_nifti(tmp_path / "other.nii.gz", bigger, small_t1.affine)
    grid = canonical_grid(bigger.shape, small_t1.affine)
    other_prompts = tmp_path / "other_prompts.json"
    save_prompts(box_prompts(grid, [14]), other_prompts)
    status, _, err = cli([*seg_args(image, weights_dir, other_prompts), "--out", b])
    assert status == 0, err
    status, stdout, err = cli(["compare", a, b])
    assert status == 0, err
    assert "different fields of view" in err
    assert "far more than atrophy" in err  # half the box slices: a change no follow-up explains


def test_row_batch_never_replaces_a_users_cohort_table(stand_ins, small_t1, prompts_path, weights_dir, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.nii.gz").write_bytes(Path(small_t1.path).read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (out / "volumes.csv").write_text("the user's own table")
    status, _, err = cli(["batch", inp, "--out", out, "--weights", weights_dir, "--prompts", prompts_path,
                          "--device", "cpu", "--progress", "none", "--no-qc"])
    assert status == 2 and "not a basalseg batch folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["volumes.csv"]
    assert (out / "volumes.csv").read_text() == "the user's own table"
