"""Result files and the all-or-nothing output folder."""

from __future__ import annotations

import csv
import io
import os

import nibabel as nib
import numpy as np
import pytest

from basalseg.errors import OutputExistsError, OutputWriteError
from basalseg.outputs import (
    VOLUME_COLUMNS,
    StagedOutputDir,
    atomic_write_bytes,
    atomic_write_text,
    json_text,
    nifti_bytes,
    seg_nrrd_bytes,
    volume_rows,
    volumes_csv_text,
)
from basalseg.structures import STRUCTURES

# ---------------------------------------------------------------------------------------------
# StagedOutputDir
# ---------------------------------------------------------------------------------------------


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_commit_creates_the_folder_with_its_files(tmp_path):
    out = tmp_path / "result"
    with StagedOutputDir(out) as stage:
        assert stage.path.parent == tmp_path and stage.path != out
        assert not out.exists(), "nothing visible before the end"
        (stage.path / "a.txt").write_text("A")
        (stage.path / "sub").mkdir()
        (stage.path / "sub" / "b.txt").write_text("B")
    assert out.is_dir() and (out / "a.txt").read_text() == "A" and (out / "sub" / "b.txt").read_text() == "B"
    assert _listing(tmp_path) == ["result"], "no staging folder left"


def test_exception_leaves_no_folder(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError, match="boom"):
        with StagedOutputDir(out) as stage:
            (stage.path / "partial.nii.gz").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not out.exists()
    assert _listing(tmp_path) == []


def test_a_failed_or_probing_run_removes_the_parent_folders_it_made(tmp_path):
    """``--out new/deeper/result`` of a run that fails (or of the writability probe before the
    work) leaves neither the result nor ``new/deeper``; a parent that someone filled stays."""
    out = tmp_path / "new" / "deeper" / "result"
    with pytest.raises(RuntimeError, match="boom"):
        with StagedOutputDir(out) as stage:
            (stage.path / "partial.nii.gz").write_bytes(b"half")
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []
    StagedOutputDir(out).check_writable()
    assert _listing(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"):
        with StagedOutputDir(out) as stage:
            (tmp_path / "new" / "theirs.txt").write_text("made meanwhile")
            raise RuntimeError("boom")
    assert _listing(tmp_path) == ["new"] and _listing(tmp_path / "new") == ["theirs.txt"]
    with StagedOutputDir(tmp_path / "a" / "b" / "result") as stage:  # a run that succeeds keeps them
        (stage.path / "x.txt").write_text("x")
    assert (tmp_path / "a" / "b" / "result" / "x.txt").read_text() == "x"


def test_a_foreign_file_with_a_result_name_is_named_not_met_with_pass_overwrite(tmp_path):
    """The user's own volumes.csv in --out: --overwrite would not replace it, so the refusal
    without --overwrite says that (it used to suggest --overwrite, which was then refused)."""
    out = tmp_path / "result"
    out.mkdir()
    (out / "volumes.csv").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError) as info:
            StagedOutputDir(out, overwrite=overwrite, owned={"volumes.csv", "provenance.json"})
        assert "volumes.csv is in the way" in str(info.value) and "pass --overwrite" not in str(info.value)
    assert (out / "volumes.csv").read_text() == "mine"


def test_an_output_below_a_file_names_the_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputWriteError, match="afile is a file, not a folder"):
        StagedOutputDir(tmp_path / "afile" / "sub").check_writable()
    assert (tmp_path / "afile").read_text() == "x"


