"""The ``basalseg`` command: whole runs on a small real T1 with random networks, and every
refused input giving exit status 2, one ``basalseg: error:`` line and no output folder.

Random prompter/student weights (``weights_dir``) give meaningless labels: the tests check the
files, their geometry and their agreement with each other, not the anatomy. Prompts come from
the DK atlas on two axial slices, which keeps the LiteMedSAM cost to two encoder passes a run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import FLIP_XY, box_masks, reindex, run_cli, write_nifti

from basalseg.prompts import load_prompts
from basalseg.results import RESULT_FILES
from basalseg.structures import STRUCTURES

ENV = dict(os.environ, PYTHONWARNINGS="ignore")


def _run_subprocess(args, cwd):
    return subprocess.run([sys.executable, "-m", "basalseg", *[str(a) for a in args]], capture_output=True,
                          text=True, cwd=cwd, env=ENV, timeout=300)


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_volumes_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------
# whole runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nifti_run(small_t1, small_prompts_path, weights_dir, tmp_path_factory):
    """``python -m basalseg segment`` on the small NIfTI, in a subprocess."""
    work = tmp_path_factory.mktemp("cli_nifti")
    out = work / "out"
    proc = _run_subprocess(["segment", small_t1.path, "--out", out, "--weights", weights_dir,
                            "--prompts", small_prompts_path, "--device", "cpu", "--progress", "none"], cwd=work)
    return proc, out


def test_segment_nifti_exit_status_and_files(nifti_run):
    proc, out = nifti_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(RESULT_FILES)
    assert (out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == [], "no staging folder left"


def test_segment_nifti_labelmap_on_the_input_grid(nifti_run, small_t1):
    proc, out = nifti_run
    img = nib.load(str(out / "segmentation.nii.gz"))
    src = nib.load(str(small_t1.path))
    assert img.shape == src.shape == small_t1.shape
    assert np.allclose(img.affine, src.affine, atol=1e-5)
    labels = np.asarray(img.dataobj)
    assert img.get_data_dtype() == np.int16
    assert set(np.unique(labels).tolist()) <= {0} | {s.label for s in STRUCTURES}


def test_segment_nifti_volumes_match_the_labelmap(nifti_run, small_t1):
    proc, out = nifti_run
    labels = np.asarray(nib.load(str(out / "segmentation.nii.gz")).dataobj)
    voxel = abs(np.linalg.det(small_t1.affine[:3, :3]))
    assert voxel == pytest.approx(8.0)
    rows = _read_volumes_csv(out / "volumes.csv")
    assert [r["structure"] for r in rows] == [s.name for s in STRUCTURES]
    for row in rows:
        n = int((labels == int(row["label"])).sum())
        assert int(row["voxels"]) == n
        assert float(row["volume_mm3"]) == pytest.approx(n * voxel, abs=1e-3)
    # the printed summary carries the same volumes
    for row in rows:
        assert f"{row['structure']:<16} {float(row['volume_ml']):8.3f} mL" in proc.stdout


def test_segment_nifti_seg_nrrd_opens_and_matches(nifti_run, small_t1):
    slicerio = pytest.importorskip("slicerio")
    proc, out = nifti_run
    labels = np.asarray(nib.load(str(out / "segmentation.nii.gz")).dataobj)
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == [s.name for s in STRUCTURES]
    assert [int(s["labelValue"]) for s in seg["segments"]] == [s.label for s in STRUCTURES]
    assert np.array_equal(np.asarray(seg["voxels"]), labels)
    assert np.allclose(seg["ijkToLPS"], FLIP_XY @ small_t1.affine, atol=1e-5)


def test_segment_nifti_prompts_and_provenance(nifti_run, small_t1, small_prompts_path):
    proc, out = nifti_run
    used = load_prompts(out / "prompts.json")
    given = load_prompts(small_prompts_path)
    assert used.to_dict()["prompts"] == given.to_dict()["prompts"]
    assert used.to_dict()["grid"] == given.to_dict()["grid"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["input"]["sha256"] == _sha256(small_t1.path)
    assert prov["input"]["shape"] == list(small_t1.shape)
    assert prov["foundation"]["backend"] == "litemedsam"
    assert prov["weights"]["student"]["trained"] is False
    for name, digest in prov["files"].items():
        assert digest == _sha256(out / name), name
    assert set(prov["files"]) == set(RESULT_FILES) - {"provenance.json"}


@pytest.fixture(scope="module")
def nrrd_run(small_t1_lps_nrrd, small_prompts_path, weights_dir, tmp_path_factory):
    """``basalseg segment`` in-process on the LPS NRRD copy, JSON progress, replacing an old folder."""
    work = tmp_path_factory.mktemp("cli_nrrd")
    out = work / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = run_cli(["segment", small_t1_lps_nrrd.path, "--out", out, "--overwrite", "--weights", weights_dir,
                      "--prompts", small_prompts_path, "--device", "cpu", "--progress", "json", "--no-qc"])
    return rc, out, stdout.getvalue(), stderr.getvalue()


def test_segment_lps_nrrd_output_on_the_nrrd_grid(nrrd_run, small_t1_lps_nrrd):
    rc, out, stdout, stderr = nrrd_run
    assert rc == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted((set(RESULT_FILES) - {"qc.png"}) | {"stale.txt"})
    assert (out / "stale.txt").read_text() == "from an older run", "a file that is not ours is never touched"
    img = nib.load(str(out / "segmentation.nii.gz"))
    assert img.shape == small_t1_lps_nrrd.shape
    assert np.allclose(img.affine, small_t1_lps_nrrd.affine, atol=1e-5)
    slicerio = pytest.importorskip("slicerio")
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    import nrrd

    header = nrrd.read_header(str(small_t1_lps_nrrd.path))
    assert np.allclose(seg["ijkToLPS"][:3, :3], np.asarray(header["space directions"]).T, atol=1e-5)
    assert np.allclose(seg["ijkToLPS"][:3, 3], header["space origin"], atol=1e-5)
    assert np.array_equal(np.asarray(seg["voxels"]), np.asarray(img.dataobj))


def test_segment_lps_nrrd_equals_the_nifti_run_reindexed(nrrd_run, nifti_run):
    """The NRRD holds the same image in another voxel order: same canonical grid, same prompts,
    so the (deterministic) pipeline must give the same labels, voxel for voxel, in that order."""
    rc, out, _, stderr = nrrd_run
    proc, nifti_out = nifti_run
    assert rc == 0 and proc.returncode == 0
    from_nrrd = np.asarray(nib.load(str(out / "segmentation.nii.gz")).dataobj)
    from_nifti = np.asarray(nib.load(str(nifti_out / "segmentation.nii.gz")).dataobj)
    assert np.array_equal(from_nrrd, reindex(from_nifti, (0, 1, 2), (False, True, False)))
    assert (out / "volumes.csv").read_text() == (nifti_out / "volumes.csv").read_text()


def test_segment_json_progress(nrrd_run):
    rc, out, stdout, stderr = nrrd_run
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert {k: v for k, v in events[-1].items() if k != "qc_flags"} == {"event": "done", "out": str(out)}
    assert events[-1]["qc_flags"] == json.loads((out / "provenance.json").read_text())["qc_flags"]
    progress = [e for e in events if e["event"] == "progress"]
    stages = [e["stage"] for e in progress]
    for stage in ("prepare", "foundation", "sdm", "student", "resample"):
        assert stage in stages
    overall = [e["overall"] for e in progress]
    assert overall == sorted(overall) and overall[-1] == pytest.approx(1.0)


def test_prompts_command_with_random_prompter(small_t1, weights_dir, tmp_path, capsys):
    from basalseg.spatial import canonical_grid

    out = tmp_path / "p"
    rc = run_cli(["prompts", small_t1.path, "--out", out, "--weights", weights_dir, "--device", "cpu",
                  "--progress", "none"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["prompts.json", "provenance.json", "qc.png"]
    prompts = load_prompts(out / "prompts.json")
    grid = canonical_grid(small_t1.shape, small_t1.affine)
    prompts.check_grid(grid)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["weights"]["prompter"]["sha256"] == _sha256(weights_dir / "prompter.pt")
    assert f"{len(prompts.prompts)} prompts" in captured.out


# ---------------------------------------------------------------------------------------------
# refused inputs: exit 2, one error line, no output folder
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(small_t1, mni_t1_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    files = {
        "2d": write_nifti(folder / "flat.nii.gz", rng.random((30, 30)).astype(np.float32), small_t1.affine),
        "4d": write_nifti(folder / "series.nii.gz", np.stack([small_t1.data] * 2, axis=-1), small_t1.affine),
        "constant": write_nifti(folder / "const.nii.gz", np.full(small_t1.shape, 3.0, np.float32), small_t1.affine),
        "nan": write_nifti(folder / "nan.nii.gz", np.where(small_t1.data > 5000, np.nan, small_t1.data)
                           .astype(np.float32), small_t1.affine),
    }
    raw = mni_t1_path.read_bytes()
    (folder / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    files["corrupt"] = folder / "cut.nii.gz"
    (folder / "t1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    files["suffix"] = folder / "t1.png"
    assert np.isnan(nib.load(str(files["nan"])).get_fdata()).any()
    return files


def _assert_refused(rc, err, out, *words, one_line=True):
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("basalseg: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    if one_line:
        assert all(line.startswith("basalseg: ") for line in lines), err
    for word in words:
        assert word.lower() in errors[0].lower(), f"{word!r} not in {errors[0]!r}"
    assert not out.exists(), "no output folder may be created"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


IMAGE_CASES = {
    "2d": ("2D", "3D"),
    "4d": ("4D", "2 volumes"),
    "constant": ("constant",),
    "nan": ("NaN",),
    "corrupt": ("unreadable",),
    "suffix": ("unsupported file type",),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_image_in_process(case, bad_inputs, small_prompts_path, weights_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(["segment", bad_inputs[case], "--out", out, "--weights", weights_dir,
                  "--prompts", small_prompts_path, "--progress", "none"])
    _assert_refused(rc, capsys.readouterr().err, out, *IMAGE_CASES[case], bad_inputs[case].name)


def test_bad_image_subprocess(bad_inputs, weights_dir, tmp_path):
    out = tmp_path / "out"
    proc = _run_subprocess(["segment", bad_inputs["4d"], "--out", out, "--weights", weights_dir], cwd=tmp_path)
    _assert_refused(proc.returncode, proc.stderr, out, "4D image with 2 volumes")
    assert proc.stdout == ""


@pytest.mark.parametrize("command", ["segment", "prompts"])
def test_unreadable_input_refused_before_the_networks_load(command, bad_inputs, tmp_path):
    """A wrong path or an unreadable image is reported before torch and MONAI are imported (a
    user who mistyped a path waits under a second, not for the networks' libraries)."""
    code = ("import sys; from basalseg.commands.app import main; "
            f"rc = main([{command!r}, sys.argv[1], '--out', sys.argv[2]]); "
            "print(rc, 'torch' in sys.modules)")
    for image, word in ((tmp_path / "nope.nii.gz", "no such file"), (bad_inputs["nan"], "NaN")):
        out = tmp_path / f"out_{image.name}"
        proc = subprocess.run([sys.executable, "-c", code, str(image), str(out)], capture_output=True, text=True,
                              env=ENV, timeout=120)
        assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
        _assert_refused(2, proc.stderr, out, word)


def test_missing_image(tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(["segment", tmp_path / "nope.nii.gz", "--out", out])
    _assert_refused(rc, capsys.readouterr().err, out, "no such file")


def test_malformed_prompts(small_t1, weights_dir, tmp_path, capsys):
    bad = tmp_path / "prompts.json"
    bad.write_text('{"format": "basalseg-prompts", "version": 1, "grid": ')
    out = tmp_path / "out"
    rc = run_cli(["segment", small_t1.path, "--out", out, "--weights", weights_dir, "--prompts", bad])
    _assert_refused(rc, capsys.readouterr().err, out, "not valid JSON", str(bad))


def test_missing_prompts_file(small_t1, weights_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(["segment", small_t1.path, "--out", out, "--weights", weights_dir, "--prompts",
                  tmp_path / "nope.json"])
    _assert_refused(rc, capsys.readouterr().err, out, "cannot read prompts", "nope.json")


def test_unwritable_output_location(fake_foundation, small_t1, small_prompts_1slice_path, weights_dir, tmp_path,
                                    capsys):
    """--out beneath a regular file (works as root too, where chmod would not stop writes)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "out"
    rc = run_cli(["segment", small_t1.path, "--out", out, "--weights", weights_dir, "--prompts",
                  small_prompts_1slice_path, "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.strip().startswith("basalseg: error: cannot write") and len(err.strip().splitlines()) == 1, err
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_prompts_for_another_image(small_t1, mni_t1, make_dk_prompts, weights_dir, tmp_path, capsys):
    from basalseg.prompts import save_prompts
    from basalseg.spatial import canonical_grid

    other = make_dk_prompts(canonical_grid(mni_t1.shape, mni_t1.affine), [2.0])
    save_prompts(other, tmp_path / "other.json")
    out = tmp_path / "out"
    rc = run_cli(["segment", small_t1.path, "--out", out, "--weights", weights_dir, "--prompts",
                  tmp_path / "other.json", "--progress", "none"])
    _assert_refused(rc, capsys.readouterr().err, out, "another image")


def test_band_must_be_positive(small_t1, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(["segment", small_t1.path, "--out", out, "--band", "0"])
    _assert_refused(rc, capsys.readouterr().err, out, "--band")


def test_existing_output_folder_without_overwrite(small_t1, small_prompts_path, weights_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "segmentation.nii.gz").write_bytes(b"earlier result")
    (out / "notes.txt").write_text("keep me")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    rc = run_cli(["segment", small_t1.path, "--out", out, "--weights", weights_dir, "--prompts", small_prompts_path])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().startswith("basalseg: error:") and len(err.strip().splitlines()) == 1
    assert "--overwrite" in err and str(out) in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# checkpoint problems: the student is loaded after the foundation stage, so a box-filling fake
# backend stands in for LiteMedSAM there (the errors under test are about the student file)


class _BoxFill:
    name = "litemedsam"
    native_size = 256

    def set_image(self, image):
        self.hw = image.shape

    def predict(self, boxes, points=None, point_labels=None):
        return box_masks(boxes, self.hw)

    def describe(self):
        return {"backend": "litemedsam", "fake": True}


class _InnerBox(_BoxFill):
    """Masks 4 pixels inside each box (a real model's mask is smaller than its box)."""

    def predict(self, boxes, points=None, point_labels=None):
        inner = [[b[0] + 4, b[1] + 4, b[2] - 4, b[3] - 4] for b in np.asarray(boxes).reshape(-1, 4)]
        return box_masks(inner, self.hw)


def test_provenance_records_the_input_as_an_absolute_path(fake_foundation, small_t1, small_prompts_1slice_path,
                                                          weights_dir, tmp_path, monkeypatch, capsys):
    """An input given relative to the working folder is recorded absolute (the report and compare
    look for it from wherever they run)."""
    monkeypatch.chdir(Path(small_t1.path).parent)
    out = tmp_path / "o"
    rc = run_cli(["segment", Path(small_t1.path).name, "--out", out, "--weights", weights_dir, "--prompts",
                  small_prompts_1slice_path, "--progress", "none", "--localise", "off"])
    assert rc == 0, capsys.readouterr().err
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["input"]["path"] == str(Path(small_t1.path).absolute())


def test_unedited_prompts_reproduce_the_run_that_made_them(monkeypatch, mni_t1_path):
    """A run's own prompts given back (``prompts`` then ``segment --prompts``, unedited) give the
    labels of the run without them: the student's crop comes from the prompter's region in both
    (recorded in prompts.json; it used to come from the prompt boxes when prompts were given, which
    moved the crop by a few voxels and the volumes by up to 1.3 %). The shipped prompter on the
    MNI152 brain; masks smaller than their boxes, as a real model's."""
    import basalseg.pipeline
    from basalseg.imageio import load_volume
    from basalseg.pipeline import Pipeline, PipelineConfig
    from basalseg.spatial import bounding_box

    monkeypatch.setattr(basalseg.pipeline, "make_backend", lambda *a, **k: _InnerBox())
    volume = load_volume(mni_t1_path)
    pipeline = Pipeline(PipelineConfig(device="cpu", mirror_tta=False))
    plain = pipeline.segment_as_given(volume)
    from basalseg.prompts import prompts_from_dict

    written = prompts_from_dict(json.loads(json.dumps(plain.prompts.to_dict())))  # through prompts.json
    assert written.source["prompter_region"] == [[s.start, s.stop] for s in bounding_box(plain.coarse > 0)]
    again = pipeline.segment_as_given(volume, prompts=written)
    assert len(plain.prompts.prompts) > 50 and not plain.missing
    assert again.roi == plain.roi
    np.testing.assert_array_equal(again.labels, plain.labels)


@pytest.fixture
def fake_foundation(monkeypatch):
    import basalseg.pipeline

    monkeypatch.setattr(basalseg.pipeline, "make_backend", lambda *a, **k: _BoxFill())


@pytest.fixture(scope="module")
def bad_checkpoints(weights_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_ckpt")
    (folder / "corrupt.pt").write_bytes(np.random.default_rng(1).bytes(2048))
    raw = (weights_dir / "student_litemedsam.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    # a weights folder whose student file no longer matches the manifest's sha256
    tampered = folder / "tampered"
    tampered.mkdir()
    for name in ("manifest.json", "prompter.pt"):
        (tampered / name).write_bytes((weights_dir / name).read_bytes())
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    (tampered / "student_litemedsam.pt").write_bytes(bytes(flipped))
    return folder


STUDENT_CASES = {
    "missing": (lambda f, w: ["--student", "/nonexistent.pt"], ("/nonexistent.pt", "missing")),
    "corrupt": (lambda f, w: ["--student", f / "corrupt.pt"], ("corrupt.pt", "corrupt or not a checkpoint")),
    "truncated": (lambda f, w: ["--student", f / "truncated.pt"], ("truncated.pt", "corrupt")),
    "wrong kind": (lambda f, w: ["--student", w / "prompter.pt"], ("prompter.pt", "'prompter' network")),
    "sha256": (lambda f, w: ["--weights", f / "tampered"], ("sha256", "does not match")),
}


@pytest.mark.parametrize("case", list(STUDENT_CASES))
def test_bad_student_checkpoint(case, fake_foundation, small_t1, small_prompts_1slice_path, weights_dir,
                                bad_checkpoints, tmp_path, capsys):
    make_args, words = STUDENT_CASES[case]
    args = make_args(bad_checkpoints, weights_dir)
    if "--weights" not in args:
        args += ["--weights", weights_dir]
    out = tmp_path / "out"
    rc = run_cli(["segment", small_t1.path, "--out", out, "--prompts", small_prompts_1slice_path,
                  "--device", "cpu", "--progress", "none", *args])
    _assert_refused(rc, capsys.readouterr().err, out, *words)


def _run_corrupt_foundation(small_t1, prompts, weights_dir, bad_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(["segment", small_t1.path, "--out", out, "--prompts", prompts, "--weights", weights_dir,
                  "--checkpoint", bad_checkpoints / "corrupt.pt", "--device", "cpu", "--progress", "none"])
    return rc, capsys.readouterr().err, out


def test_corrupt_foundation_checkpoint(small_t1, small_prompts_1slice_path, weights_dir, bad_checkpoints,
                                       tmp_path, capsys):
    rc, err, out = _run_corrupt_foundation(small_t1, small_prompts_1slice_path, weights_dir, bad_checkpoints,
                                           tmp_path, capsys)
    _assert_refused(rc, err, out, "not a readable LiteMedSAM checkpoint", "corrupt.pt", one_line=False)
    assert err.startswith("basalseg: error:")


def test_corrupt_foundation_checkpoint_error_is_one_line(small_t1, small_prompts_1slice_path, weights_dir,
                                                         bad_checkpoints, tmp_path, capsys):
    rc, err, out = _run_corrupt_foundation(small_t1, small_prompts_1slice_path, weights_dir, bad_checkpoints,
                                           tmp_path, capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err


def test_missing_foundation_checkpoint(small_t1, small_prompts_1slice_path, weights_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(["segment", small_t1.path, "--out", out, "--prompts", small_prompts_1slice_path, "--weights",
                  weights_dir, "--checkpoint", tmp_path / "none.pth", "--device", "cpu", "--progress", "none"])
    _assert_refused(rc, capsys.readouterr().err, out, "checkpoint not found")


def test_weights_folder_without_manifest(small_t1, tmp_path, capsys):
    empty = tmp_path / "weights"
    empty.mkdir()
    out = tmp_path / "out"
    rc = run_cli(["prompts", small_t1.path, "--out", out, "--weights", empty, "--device", "cpu"])
    _assert_refused(rc, capsys.readouterr().err, out, "no weights manifest")


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------


def test_version_and_usage_errors(capsys):
    from basalseg import __version__

    with pytest.raises(SystemExit) as info:
        run_cli(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        run_cli([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        run_cli(["segment", "t1.nii.gz"])  # --out is required
    assert info.value.code == 2 and "--out" in capsys.readouterr().err


def test_config_is_the_pipeline_defaults_plus_what_the_command_line_gives():
    """The command line passes only its options to PipelineConfig: every other field is the
    dataclass's own default, and the options' defaults agree with the dataclass (except
    localisation, which the command line turns on for whole-head inputs)."""
    import dataclasses

    from basalseg.commands import build_parser
    from basalseg.commands.options import LOCALISE_DEFAULT, pipeline_config
    from basalseg.pipeline import PipelineConfig

    parser = build_parser()
    default = dataclasses.replace(PipelineConfig(), localise=LOCALISE_DEFAULT)
    assert pipeline_config(parser.parse_args(["prompts", "t1.nii.gz", "--out", "o"])) == default
    assert pipeline_config(parser.parse_args(["demo", "--threads", "3"])) == dataclasses.replace(default, threads=3)
    for command in ("segment", "batch"):
        config = pipeline_config(parser.parse_args([command, "t1.nii.gz", "--out", "o"]))
        assert config == dataclasses.replace(default, backend_options={"encoder": "fused"}), command
    config = pipeline_config(parser.parse_args(["segment", "t1.nii.gz", "--out", "o", "--foundation", "sam2",
                                                "--device", "auto", "--no-crop", "--localise", "off"]))
    assert (config.foundation, config.device, config.crop, config.localise, config.backend_options) == \
        ("sam2", None, False, "off", {})


def test_parser_stays_light():
    """Building the parser and importing every subcommand module must not import torch (child
    processes start fast); the encoder choices come from the one list the fast backend uses."""
    import subprocess

    code = ("import sys, pkgutil, importlib, basalseg.commands as c; c.build_parser(); "
            "[importlib.import_module('basalseg.commands.' + m.name) for m in pkgutil.iter_modules(c.__path__)]; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    from basalseg.commands import build_parser
    from basalseg.options import ENCODERS

    args = build_parser().parse_args(["segment", "t1.nii.gz", "--out", "o", "--encoder", ENCODERS[-1]])
    assert args.encoder == ENCODERS[-1]