def test_exception_keeps_old_results_when_overwriting(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with StagedOutputDir(out, overwrite=True) as stage:
            (stage.path / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert _listing(out) == ["old.txt"] and (out / "old.txt").read_text() == "old"
    assert _listing(tmp_path) == ["result"]


def test_refuses_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError) as info:
        StagedOutputDir(out)
    assert "--overwrite" in str(info.value) and str(out) in str(info.value)
    assert (out / "keep.txt").read_text() == "precious"
    assert _listing(tmp_path) == ["result"]


def test_refuses_a_file_in_the_way(tmp_path):
    out = tmp_path / "result"
    out.write_text("a file")
    with pytest.raises(OutputExistsError, match="is a file"):
        StagedOutputDir(out, overwrite=True)
    assert out.read_text() == "a file"


def test_empty_existing_folder_is_used(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    with StagedOutputDir(out) as stage:
        (stage.path / "x.txt").write_text("x")
    assert _listing(out) == ["x.txt"]


def test_overwrite_replaces_and_old_files_are_gone(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "shared.txt").write_text("old version")
    with StagedOutputDir(out, overwrite=True) as stage:
        (stage.path / "shared.txt").write_text("new version")
        (stage.path / "new.txt").write_text("new")
        assert (out / "old.txt").exists(), "old results stay until the new ones are complete"
    assert _listing(out) == ["new.txt", "shared.txt"]
    assert (out / "shared.txt").read_text() == "new version"
    assert _listing(tmp_path) == ["result"], "no .old or staging folders left"


def test_folder_filled_while_working_is_not_clobbered(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(OutputExistsError, match="filled by something else"):
        with StagedOutputDir(out) as stage:
            (stage.path / "mine.txt").write_text("mine")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert _listing(out) == ["theirs.txt"]
    assert _listing(tmp_path) == ["result"]


def test_staged_folder_permissions_follow_umask(tmp_path):
    out = tmp_path / "result"
    old = os.umask(0o022)
    try:
        with StagedOutputDir(out) as stage:
            (stage.path / "a").write_text("a")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755


def test_unwritable_parent_gives_output_write_error(tmp_path):
    """Parent that cannot hold the folder: a read-only folder, or (as root, where chmod does not
    stop writes) a path beneath a regular file."""
    if os.geteuid() == 0:
        blocker = tmp_path / "not_a_folder"
        blocker.write_text("x")
        out = blocker / "result"
    else:
        parent = tmp_path / "readonly"
        parent.mkdir()
        parent.chmod(0o555)
        out = parent / "result"
    try:
        with pytest.raises(OutputWriteError) as info:
            with StagedOutputDir(out) as stage:
                (stage.path / "a.txt").write_text("a")
        assert "cannot write" in str(info.value)
        assert not out.exists()
    finally:
        if os.geteuid() != 0:
            (tmp_path / "readonly").chmod(0o755)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert _listing(tmp_path) == ["f.bin"]


def test_atomic_write_under_a_regular_file_is_output_write_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputWriteError, match="cannot write"):
        atomic_write_bytes(blocker / "sub" / "f.bin", b"data")


def test_atomic_write_onto_a_folder_is_output_write_error(tmp_path):
    """A folder where the file should go: the rename fails, the temporary file is removed."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inside").write_text("keep")
    with pytest.raises(OutputWriteError, match="cannot write"):
        atomic_write_bytes(tmp_path / "dir", b"data")
    assert _listing(tmp_path) == ["dir"] and _listing(tmp_path / "dir") == ["inside"]


# ---------------------------------------------------------------------------------------------
# volumes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelmap():
    rng = np.random.default_rng(5)
    values = np.array([0, 0, 0, 10, 11, 12, 13, 49, 50, 51, 2, 41, 99])  # 52 absent; 2, 41, 99 not ours
    return rng.choice(values, size=(30, 25, 20)).astype(np.int16)


def test_volume_rows_are_voxel_counts_times_voxel_volume(labelmap):
    voxel = 0.9 * 1.1 * 3.0
    rows = volume_rows(labelmap, voxel)
    assert [r["structure"] for r in rows] == [s.name for s in STRUCTURES]
    assert [r["label"] for r in rows] == [s.label for s in STRUCTURES]
    for row in rows:
        n = int((labelmap == row["label"]).sum())
        assert row["voxels"] == n
        assert row["volume_mm3"] == pytest.approx(n * voxel, abs=1e-3)
        assert row["volume_ml"] == pytest.approx(n * voxel / 1000, abs=1e-6)
    assert rows[-1]["voxels"] == 0  # Right-Pallidum absent
    total = sum(r["voxels"] for r in rows)
    assert total == int(np.isin(labelmap, [s.label for s in STRUCTURES]).sum())


def test_volumes_csv_text_parses_back(labelmap):
    rows = volume_rows(labelmap, 2.0)
    text = volumes_csv_text(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert list(parsed[0]) == VOLUME_COLUMNS
    for got, row in zip(parsed, rows):
        assert got["structure"] == row["structure"] and int(got["label"]) == row["label"]
        assert int(got["voxels"]) == row["voxels"]
        assert float(got["volume_mm3"]) == pytest.approx(row["voxels"] * 2.0)
    extra = volumes_csv_text([dict(r, subject="s01") for r in rows], extra_columns=["subject"])
    assert extra.splitlines()[0] == "subject," + ",".join(VOLUME_COLUMNS)


# ---------------------------------------------------------------------------------------------
# NIfTI and seg.nrrd
# ---------------------------------------------------------------------------------------------


def _oblique_affine():
    c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
    affine = np.array([[-0.9 * c, 0, 3.0 * s, 92.5], [0, 1.1, 0, -120.25], [0.9 * s, 0, 3.0 * c, -60.0], [0, 0, 0, 1]])
    return affine


def test_nifti_has_the_input_affine_and_labels(labelmap, tmp_path):
    affine = _oblique_affine()
    path = tmp_path / "seg.nii.gz"
    path.write_bytes(nifti_bytes(labelmap, affine))
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(img.dataobj), labelmap)
    assert np.allclose(img.affine, affine, atol=1e-5)
    assert np.allclose(img.get_qform(), affine, atol=1e-4) and int(img.header["qform_code"]) == 1
    assert np.allclose(img.get_sform(), affine, atol=1e-5) and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    # and the package's own reader agrees
    from basalseg.imageio import load_volume

    vol = load_volume(path)
    assert np.allclose(vol.affine, affine, atol=1e-5)
    assert vol.voxel_volume_mm3 == pytest.approx(0.9 * 1.1 * 3.0)


def test_seg_nrrd_reads_back_with_slicerio(labelmap, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    affine = _oblique_affine()
    labels = np.where(np.isin(labelmap, [s.label for s in STRUCTURES]), labelmap, 0).astype(np.int16)
    path = tmp_path / "seg.seg.nrrd"
    path.write_bytes(seg_nrrd_bytes(labels, affine))
    seg = slicerio.read_segmentation(str(path))
    segments = seg["segments"]
    assert len(segments) == 8
    assert [s["name"] for s in segments] == [s.name for s in STRUCTURES]
    assert [int(s["labelValue"]) for s in segments] == [s.label for s in STRUCTURES]
    for got, s in zip(segments, STRUCTURES):
        assert np.allclose(got["color"], s.color_float, atol=1e-3)
    voxels = np.asarray(seg["voxels"])
    assert voxels.shape == labels.shape
    assert np.array_equal(voxels, labels)
    # geometry: voxel -> LPS is the RAS affine with x and y negated
    assert np.allclose(seg["ijkToLPS"], np.diag([-1, -1, 1, 1]) @ affine, atol=1e-5)
    # extents of present segments bound their voxels
    for got, s in zip(segments, STRUCTURES):
        idx = np.nonzero(labels == s.label)
        if len(idx[0]):
            ext = [int(v) for v in got["extent"]]
            assert ext == [int(v) for pair in zip([i.min() for i in idx], [i.max() for i in idx]) for v in pair]


def test_seg_nrrd_of_an_empty_labelmap(tmp_path):
    slicerio = pytest.importorskip("slicerio")
    labels = np.zeros((6, 7, 8), np.int16)
    path = tmp_path / "empty.seg.nrrd"
    path.write_bytes(seg_nrrd_bytes(labels, np.eye(4)))
    seg = slicerio.read_segmentation(str(path))
    assert len(seg["segments"]) == 8 and not np.asarray(seg["voxels"]).any()


def test_json_text_handles_numpy_and_paths(tmp_path):
    import json

    text = json_text({"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(3), "d": tmp_path})
    assert json.loads(text) == {"a": 3, "b": 0.5, "c": [0, 1, 2], "d": str(tmp_path)}
    with pytest.raises(TypeError):
        json_text({"x": object()})
